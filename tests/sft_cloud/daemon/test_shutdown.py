"""SIGTERM stops a real daemon within its grace, whatever it was sent, and checkpoints the sessions
it still holds (issue 19: streams of bytes that are no EdgeMessage used to make it hang forever).

The daemon is a separate process; the tests talk to it with raw gRPC and the generated protos.
Run as a module, this file is the daemon with a gRPC server whose stop never completes."""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import grpc
import pytest
import torch

from sft_cloud import cli
from sft_cloud.daemon import launch
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint

ROOT = Path(__file__).resolve().parents[3]
TRAIN = "/sft.v1.SplitTrainer/Train"
GRACE = 2.0  # --grace-seconds of every daemon here
BOUND = GRACE + 5.0  # what an orchestrator allows: SIGTERM to exit
WIDTH = 8  # rank 8 at the cut of random:tiny
# What edges must never send, and what reached the daemon in issue 19: no protobuf message at all,
# and a field-1 (open) header whose length runs past the end.
GARBAGE = (b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f")


def _config() -> pb.SessionConfig:
    return pb.SessionConfig(
        model="random:tiny",
        mode=pb.SFT,
        split_layer=3,
        rank=WIDTH,
        num_labels=2,
        wire_dtype=pb.FLOAT32,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=2,
        total_steps=100,
        seed=7,
        max_batch_size=8,
        max_seq_len=64,
        task="sst2",
    )


def _open(base) -> pb.EdgeMessage:
    config = _config()
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=config.split_layer, rank=config.rank), 2)
    return pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=fp))


def _step(k: int, lengths: Sequence[int] = (5, 3)) -> pb.EdgeMessage:
    tokens = sum(lengths)
    data = torch.randn(tokens, WIDTH, generator=torch.Generator().manual_seed(k)).numpy().tobytes()
    acts = pb.Tensor(dtype=pb.FLOAT32, shape=[tokens, WIDTH], data=data)
    labels = [i % 2 for i in range(len(lengths))]
    return pb.EdgeMessage(train=pb.TrainStep(step=k, activations=acts, lengths=list(lengths), labels=labels))


