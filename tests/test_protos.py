"""The committed generated protobuf code is what `make protos` produces from protos/."""

from sft_common.proto import check


def test_generated_code_is_current():
    stale = check.stale_files()
    assert stale == [], f"regenerate with `make protos`: {stale}"
