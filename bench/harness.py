"""Split training set up for measurement: batches, backends over each transport, step timers.

``batches`` gives fixed-shape (every sequence full length) or real SST-2 batches in the
trainer's order; ``split_backend`` builds the product's ``SplitBackend`` over an in-process
transport, a gRPC stream to a server in this process, or a gRPC stream to a daemon elsewhere;
``StepTimer`` splits each training step into edge compute, encode, transfer, cloud compute and
decode by wrapping the product's functions (nothing in the product is changed).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from bench.common import GLUE_DIR
from sft_common import codec
from sft_common.spec import SplitSpec
from sft_common.models import BaseModel
from sft_edge.backends import OptimConfig, SplitBackend
from sft_edge.client import GrpcTransport, InProcessTransport, Transport, open_channel
from sft_edge.data import Batch, batch_indices, collate


def batches(
    base: BaseModel, kind: str, n: int, batch_size: int = 32, seq: int = 128, seed: int = 42,
    data_dir: str = GLUE_DIR,
) -> List[Batch]:  # fmt: skip
    """``n`` training batches: ``fixed`` (random ids, all ``seq`` long) or ``sst2`` (real data)."""
    if kind == "fixed":
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1000, 5000, (batch_size, seq), generator=g)
            labels = torch.randint(0, 2, (batch_size,), generator=g)
            ones = torch.ones_like(ids)
            out.append(Batch(ids, torch.zeros_like(ids), ones, [seq] * batch_size, labels))
        return out
    if kind != "sst2":
        raise ValueError(f"batches are 'fixed' or 'sst2', not {kind!r}")
    from transformers import AutoTokenizer

    from sft_edge.data import encode, load_examples
    from sft_edge.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    data = encode(load_examples(get_task("sst2"), "train", data_dir), tokenizer, seq)
    return [collate(data, batch_indices(len(data), batch_size, seed, k)) for k in range(n)]


def in_process_registry(base: BaseModel):
    """A SessionRegistry that already holds ``base`` (no second copy of a 110M-parameter model)."""
    from sft_cloud.registry import SessionRegistry

    registry = SessionRegistry(device="cpu")
    getattr(registry, "_bases", {})[base.name] = base
    return registry


@contextlib.contextmanager
def grpc_server(base: BaseModel) -> Iterator[Tuple[str, Any]]:
    """A real gRPC server on a free localhost port in this process: (address, registry)."""
    from sft_cloud.server import ServeConfig, create_server

    registry = in_process_registry(base)
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        server.stop(0)


def transport_for(
    kind: str, base: BaseModel, address: Optional[str] = None, registry: Any = None
) -> Transport:
    """``inproc`` (the same messages, no network) or ``grpc`` (a stream to ``address``)."""
    if kind == "inproc":
        from sft_cloud.protocol import StreamProtocol

        return InProcessTransport(StreamProtocol(registry or in_process_registry(base), "bench"))
    assert address is not None
    return GrpcTransport(open_channel(address))


def split_backend(
    base: BaseModel, spec: SplitSpec, transport: Transport, wire: str = "fp32", compression: str = "none",
    batch_size: int = 32, seq: int = 128, steps: int = 100, micro_batches: int = 1, pipeline_depth: int = 2,
    cls_only: bool = False,
) -> SplitBackend:  # fmt: skip
    optim = OptimConfig(lr=2e-5, total_steps=steps, seed=42)
    return SplitBackend(
        base, spec, 2, transport, optim, batch_size, seq, wire, compression, "sst2", "cpu",
        micro_batches=micro_batches, pipeline_depth=pipeline_depth, cls_only=cls_only,
    )  # fmt: skip


def time_steps(backend: Any, data: List[Batch], warmup: int) -> List[float]:
    """Train on every batch of ``data``; the wall time of each step after the first ``warmup``."""
    times = []
    for k, b in enumerate(data):
        t0 = time.perf_counter()
        backend.train_step(k, b)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


class StepTimer:
    """Per-step time by part, from wrappers around the codec, the transport and the cloud session.

    Parts: ``edge_compute`` (net1 forward, backward and optimizer), ``edge_encode``,
    ``transfer`` (the transport's call minus the cloud's work: serialization, the network,
    thread hand-offs), ``cloud_decode``, ``cloud_compute``, ``cloud_encode``, ``edge_decode``.
    The cloud parts are seen only where the cloud session runs in this process.
    """

    def __init__(self) -> None:
        self.parts: Dict[str, float] = defaultdict(float)
        self._in_cloud = False
        self._undo: List[Callable[[], None]] = []

    def _patch(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self, transport: Transport) -> None:
        from sft_cloud.session import CloudSession

        def timed_codec(kind: str) -> Callable[[Callable], Callable]:
            def make(fn: Callable) -> Callable:
                def wrapper(*a: Any, **k: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        side = "cloud" if self._in_cloud else "edge"
                        self.parts[f"{side}_{kind}"] += time.perf_counter() - t0

                return wrapper

            return make

        def timed_train(fn: Callable) -> Callable:
            def wrapper(session: Any, msg: Any) -> Any:
                self._in_cloud = True
                t0 = time.perf_counter()
                try:
                    return fn(session, msg)
                finally:
                    self.parts["cloud_total"] += time.perf_counter() - t0
                    self._in_cloud = False

            return wrapper

        def timed_call(fn: Callable) -> Callable:
            # A step is submit() then result(): together, the transport's call.
            def wrapper(*a: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    self.parts["call"] += time.perf_counter() - t0

            return wrapper

        self._patch(codec, "encode", timed_codec("encode"))
        self._patch(codec, "decode", timed_codec("decode"))
        self._patch(CloudSession, "train", timed_train)
        self._patch(transport, "submit", timed_call)
        self._patch(transport, "result", timed_call)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def step(self, backend: SplitBackend, step: int, batch: Batch) -> Dict[str, float]:
        """Run one training step and return its parts in seconds (``total`` is the whole step)."""
        self.parts.clear()
        t0 = time.perf_counter()
        backend.train_step(step, batch)
        total = time.perf_counter() - t0
        p = dict(self.parts)
        cloud_codec = p.get("cloud_encode", 0.0) + p.get("cloud_decode", 0.0)
        out = {
            "total": total,
            "edge_encode": p.get("edge_encode", 0.0),
            "edge_decode": p.get("edge_decode", 0.0),
            "cloud_decode": p.get("cloud_decode", 0.0),
            "cloud_encode": p.get("cloud_encode", 0.0),
        }
        if "cloud_total" in p:
            out["cloud_compute"] = p["cloud_total"] - cloud_codec
            out["transfer"] = p["call"] - p["cloud_total"]
        else:  # the cloud is another process: its work is inside the call
            out["transfer_and_cloud"] = p["call"]
        out["edge_compute"] = total - p["call"] - out["edge_encode"] - out["edge_decode"]
        return out