class Stream:
    """One Train stream driven message by message, as an edge drives it."""

    def __init__(self, channel: grpc.Channel):
        self._out: queue.Queue = queue.Queue()
        train = channel.stream_stream(
            TRAIN,
            request_serializer=pb.EdgeMessage.SerializeToString,
            response_deserializer=pb.CloudMessage.FromString,
        )
        self._replies = train(iter(self._out.get, None), timeout=120)

    def send(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        self._out.put(msg)
        return next(self._replies)

    def half_close(self) -> None:
        self._out.put(None)

    def end(self) -> None:
        """Half-close, and wait for the daemon to end the stream."""
        self.half_close()
        assert list(self._replies) == []


def _session(channel: grpc.Channel, base, steps: int) -> tuple:
    stream = Stream(channel)
    sid = stream.send(_open(base)).opened.session_id
    for k in range(steps):
        assert stream.send(_step(k)).train.step == k
    return stream, sid


def _send_undecodable(address: str, base, streams: int) -> None:
    """``streams`` raw-bytes streams at once, each ending in bytes that do not decode; some open a
    session first. Each must end with gRPC's INTERNAL "Exception deserializing request!"."""
    opening = _open(base).SerializeToString()
    codes: List[Optional[grpc.StatusCode]] = []

    def one(i: int) -> None:
        with grpc.insecure_channel(address) as channel:
            garbage = GARBAGE[i % len(GARBAGE)]
            payloads = [opening, garbage] if i % 3 == 2 else [garbage, garbage]
            try:
                list(channel.stream_stream(TRAIN)(iter(payloads), timeout=60))
                codes.append(None)
            except grpc.RpcError as exc:
                assert "deserializing" in (exc.details() or ""), exc.details()
                codes.append(exc.code())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [grpc.StatusCode.INTERNAL] * streams


def _steps_saved(folder: Path) -> List[int]:
    return sorted(
        int(m.group(1)) for p in folder.glob("step-*.safetensors") if (m := re.search(r"(\d+)", p.name))
    )


@dataclass
class Stopped:
    """How a daemon ended after SIGTERM, and the sessions it had."""

    code: Optional[int]  # exit code (-9: killed at the bound)
    seconds: float  # from SIGTERM to exit
    out: str  # what it printed
    live: Dict[str, int]  # sessions it held: id -> steps trained
    closed: str  # the id of a session closed before


def _round(base, ckpt_dir: Path, module: Sequence[str] = ("sft_cloud.cli",)) -> Stopped:
    """Start a daemon, leave it sessions in three states and undecodable streams, SIGTERM it."""
    args = ["--insecure", "--checkpoint-dir", str(ckpt_dir), "--grace-seconds", str(GRACE)]
    proc, port = launch.start_daemon(args, cwd=str(ROOT), module=module)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    attached: Optional[Stream] = None
    try:
        # Mid-training, idle between steps with its stream open; an edge that went away after
        # two steps; and a closed one.
        attached, attached_id = _session(channel, base, 3)
        detached, detached_id = _session(channel, base, 2)
        detached.end()
        closing, closed_id = _session(channel, base, 1)
        assert closing.send(pb.EdgeMessage(close=pb.CloseSession())).closed.steps == 1
        closing.end()
        _send_undecodable(address, base, streams=8)
        start = time.monotonic()
        out = launch.stop_daemon(proc, timeout=BOUND)  # SIGTERM; kill -9 past the bound
        seconds = time.monotonic() - start
    finally:
        if attached is not None:
            attached.half_close()  # its call ended with the daemon; this ends its sending thread
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Stopped(proc.returncode, seconds, out, {attached_id: 3, detached_id: 2}, closed_id)


def _assert_stopped_and_checkpointed(stopped: Stopped, ckpt_dir: Path) -> None:
    out = stopped.out
    assert stopped.code == 0, f"exit code {stopped.code} after {stopped.seconds:.1f}s:\n{out}"
    assert stopped.seconds <= BOUND, out
    assert "sft-cloud: stopped" in out
    for sid, steps in stopped.live.items():
        # No Checkpoint message was sent: these files are the shutdown's, at the step reached.
        assert _steps_saved(ckpt_dir / sid) == [steps], (sid, out)
    closed = ckpt_dir / stopped.closed
    assert _steps_saved(closed) == [] and (closed / "final.safetensors").is_file()


@pytest.mark.parametrize("rounds", [2, pytest.param(5, marks=pytest.mark.slow)])
def test_sigterm_after_undecodable_streams_exits_within_grace_and_checkpoints(tmp_path, tiny_base, rounds):
    for r in range(rounds):
        ckpt_dir = tmp_path / f"round-{r}"
        stopped = _round(tiny_base, ckpt_dir)
        _assert_stopped_and_checkpointed(stopped, ckpt_dir)
        # The gRPC server stopped by itself: the garbage left nothing on its books.
        assert "had not stopped" not in stopped.out, stopped.out


def test_a_server_that_never_stops_is_given_up_on_after_the_grace(tmp_path, tiny_base):
    """Whatever else gRPC may leave on its books: the daemon still checkpoints, says so, exits."""
    ckpt_dir = tmp_path / "ckpt"
    stopped = _round(tiny_base, ckpt_dir, module=("tests.sft_cloud.daemon.test_shutdown",))
    _assert_stopped_and_checkpointed(stopped, ckpt_dir)
    assert "the gRPC server had not stopped" in stopped.out, stopped.out


def _serve_with_a_server_that_never_stops() -> int:
    """`sft-cloud` whose gRPC server really stops, but never reports it (its stop event stays unset)."""
    real = grpc.server

    def server(*args, **kw):
        s = real(*args, **kw)
        stop = s.stop
        s.stop = lambda grace: (stop(grace), threading.Event())[1]  # type: ignore[method-assign]
        return s

    grpc.server = server  # type: ignore[assignment]
    return cli.main()


if __name__ == "__main__":
    sys.exit(_serve_with_a_server_that_never_stops())
