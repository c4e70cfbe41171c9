"""Batched evaluations of forward-only sessions: one forward through their shared frozen middle
gives each session bitwise its solo answer.

Forward-only sessions of one model and cuts (different seeds and wire settings do not matter:
the middle is the base's) evaluate together from threads (a barrier before each round, so their
messages arrive within the window); every reply is compared with the same sessions evaluating one
at a time (window 0).
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from sft_cloud.sessions.batcher import StepBatcher
from sft_cloud.sessions.frozen import FrozenMiddleSession
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.models.base_model import load_base_model
from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError

ROUNDS = 3
LENGTHS = [10, 7, 10]  # each session's batch: 3 sequences, the longest 10 tokens
BASES = {name: load_base_model(name) for name in ("random:tiny", "random:tiny-llama")}


def _config(model: str, i: int, side_width: int = 0) -> pb.SessionConfig:
    """Session ``i``'s forward-only U (its own seed: the cloud's middle does not depend on it)."""
    return pb.SessionConfig(
        model=model, mode=pb.SL, split_layer=0, rank=8, wire_dtype=pb.FLOAT32, lr=1e-3, total_steps=1, seed=11 + i,
        max_batch_size=8, max_seq_len=64, label_private=True, tail_layers=1, forward_only=True,
        side_width=side_width,
    )  # fmt: skip


class Run:
    """``n`` forward-only sessions of one registry (``side_widths``: each one's, else 0) evaluating
    from threads; ``bad``: (session,
    round) whose activations are huge (finite, but the middle's output of them is not);
    ``lengths``: a session's own batch lengths (by index; else ``LENGTHS``)."""

    def __init__(self, model: str, n: int, window: float, side_widths=(), max_rows: int = 256):
        self.registry = SessionRegistry(batcher=StepBatcher(window, max_rows))
        self.registry._bases[model] = BASES[model]
        self.batches: List[Tuple[str, int]] = []
        self.registry.batcher.report = lambda phase, size, waits: self.batches.append((phase, size))
        self.sessions = []
        for i in range(n):
            config, base = _config(model, i, side_widths[i] if side_widths else 0), BASES[model]
            shared = self.registry._shared(config, base)
            session = FrozenMiddleSession(f"s{i}", "edge", config, base, self.registry.host, shared)
            self.registry._hold(session, None)
            self.sessions.append(session)
        self.replies: Dict[int, List[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = {i: [] for i in range(n)}
        self.refused: List[Tuple[int, int, str]] = []

    def go(self, bad=None, lengths: Optional[Dict[int, List[int]]] = None) -> Run:
        barrier = threading.Barrier(len(self.sessions))
        threads = [
            threading.Thread(target=self._drive, args=(i, barrier, bad, (lengths or {}).get(i, LENGTHS)))
            for i in range(len(self.sessions))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self

    def _drive(self, i: int, barrier: threading.Barrier, bad, lengths: List[int]) -> None:
        session, g = self.sessions[i], torch.Generator().manual_seed(100 + i)
        for k in range(ROUNDS):
            x = torch.randn(sum(lengths), session.width, generator=g)
            if bad == (i, k):
                x = x.sign() * 1e30
            barrier.wait(timeout=60)
            msg = pb.EvalStep(batch=k, activations=codec.encode(x, pb.FLOAT32), lengths=lengths)
            try:
                reply = session.evaluate(msg)
            except ProtocolError as exc:
                self.refused.append((i, k, exc.code.name))
                continue
            side = codec.decode(reply.side, name="side") if reply.HasField("side") else None
            self.replies[i].append((codec.decode(reply.activations, name="a2"), side))


def _assert_equal(a: List, b: List) -> None:
    assert len(a) == len(b) and a
    for (rows, side), (want_rows, want_side) in zip(a, b):
        assert torch.equal(rows, want_rows)
        assert (side is None and want_side is None) or torch.equal(side, want_side)


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("model", sorted(BASES))
def test_batched_evaluations_equal_solo_evaluations(model, n):
    """Every session's replies bitwise its solo ones; the batches held every session."""
    solo = Run(model, n, window=0.0).go()
    batched = Run(model, n, window=1.0).go()
    assert ("eval", n) in batched.batches
    assert not solo.batches  # window 0: the batcher is not asked
    for i in range(n):
        _assert_equal(batched.replies[i], solo.replies[i])


def test_batched_side_network_taps_equal_solo_ones():
    """With a side width, each layer's projected output (the side taps) too."""
    solo = Run("random:tiny-llama", 3, window=0.0, side_widths=[8] * 3).go()
    batched = Run("random:tiny-llama", 3, window=1.0, side_widths=[8] * 3).go()
    assert ("eval", 3) in batched.batches
    for i in range(3):
        assert batched.replies[i][0][1] is not None
        _assert_equal(batched.replies[i], solo.replies[i])


def test_a_refused_evaluation_leaves_the_others_unchanged():
    """Session 1's activations at round 1 overflow in the middle: it alone is refused; the others'
    answers in that batch are their solo ones."""
    solo = Run("random:tiny", 3, window=0.0).go()
    batched = Run("random:tiny", 3, window=1.0).go(bad=(1, 1))
    assert batched.refused == [(1, 1, "INVALID_ARGUMENT")]
    assert ("eval", 3) in batched.batches
    for i in (0, 2):
        _assert_equal(batched.replies[i], solo.replies[i])
    _assert_equal(batched.replies[1], [solo.replies[1][0], solo.replies[1][2]])


@pytest.mark.parametrize(
    "lengths, side_widths",
    [({1: [12, 3]}, ()), ({}, [0, 8, 0])],
    ids=["padded-to-another-length", "another-side-width"],
)
def test_evaluations_of_other_shapes_run_apart(lengths, side_widths):
    """Session 1's batch is padded to another length, or asks for side taps: it never joins the
    others' batch; each still gets its solo answer."""
    solo = Run("random:tiny-llama", 3, window=0.0, side_widths=side_widths).go(lengths=lengths)
    batched = Run("random:tiny-llama", 3, window=0.2, side_widths=side_widths).go(lengths=lengths)
    assert max(size for _, size in batched.batches) == 2  # sessions 0 and 2
    for i in range(3):
        _assert_equal(batched.replies[i], solo.replies[i])


def test_a_batch_of_evaluations_holds_at_most_max_rows_sequences():
    """Two sessions' 3 sequences each fit a cap of 6; a cap of 5 evaluates them one at a time."""
    fits = Run("random:tiny-llama", 2, window=1.0, max_rows=6).go()
    assert max(size for _, size in fits.batches) == 2
    capped = Run("random:tiny-llama", 2, window=0.05, max_rows=5).go()
    assert max(size for _, size in capped.batches) == 1
    _assert_equal(fits.replies[1], capped.replies[1])
