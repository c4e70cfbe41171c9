"""Prometheus metrics of the daemon (``--metrics-port``): sessions, steps, bytes each way, latency, batches.

Each daemon owns its own ``CollectorRegistry`` (no process-wide state set at import time), so
tests can run several daemons in one process. Names follow Prometheus conventions: counters end
in ``_total`` once exported, units are in the name (``_bytes``, ``_seconds``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Step latency on a CPU runs from ~10 ms (tiny configs) to seconds (BERT-base, SL, large batch).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # sessions a batched step held
# The window is a few ms; the compute of the batch ahead can add seconds on a CPU.
WAIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class DaemonMetrics:
    """The daemon's counters; the servicer calls ``observe`` once per message it answers."""

    def __init__(
        self,
        sessions: Optional[Callable[[], int]] = None,
        session_list: Optional[Callable[[], List[Any]]] = None,
    ):
        """``sessions``: how many the daemon holds; ``session_list``: them (for delta mode's memory)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("sft_sessions", "Training sessions held by the daemon", registry=r)
        if sessions is not None:
            self.sessions.set_function(sessions)
        self.delta_cache = Gauge(
            "sft_delta_cache_bytes", "Bytes delta mode's caches hold, every session and cut", registry=r
        )
        if session_list is not None:
            self.delta_cache.set_function(lambda: delta_cache_bytes(session_list()))
        self.streams = Gauge("sft_streams", "Train streams open right now", registry=r)
        self.messages = Counter(
            "sft_messages",
            "Messages answered, by kind (open, train, eval, checkpoint, close)",
            ["kind"],
            registry=r,
        )
        self.steps = Counter("sft_train_steps", "Train steps answered (retries included)", registry=r)
        self.refused = Counter("sft_refused", "Messages refused, by gRPC status code", ["code"], registry=r)
        self.bytes_in = Counter(
            "sft_received_bytes", "Serialized bytes of the messages received from edges", registry=r
        )
        self.bytes_out = Counter(
            "sft_sent_bytes", "Serialized bytes of the replies sent to edges", registry=r
        )
        self.latency = Histogram(
            "sft_step_seconds",
            "Time to answer one message (decode, forward, backward, encode)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sft_batch_sessions",
            "Sessions in one batch, by phase (forward, backward, step: two-part, eval: forward-only), alone ones included",
            ["phase"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "sft_batch_wait_seconds",
            "Time a step or evaluation waited for its batch to fill and the compute to be free",
            ["phase"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )

    def batch(self, phase: str, sessions: int, waits: List[float]) -> None:
        """A batched step ran (``sessions.batcher``): how many sessions it held, how long each waited."""
        self.batch_size.labels(phase).observe(sessions)
        for seconds in waits:
            self.batch_wait.labels(phase).observe(seconds)

    def observe(self, kind: str, bytes_in: int, bytes_out: int, seconds: float) -> None:
        self.messages.labels(kind).inc()
        if kind in ("train", "gradient_up"):  # a two-part step, or a U-shaped step's last phase
            self.steps.inc()
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)
        self.latency.labels(kind).observe(seconds)

    def refuse(self, code_name: str, bytes_in: int) -> None:
        self.refused.labels(code_name).inc()
        self.bytes_in.inc(bytes_in)

    def serve(self, port: int, host: str = "0.0.0.0") -> Tuple[object, int]:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns (server, the port it bound)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port


class Timer:
    """``with Timer() as t: ...; t.seconds``: wall time of a block, monotonic."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def delta_cache_bytes(sessions: List[Any]) -> int:
    """What delta mode's caches (``SessionCore.delta``) of ``sessions`` hold, in bytes."""
    caches = (getattr(getattr(s, "core", None), "delta", None) for s in sessions)
    return sum(c.used for c in caches if c is not None)
