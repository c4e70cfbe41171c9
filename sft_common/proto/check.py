"""Check that the committed *_pb2*.py files are what grpcio-tools makes of protos/ (`make check-protos`)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
PROTO = "sft_common/proto/sft.proto"
OUTPUTS = ("sft_pb2.py", "sft_pb2.pyi", "sft_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={out_dir}",
         f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", str(ROOT / "protos" / PROTO)],
        check=True,
    )  # fmt: skip


def stale_files() -> List[str]:
    """Names of generated files that differ from a fresh generation (empty: all current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir = Path(tmp) / "sft_common" / "proto"
        return [
            name for name in OUTPUTS
            if (fresh_dir / name).read_bytes() != (ROOT / "sft_common" / "proto" / name).read_bytes()
        ]  # fmt: skip


if __name__ == "__main__":
    stale = stale_files()
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        sys.exit(1)
    print("generated protobuf code is current")
