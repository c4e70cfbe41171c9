"""Batched steps over real gRPC: LoRA edges of different seeds, ranks and learning rates train
through one `sft-cloud serve` process whose batcher runs their steps together, and end where
each ends through a daemon that steps them one at a time (``--batch-window-ms 0``).

Each edge is a process of its own (``UShapeSession`` or the two-part ``EdgeSession``), so that no
two share a process's RNG (a BERT edge draws dropout masks from it). They open one after another,
then step together; the batched daemon's window is seconds (a batch closes early once every
session seen lately has joined). Compared: each edge's losses and parameters, and the cloud's
final weights of its session (``final.safetensors``), within 1e-6.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import socket
import threading
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from daemon import start_daemon, stop_daemon
from safetensors.numpy import load_file

from sft_cloud.cli import build_parser
from sft_cloud.daemon.config import ServeConfig

STEPS = 3
EDGES = 3


def edge(name: str, two_part: bool, i: int, address: str, turn, next_turn, start, out, stall=None) -> None:
    """Edge ``i``: open when its turn comes, train ``STEPS`` steps with the others, close; put
    (i, losses, parameters, session id) on ``out``. ``stall``: (step, event): at that step, once
    its message is in the daemon's batch, set the event and hang (for the test to kill it)."""
    import torch
    from helpers import random_batch

    from sft_common.models.base_model import load_base_model
    from sft_common.models.lora import LoraSpec
    from sft_common.topology.spec import SplitSpec
    from sft_common.topology.ushape import UShapeSpec
    from sft_edge.link.transport import GrpcTransport, open_channel
    from sft_edge.runs.config import LinkOptions, OptimConfig
    from sft_edge.sessions.two_part import EdgeSession
    from sft_edge.sessions.ushape import UShapeSession

    torch.set_num_threads(1)
    base = load_base_model(name)
    optim = OptimConfig(lr=1e-3 * (i + 1), weight_decay=0.01, warmup_steps=1, total_steps=10, seed=20 + i)
    kw = dict(
        batch_size=8,
        max_seq_len=64,
        link=LinkOptions(wire_dtype="fp32"),
        lora=LoraSpec(2 + 2 * i, 4.0 * (i + 1)),
    )
    turn.wait(timeout=120)
    transport = GrpcTransport(open_channel(address))
    if two_part:
        session = EdgeSession(base, SplitSpec(split_layer=1, rank=8), 2, transport, optim, **kw)
        parts = [session.net1]
    else:
        session = UShapeSession(
            base, UShapeSpec(split_layer=0, rank=8, tail_layers=1), 2, transport, optim, **kw
        )
        parts = [session.head, session.tail]
    if stall is not None:
        session.transport.listeners.append(functools.partial(_stall, *stall))
    next_turn.set()
    start.wait(timeout=120)
    # 6 sequences of at most 14 tokens: the longest of each batch is 14, so every step's shape is the same
    losses = [session.train_step(k, random_batch(batch=6, seq=14, seed=100 * i + k)) for k in range(STEPS)]
    params = {
        f"{j}.{n}": p.detach().numpy().copy()
        for j, part in enumerate(parts)
        for n, p in part.named_parameters()
    }
    session.close()
    out.put((i, losses, params, session.session_id))


def _stall(step: int, event, way: str, msg, when: float) -> None:
    """A listener that hangs the edge mid-batch at ``step``: the U once its forward is answered
    (in a batch graph whose backward the others' wait for), a two-part edge a moment after its
    step is sent (its step in a filling or computing batch); ``event`` tells the test."""
    kind = msg.WhichOneof("kind")
    if (way, kind) == ("received", "forward_down") and msg.forward_down.step == step:
        event.set()
        time.sleep(3600)
    if (way, kind) == ("sent", "train") and msg.train.step == step:
        threading.Timer(0.2, event.set).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(
    name: str, two_part: bool, window_ms: float, folder: str, edges: int = EDGES, kill: Optional[int] = None
) -> Tuple[List, Dict[str, float]]:
    """Every edge's (losses, parameters, cloud's final weights) and the daemon's batch metrics.
    ``kill``: the last edge is killed (SIGKILL) mid-batch at this step; the others' results."""
    metrics_port = _free_port()
    flags = ["--insecure", "--batch-window-ms", str(window_ms), "--checkpoint-dir", folder]
    proc, port = start_daemon(flags + ["--metrics-port", str(metrics_port), "--max-sessions", "8"])
    ctx = multiprocessing.get_context("spawn")
    turns = [ctx.Event() for _ in range(edges + 1)]
    start, out, killed = ctx.Barrier(edges), ctx.Queue(), ctx.Event()
    turns[0].set()
    args = [
        (name, two_part, i, f"127.0.0.1:{port}", turns[i], turns[i + 1], start, out) for i in range(edges)
    ]
    procs = [ctx.Process(target=edge, args=a) for a in args]
    if kill is not None:
        procs[-1] = ctx.Process(target=edge, args=args[-1] + ((kill, killed),))
    try:
        for p in procs:
            p.start()
        if kill is not None:
            assert killed.wait(timeout=300), "the edge to kill never reached its step"
            os.kill(procs[-1].pid, signal.SIGKILL)
        results = sorted(out.get(timeout=300) for _ in range(edges - (kill is not None)))
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        for p in procs:
            p.join(timeout=30)
        stop_daemon(proc)
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("sft_batch")
    }
    finals = [load_file(os.path.join(folder, sid, "final.safetensors")) for *_, sid in results]
    return [(losses, params, final) for (_, losses, params, _), final in zip(results, finals)], metrics


