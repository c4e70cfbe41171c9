"""Shared fixtures: tiny models, the GLUE folder, a live daemon on a free localhost port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("SFT_GLUE_DIR", ROOT.parent / "shared" / "data" / "glue"))

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_base():
    from sft_common.models.base_model import load_base_model

    return load_base_model("random:tiny")


@pytest.fixture(scope="session")
def minilm_base():
    from sft_common.models.base_model import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def glue_dir() -> str:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR} (set SFT_GLUE_DIR)")
    return str(GLUE_DIR)


@pytest.fixture
def live_server():
    """A real daemon (insecure) on a free localhost port; yields (address, registry)."""
    from sft_cloud.daemon.server import ServeConfig, create_server
    from sft_cloud.sessions.registry import SessionRegistry

    registry = SessionRegistry(device="cpu", max_sessions=8)
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    yield f"127.0.0.1:{port}", registry
    server.stop(0).wait()


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """(address, registry, messages): a daemon keeping finished sessions, and every (EdgeMessage,
    CloudMessage) pair it answered (what the cloud was handed, for the link-content tests; a
    packed stream's messages unpacked)."""
    from sft_cloud.daemon.protocol import StreamProtocol
    from sft_cloud.daemon.server import ServeConfig, create_server
    from sft_cloud.sessions.registry import SessionRegistry

    messages = []
    answer = StreamProtocol._answer

    def record(self, msg):
        reply = answer(self, msg)
        messages.append((msg, reply))
        return reply

    monkeypatch.setattr(StreamProtocol, "_answer", record)
    registry = SessionRegistry(checkpoint_dir=str(tmp_path / "cloud"))
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    yield f"127.0.0.1:{port}", registry, messages
    server.stop(0).wait()
