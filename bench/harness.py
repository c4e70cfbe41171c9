"""Split training set up for measurement: batches, sessions over each transport, what crossed and when.

The product's own ``EdgeSession`` over an in-process cloud session (``inproc``), a gRPC server in
this process (``grpc_server``) or a daemon: nothing in the product is wrapped, only listened to.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from bench.common import GLUE_DIR
from sft_common.models.base_model import BaseModel
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec
from sft_common.wire import codec
from sft_edge.data.glue import Batch, batch_indices, collate
from sft_edge.link.transport import GrpcTransport, InProcessTransport, Transport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.local import LocalSession
from sft_edge.sessions.two_part import EdgeSession


def batches(
    base: BaseModel,
    kind: str,
    n: int,
    batch_size: int = 32,
    seq: int = 128,
    seed: int = 42,
    data_dir: str = GLUE_DIR,
) -> List[Batch]:
    """``n`` training batches: ``fixed`` (random ids, all ``seq`` long) or ``sst2`` (real data)."""
    if kind == "fixed":
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(1000, 5000, (batch_size, seq), generator=g)
            labels = torch.randint(0, 2, (batch_size,), generator=g)
            out.append(Batch(ids, torch.zeros_like(ids), torch.ones_like(ids), [seq] * batch_size, labels))
        return out
    if kind != "sst2":
        raise ValueError(f"batches are 'fixed' or 'sst2', not {kind!r}")
    from transformers import AutoTokenizer

    from sft_edge.data.glue import encode, load_examples
    from sft_edge.data.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    data = encode(load_examples(get_task("sst2"), "train", data_dir), tokenizer, seq)
    return [collate(data, batch_indices(len(data), batch_size, seed, k)) for k in range(n)]


def in_process_registry(base: BaseModel, device: str = "cpu"):
    """A SessionRegistry that already holds ``base`` (no second copy of a 110M-parameter model)."""
    from sft_cloud.sessions.registry import SessionRegistry

    registry = SessionRegistry(device=device)
    registry._bases[base.name] = base
    return registry


class TimedProtocol:
    """A cloud stream protocol that adds up the time it takes to answer (the cloud's whole work)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    @property
    def session(self):
        return self.inner.session

    def handle(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        t0 = time.monotonic()
        try:
            return self.inner.handle(msg)
        finally:
            self.seconds += time.monotonic() - t0


def inproc(base: BaseModel, registry=None, device: str = "cpu") -> InProcessTransport:
    """The same messages, serialized and parsed, to a cloud session in this process (no network);
    ``.protocol.seconds``: the cloud's time answering, ``.protocol.session``: the cloud session."""
    from sft_cloud.daemon.protocol import StreamProtocol

    return InProcessTransport(
        TimedProtocol(StreamProtocol(registry or in_process_registry(base, device), "bench"))
    )


def grpc(address: str) -> GrpcTransport:
    return GrpcTransport(open_channel(address), owns_channel=True)


SECONDS = ("sft_step_seconds_sum", {"kind": "train"})  # the daemon's time answering train steps


@contextlib.contextmanager
def grpc_server(base: BaseModel, device: str = "cpu") -> Iterator[Tuple[str, Callable[[], float]]]:
    """A real gRPC server on a free localhost port in this process: (address, the seconds it has
    spent answering train steps so far, from its ``sft_step_seconds`` metric)."""
    from sft_cloud.daemon.metrics import DaemonMetrics
    from sft_cloud.daemon.server import ServeConfig, create_server

    metrics = DaemonMetrics()
    cfg = ServeConfig(host="127.0.0.1", port=0, insecure=True)
    server, port, _ = create_server(cfg, in_process_registry(base, device), metrics)
    try:
        yield f"127.0.0.1:{port}", lambda: metrics.registry.get_sample_value(*SECONDS) or 0.0
    finally:
        server.stop(0)


def session_config(base: BaseModel, split_layer: int, **fields: Any) -> pb.SessionConfig:
    """A two-part SFT session of rank 8 on two labels, fp32 on the wire, batches of at most 8 x 64
    tokens, as an edge opens it; ``fields`` set the rest (lr, steps, seed, LoRA)."""
    return pb.SessionConfig(
        model=base.name,
        mode=pb.SFT,
        split_layer=split_layer,
        rank=8,
        num_labels=2,
        wire_dtype=pb.FLOAT32,
        max_batch_size=8,
        max_seq_len=64,
        **fields,
    )


def random_step(step: int, lengths: List[int]) -> pb.TrainStep:
    """A train step of that session with random rank-8 activations, labels 0, 1, 0, 1, ..."""
    acts = codec.encode(torch.randn(sum(lengths), 8))
    return pb.TrainStep(
        step=step, activations=acts, lengths=lengths, labels=[k % 2 for k in range(len(lengths))]
    )


def split_session(
    base: BaseModel,
    spec: SplitSpec,
    transport: Transport,
    steps: int = 100,
    batch_size: int = 32,
    seq: int = 128,
    link: Optional[LinkOptions] = None,
    device: str = "cpu",
) -> EdgeSession:
    """The product's edge session (lr 2e-5, seed 42, SST-2's two labels) over ``transport``."""
    optim = OptimConfig(lr=2e-5, total_steps=steps, seed=42)
    return EdgeSession(
        base, spec, 2, transport, optim, batch_size, seq, link or LinkOptions(), "sst2", device
    )


def local_session(base: BaseModel, steps: int) -> LocalSession:
    return LocalSession(base, 2, OptimConfig(lr=2e-5, total_steps=steps, seed=42))


def time_steps(session, data: List[Batch], warmup: int = 0, first: int = 0) -> List[float]:
    """Train on ``data`` as steps ``first``, ``first + 1``, ...; the wall time of each step after
    the first ``warmup``."""
    times = []
    for k, b in enumerate(data):
        t0 = time.perf_counter()
        session.train_step(first + k, b)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def record(transport: Transport) -> List[Tuple[str, Any, float]]:
    """Every message that crosses ``transport`` from now on: (direction, message, monotonic time)."""
    events: List[Tuple[str, Any, float]] = []
    transport.listeners.append(lambda *event: events.append(event))
    return events


class Watched(Transport):
    """``inner`` as seen by the edge: ``waits`` holds how long each answer to a train step kept
    the edge blocked. With ``lock``, lets go of it while blocked (many edges in one process, each
    computing under the lock as if on a device of its own)."""

    def __init__(self, inner: Transport, lock: Optional[threading.Lock] = None) -> None:
        super().__init__()
        self.inner, self.lock = inner, lock
        self.waits: List[float] = []

    def _submit(self, msg: pb.EdgeMessage) -> None:
        self.inner.submit(msg)

    def _result(self) -> pb.CloudMessage:
        if self.lock:
            self.lock.release()
        t0 = time.monotonic()
        try:
            reply = self.inner.result()
            if reply.WhichOneof("kind") == "train":
                self.waits.append(time.monotonic() - t0)
            return reply
        finally:
            if self.lock:
                self.lock.acquire()

    def close(self) -> None:
        self.inner.close()


def timed_step(
    session: EdgeSession, events: List, step: int, batch: Batch, cloud: Optional[Callable[[], float]] = None
) -> Dict[str, float]:
    """One whole training step by part, in seconds: ``total``, ``edge_compute`` (net1 forward,
    backward, optimizer), ``edge_encode``, ``edge_decode``, ``cloud_decode``, ``cloud_encode``
    (the codec run again on the step's own payloads, right after it), and ``transfer`` (the
    transport's round trip minus the cloud's work) with ``cloud_compute`` where ``cloud`` gives the
    cloud's cumulative seconds, else ``transfer_and_cloud``."""
    events.clear()
    cloud0 = cloud() if cloud else 0.0
    t0 = time.monotonic()
    session.train_step(step, batch)
    out = {"total": time.monotonic() - t0}
    (_, sent, t_sent), (_, reply, t_received) = events
    call = t_received - t_sent
    acts, out["cloud_decode"] = _timed(lambda: codec.decode(sent.train.activations, name="activations"))
    _, out["edge_encode"] = _timed(lambda: session.wire.encode_activations(acts))
    grad, out["edge_decode"] = _timed(lambda: codec.decode(reply.train.grad, name="gradient"))
    _, out["cloud_encode"] = _timed(lambda: session.wire.encode_gradient(grad))
    if cloud is None:  # the cloud is another process: its work is inside the round trip
        out["transfer_and_cloud"] = call
        del out["cloud_decode"], out["cloud_encode"]
    else:
        cloud_s = cloud() - cloud0
        out["cloud_compute"] = cloud_s - out["cloud_decode"] - out["cloud_encode"]
        out["transfer"] = call - cloud_s
    out["edge_compute"] = out["total"] - call - out["edge_encode"] - out["edge_decode"]
    return out


def _timed(fn: Callable):
    t0 = time.monotonic()
    value = fn()
    return value, time.monotonic() - t0