SLOW = pytest.mark.slow  # two minutes each here: the BERT U (dropout on both sides) runs by default


@pytest.mark.parametrize(
    "name, two_part",
    [
        ("random:tiny", False),
        pytest.param("random:tiny-llama", False, marks=SLOW),
        pytest.param("random:tiny", True, marks=SLOW),
        pytest.param("random:tiny-llama", True, marks=SLOW),
    ],
    ids=["bert-u", "llama-u", "bert-two-part", "llama-two-part"],
)
def test_batched_steps_over_grpc_equal_solo_steps(tmp_path, name, two_part):
    """Losses, the edges' parameters and the cloud's final weights within 1e-6; the batched
    daemon's Prometheus histograms counted batches holding more than one session."""
    solo, solo_metrics = _train(name, two_part, 0, str(tmp_path / "solo"))
    batched, metrics = _train(name, two_part, 1000, str(tmp_path / "batched"))
    for (losses, params, final), (want_losses, want_params, want_final) in zip(batched, solo):
        assert losses == pytest.approx(want_losses, abs=1e-6)
        for got, want in ((params, want_params), (final, want_final)):
            assert got.keys() == want.keys() and got
            for n in got:
                np.testing.assert_allclose(got[n], want[n], atol=1e-6, rtol=0, err_msg=n)
    phase = "step" if two_part else "forward"
    batches = metrics[f'sft_batch_sessions_count{{phase="{phase}"}}']
    sessions = metrics[f'sft_batch_sessions_sum{{phase="{phase}"}}']
    assert sessions > batches  # some batch held several sessions
    assert metrics[f'sft_batch_wait_seconds_count{{phase="{phase}"}}'] == sessions
    assert not any(k.endswith("_count") and v for k, v in solo_metrics.items())  # window 0: never asked


def test_the_batch_flags():
    args = build_parser().parse_args(["serve", "--insecure"])
    assert (args.batch_window_ms, args.batch_max_sequences) == (0.0, 256)  # off by default
    args = build_parser().parse_args(["serve", "--batch-window-ms", "5", "--batch-max-sequences", "64"])
    assert (args.batch_window_ms, args.batch_max_sequences) == (5.0, 64)
    for bad in ({"batch_window_ms": -1.0}, {"batch_max_sequences": 0}):
        with pytest.raises(ValueError, match="--batch-window-ms"):
            ServeConfig(insecure=True, **bad).validate()  # type: ignore[arg-type]


KILL_AT = 1  # the step at which the third edge is killed: step 0 batched all three


# Two minutes each here (two daemons, five edge processes): the default suite has the same in one
# process (tests/sft_cloud/sessions/test_batcher.py, a session that goes silent mid-batch).
@pytest.mark.parametrize(
    "name, two_part",
    [
        pytest.param("random:tiny", False, marks=SLOW),
        pytest.param("random:tiny-llama", False, marks=SLOW),
        pytest.param("random:tiny", True, marks=SLOW),
    ],
    ids=["bert-u", "llama-u", "bert-two-part"],
)
def test_an_edge_killed_mid_batch_leaves_the_others_as_without_it(tmp_path, name, two_part):
    """kill -9 of the third edge while its step is in a batch with the others' (the U: its forward
    answered, its backward due; two-part: its step sent): the other two edges' losses, parameters
    and the cloud's final weights are bitwise those of the two run batched without the third."""
    killed, metrics = _train(name, two_part, 1000, str(tmp_path / "killed"), kill=KILL_AT)
    alone, _ = _train(name, two_part, 1000, str(tmp_path / "two"), edges=2)
    assert len(killed) == len(alone) == 2
    for (losses, params, final), (want_losses, want_params, want_final) in zip(killed, alone):
        assert losses == want_losses
        for got, want in ((params, want_params), (final, want_final)):
            assert got.keys() == want.keys() and got
            assert all(np.array_equal(got[n], want[n]) for n in got), name
    phase = "step" if two_part else "forward"
    assert (
        metrics[f'sft_batch_sessions_sum{{phase="{phase}"}}']
        > metrics[f'sft_batch_sessions_count{{phase="{phase}"}}']
    )
