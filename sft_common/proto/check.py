"""Generate the *_pb2*.py files from protos/ (`make protos`) and check the committed ones (`make check-protos`).

The generator is pinned to grpcio-tools 1.70.0, the last release for Python 3.8 (JetPack 5 on
the Jetson edge): its code needs only protobuf >= 5.29 and grpcio >= 1.70 at import, and newer
runtimes accept older gencode (protobuf 7 refuses only gencode *newer* than itself). Newer
grpcio-tools would stamp a protobuf 7 / grpcio 1.85 requirement into the code that no Python
3.8 runtime can meet. grpcio-tools 1.70 wants protobuf < 6, which would clash with the runtime
the rest of the project uses, so it lives in its own virtual environment (``.venv-protos``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
PROTO = "sft_common/proto/sft.proto"
OUTPUTS = ("sft_pb2.py", "sft_pb2.pyi", "sft_pb2_grpc.py")
GRPCIO_TOOLS = "grpcio-tools==1.70.0"
VENV = ROOT / ".venv-protos"


def protoc_python() -> str:
    """A Python with the pinned grpcio-tools: $SFT_PROTOC_PYTHON, else .venv-protos (made on first use)."""
    override = os.environ.get("SFT_PROTOC_PYTHON")
    if override:
        return override
    python = VENV / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", GRPCIO_TOOLS],
            check=True,
        )
    return str(python)


def generate(out_dir: Path) -> None:
    python = protoc_python()
    found = subprocess.run(
        [python, "-c", "from importlib.metadata import version; print(version('grpcio-tools'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if found != GRPCIO_TOOLS.split("==")[1]:
        raise RuntimeError(f"{python} has grpcio-tools {found}, the generated code needs {GRPCIO_TOOLS}")
    subprocess.run(
        [
            python,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(ROOT / "protos" / PROTO),
        ],
        check=True,
    )


def stale_files() -> List[str]:
    """Names of generated files that differ from a fresh generation (empty: all current)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir = Path(tmp) / "sft_common" / "proto"
        return [
            name
            for name in OUTPUTS
            if (fresh_dir / name).read_bytes() != (ROOT / "sft_common" / "proto" / name).read_bytes()
        ]


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        generate(ROOT)
        print(f"generated {', '.join(OUTPUTS)} with {GRPCIO_TOOLS}")
        sys.exit(0)
    stale = stale_files()
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `make protos`", file=sys.stderr)
        sys.exit(1)
    print("generated protobuf code is current")
