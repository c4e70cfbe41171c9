"""``--delta-cache-mb``: refused clearly where no full-width activations cross a link."""

from __future__ import annotations

import pytest

from sft_common.topology.spec import SplitSpec
from sft_edge.runs.config import TrainConfig
from sft_edge.runs.kinds import kind_of


def _config(**flags) -> TrainConfig:
    return TrainConfig(**{"task": "sst2", "model": "random:tiny-llama", "delta_cache_mb": 8.0, **flags})


@pytest.mark.parametrize(
    "flags, match",
    [
        (dict(local=True), "--local has no link"),
        (dict(forward_only=True), "--forward-only sends each example once"),
        (dict(mode="sl", delta_cache_mb=-1.0), "--delta-cache-mb must be in 0..4096"),
    ],
)
def test_refused_by_the_flag_checks(flags, match):
    with pytest.raises(ValueError, match=match):
        _config(**flags).validate()


@pytest.mark.parametrize("label_private", [False, True])
def test_refused_at_a_rank_r_cut_once_the_cut_is_resolved(label_private):
    cfg = _config(label_private=label_private)
    cfg.validate()  # the mode is not known yet: a decoder's U resolves to sl (runs.defaults)
    kind = kind_of(cfg)
    kind.check_split(cfg, SplitSpec(0, 8, "sl"), 4)
    with pytest.raises(ValueError, match="--delta-cache-mb needs full-width cuts"):
        kind.check_split(cfg, SplitSpec(0, 8, "sft"), 4)
