"""Batched forward-only evaluations over real gRPC: forward-only edges of different seeds and
learning rates train through one `sft-cloud serve` process whose batcher runs their evaluations
as one forward through the frozen middle, and end bitwise where each ends through a daemon that
answers them one at a time (``--batch-window-ms 0``).

The edges are threads of this process (a tiny Llama draws no random numbers, so they share no RNG
state that matters), each with its own gRPC channel; a barrier before each step makes their
evaluations arrive together.
"""

from __future__ import annotations

import threading
import urllib.request
from typing import Dict, List, Tuple

import pytest
import torch
from daemon import start_daemon, stop_daemon
from helpers import random_batch
from test_batcher_grpc import _free_port

from sft_common.models.base_model import load_base_model
from sft_common.topology.ushape import UShapeSpec
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.forward_only import ForwardOnlySession

STEPS = 3
EDGES = 3
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1, mode="sl")


def _edge(address: str, base, i: int, adapters: str) -> ForwardOnlySession:
    """Edge ``i``: its own seed and learning rate, classification, fp32 wire."""
    optim = OptimConfig(lr=1e-3 * (i + 1), weight_decay=0.01, warmup_steps=1, total_steps=10, seed=20 + i)
    return ForwardOnlySession(
        base, SPEC, 2, GrpcTransport(open_channel(address)), optim, batch_size=8, max_seq_len=32,
        link=LinkOptions(wire_dtype="fp32"), cache=ActivationCache(None, {"base": base.fingerprint}, 64.0),
        adapters=adapters,
    )  # fmt: skip


def _train(window_ms: float, adapters: str) -> Tuple[List, Dict[str, float]]:
    """Each edge's (losses, parameters, dev logits) and the daemon's batch metrics."""
    metrics_port = _free_port()
    flags = ["--insecure", "--batch-window-ms", str(window_ms), "--metrics-port", str(metrics_port)]
    proc, port = start_daemon(flags)
    base = load_base_model("random:tiny-llama")
    barrier = threading.Barrier(EDGES)
    results: List = [None] * EDGES

    def drive(i: int) -> None:
        edge = _edge(f"127.0.0.1:{port}", base, i, adapters)
        # 6 sequences of at most 14 tokens: the longest of each batch is 14, so every batch's shape is the same
        losses = []
        for k in range(STEPS):
            barrier.wait(timeout=120)
            losses.append(edge.train_step(k, random_batch(batch=6, seq=14, seed=100 * i + k)))
        barrier.wait(timeout=120)
        logits = edge.predict(random_batch(batch=6, seq=14, seed=999 + i))  # a dev batch: not cached
        params = {n: p.detach().clone() for n, p in edge.net.named_parameters() if p.requires_grad}
        edge.close()
        results[i] = (losses, params, logits)

    try:
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(EDGES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        stop_daemon(proc)
    assert all(r is not None for r in results), "an edge failed (see its thread's traceback)"
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("sft_batch")
    }
    return results, metrics


# parallel: 35 s here; tests/sft_cloud/sessions/test_eval_batch.py batches the side taps by default
@pytest.mark.parametrize("adapters", ["tail", pytest.param("parallel", marks=pytest.mark.slow)])
def test_batched_evaluations_over_grpc_equal_one_at_a_time(adapters):
    """Losses, trained parameters and dev logits bitwise those through a daemon with the window
    off; the batched daemon's Prometheus histograms counted evaluation batches of several sessions."""
    solo, solo_metrics = _train(0, adapters)
    batched, metrics = _train(1000, adapters)
    for (losses, params, logits), (want_losses, want_params, want_logits) in zip(batched, solo):
        assert losses == want_losses
        assert params.keys() == want_params.keys() and params
        assert all(torch.equal(params[n], want_params[n]) for n in params)
        assert torch.equal(logits, want_logits)
    batches = metrics['sft_batch_sessions_count{phase="eval"}']
    sessions = metrics['sft_batch_sessions_sum{phase="eval"}']
    assert sessions > batches  # some batch held several sessions
    assert metrics['sft_batch_wait_seconds_count{phase="eval"}'] == sessions == EDGES * (STEPS + 1)
    assert not any(k.endswith("_count") and v for k, v in solo_metrics.items())  # window 0: never asked
