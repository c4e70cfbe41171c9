"""Many re-attachments of one session, clean and abrupt: no thread or stream is left behind (bench.load)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import WAYS, Reconnector  # noqa: E402


def _settled_threads(registry, timeout=10.0) -> int:
    """Thread count once every stream's teardown has finished (all sessions detached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.attached == 0 for s in registry._sessions.values()):
            time.sleep(0.2)  # the reader threads of the cancelled calls end right after
            return threading.active_count()
        time.sleep(0.02)
    raise AssertionError(f"streams still attached: {[s.attached for s in registry._sessions.values()]}")


def test_hundred_reconnects_leave_threads_and_sessions_as_they_were(live_server, tiny_base):
    address, registry = live_server
    r = Reconnector(address, tiny_base, new_channel_every=10)
    for _ in range(2 * len(WAYS)):  # warm up: gRPC's worker threads are created on first use
        r.once()
    baseline = _settled_threads(registry)
    for _ in range(100):
        r.once()
    after = _settled_threads(registry)
    assert after <= baseline + 2, (baseline, after)
    session = registry.get(r.request.session_id)
    assert session.attached == 0 and len(registry) == 1
    assert session.next_step == r.next_step == 1 + 54  # a step in 2 of every 4 ways: 108 / 2
    assert r.close() == r.next_step and len(registry) == 0
