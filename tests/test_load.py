"""Load: many edge sessions at once on one daemon all finish, each with its solo run's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import mismatches, run_many  # noqa: E402
from sft_cloud.daemon.server import ServeConfig, create_server  # noqa: E402
from sft_cloud.sessions.registry import SessionRegistry  # noqa: E402


@pytest.fixture
def daemon(tmp_path):
    registry = SessionRegistry(max_sessions=40, checkpoint_dir=str(tmp_path))
    server, port, _ = create_server(
        ServeConfig(host="127.0.0.1", port=0, insecure=True, max_sessions=40), registry
    )
    yield f"127.0.0.1:{port}", registry
    server.stop(0).wait()


def _concurrent_equals_solo(daemon, tiny_base, sessions, steps):
    address, registry = daemon
    # Edges and cloud share this process's RNG here: one lock serialises all dropout draws (the
    # cloud's own compute lock), each edge letting go of it while it waits for the cloud.
    lock = registry._compute_lock
    seeds = [100 + i for i in range(sessions)]
    solo = run_many(address, tiny_base, seeds, steps, lock, concurrent=False)
    together = run_many(address, tiny_base, seeds, steps, lock, concurrent=True)
    assert all(r["cloud_steps"] == steps for r in together)
    assert len({r["session_id"] for r in solo + together}) == 2 * sessions
    assert mismatches(registry.checkpoint_dir, solo, together) == []
    assert len(registry) == 0


def test_eight_concurrent_sessions_end_as_their_solo_runs(daemon, tiny_base):
    _concurrent_equals_solo(daemon, tiny_base, sessions=8, steps=6)


@pytest.mark.slow
def test_thirty_two_concurrent_sessions_end_as_their_solo_runs(daemon, tiny_base):
    _concurrent_equals_solo(daemon, tiny_base, sessions=32, steps=10)
