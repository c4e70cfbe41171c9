"""The step batcher: LoRA sessions' steps through one frozen base equal each session's solo steps.

Sessions of different seeds, LoRA ranks and learning rates step together from threads (a barrier
before each phase, so their messages arrive within the window); every reply and every parameter
after the run is compared with the same sessions stepped one at a time (window 0).
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from sft_cloud.sessions.batcher import StepBatcher
from sft_cloud.sessions.middle import MiddleSession
from sft_cloud.sessions.registry import SessionRegistry
from sft_cloud.sessions.two_part import TwoPartSession
from sft_common.models.base_model import load_base_model
from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError

STEPS = 3
ROWS, SEQ = 3, 10  # each session's batch: 3 sequences of 10 tokens
BASES = {name: load_base_model(name) for name in ("random:tiny", "random:tiny-llama")}
# Finite, so the message passes the checks at decode, but what the part makes of it is not.
HUGE = {"forward": 1e30, "backward": 3e38}


def _config(model: str, i: int, two_part: bool, lora_rank: Optional[int] = None) -> pb.SessionConfig:
    """Session ``i``'s: its own seed, LoRA rank and learning rate."""
    rank = 2 + 2 * i if lora_rank is None else lora_rank
    return pb.SessionConfig(
        model=model, mode=pb.SFT, split_layer=0 if not two_part else 1, rank=8,
        num_labels=2 if two_part else 0, wire_dtype=pb.FLOAT32, lr=1e-3 * (1 + i), weight_decay=0.01,
        warmup_steps=1, total_steps=10, seed=11 + i, max_batch_size=8, max_seq_len=64,
        label_private=not two_part, tail_layers=0 if two_part else 1,
        lora_rank=rank, lora_alpha=2.0 * rank if rank else 0.0,
    )  # fmt: skip


class Run:
    """``n`` sessions of one registry stepped from threads; ``bad``: (session, step, phase) whose
    message is made non-finite in the part (huge values), ``stop``: (session, step, phase) after
    which that session sends nothing more."""

    def __init__(
        self, model: str, n: int, window: float, two_part: bool = False, lora_rank=None, max_rows=256
    ):
        self.registry = SessionRegistry(batcher=StepBatcher(window, max_rows))
        self.registry._bases[model] = BASES[model]
        self.batches: List[Tuple[str, int]] = []
        self.waits: List[Tuple[str, int, float]] = []  # (phase, sessions, the longest wait) a batch
        self.registry.batcher.report = self._report
        kind = TwoPartSession if two_part else MiddleSession
        self.sessions = []
        for i in range(n):
            config = _config(model, i, two_part, lora_rank)
            base = BASES[model]
            shared = self.registry._shared(config, base)
            session = kind(f"s{i}", "edge", config, base, self.registry.host, shared)
            self.registry._hold(session, None)
            self.sessions.append(session)
        self.replies: Dict[int, List[torch.Tensor]] = {i: [] for i in range(n)}
        self.refused: List[Tuple[int, int, str]] = []

    def _report(self, phase: str, size: int, waits: List[float]) -> None:
        self.batches.append((phase, size))
        self.waits.append((phase, size, max(waits)))

    def go(self, bad=None, stop=None, ids: Optional[List[int]] = None, leave=None) -> Run:
        """``leave(session)``: what the stopped session does as it stops (its stream ends, it closes)."""
        self.leave = leave
        ids = list(range(len(self.sessions))) if ids is None else ids
        barrier = threading.Barrier(len(ids))
        threads = [threading.Thread(target=self._drive, args=(i, barrier, bad, stop)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self

    def _drive(self, i: int, barrier: threading.Barrier, bad, stop) -> None:
        session, g = self.sessions[i], torch.Generator().manual_seed(100 + i)
        stopped = False
        for k in range(STEPS):
            x = torch.randn(ROWS * SEQ, session.width, generator=g)
            grad = torch.randn(ROWS * SEQ, session.width, generator=g)
            for phase in ("forward", "backward"):
                barrier.wait(timeout=60)
                if stopped or (phase == "backward" and isinstance(session, TwoPartSession)):
                    continue
                value = x if phase == "forward" else grad
                if bad == (i, k, phase):
                    value = value.sign() * HUGE[phase]
                try:
                    self.replies[i].append(self._send(session, k, phase, value))
                except ProtocolError as exc:
                    self.refused.append((i, k, exc.code.name))
                stopped = stop == (i, k, phase)
                if stopped and self.leave is not None:
                    self.leave(session)

    @staticmethod
    def _send(session, k: int, phase: str, value: torch.Tensor) -> torch.Tensor:
        tensor = codec.encode(value, pb.FLOAT32)
        lengths = [SEQ] * ROWS
        if isinstance(session, TwoPartSession):
            reply = session.train(pb.TrainStep(step=k, activations=tensor, lengths=lengths, labels=[0, 1, 1]))
            return codec.decode(reply.grad, name="grad")
        if phase == "forward":
            down = session.forward_up(pb.ForwardUp(step=k, activations=tensor, lengths=lengths))
            return codec.decode(down.activations, name="a2")
        return codec.decode(session.gradient_up(pb.GradientUp(step=k, grad=tensor)).grad, name="grad")

    def params(self, i: int) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.sessions[i].net2.parameters()]


def _assert_close(a: List[torch.Tensor], b: List[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("model", sorted(BASES))
def test_batched_u_steps_equal_solo_steps(model, n):
    """The U's middle: replies (â2 down, ∂â1 down) and parameters within 1e-6 of solo steps; the
    batches held every session (BERT: dropout on, each session's masks its own)."""
    solo = Run(model, n, window=0.0).go()
    batched = Run(model, n, window=5.0).go()
    assert ("forward", n) in batched.batches and ("backward", n) in batched.batches
    assert not solo.batches  # window 0: the batcher is not asked
    assert not batched.registry.batcher.solo_only  # every random draw was segmented
    for i in range(n):
        _assert_close(solo.replies[i], batched.replies[i])
        _assert_close(solo.params(i), batched.params(i))
        assert batched.sessions[i].next_step == STEPS


@pytest.mark.parametrize("model", sorted(BASES))
def test_batched_two_part_steps_equal_solo_steps(model):
    """Two-part net2 (each session's head on its rows): the gradients down and parameters."""
    solo = Run(model, 4, window=0.0, two_part=True).go()
    batched = Run(model, 4, window=5.0, two_part=True).go()
    assert ("step", 4) in batched.batches
    for i in range(4):
        _assert_close(solo.replies[i], batched.replies[i])
        _assert_close(solo.params(i), batched.params(i))


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_refused_member_leaves_the_others_as_a_batch_without_it(phase):
    """Session 2's message at step 1 overflows in the part (its output, or its gradients): it is
    refused and nothing of it changes; sessions 0 and 1 get bitwise what they get when session 2
    sends nothing from there on (its later messages are refused as out of order)."""
    with_bad = Run("random:tiny", 3, window=1.0).go(bad=(2, 1, phase))
    assert (2, 1, "INVALID_ARGUMENT") in with_bad.refused
    assert with_bad.sessions[2].next_step == 1
    stop = (2, 0, "backward") if phase == "forward" else (2, 1, "forward")
    without = Run("random:tiny", 3, window=1.0).go(stop=stop)
    assert (phase, 3) in with_bad.batches  # session 2's bad message was refused in a batch
    for i in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(with_bad.params(i), without.params(i)))
        assert len(with_bad.replies[i]) == 2 * STEPS
        assert all(torch.equal(a, b) for a, b in zip(with_bad.replies[i], without.replies[i]))


def test_a_refused_two_part_member_leaves_the_others_unchanged():
    """A non-finite loss in a batched two-part step: refused for that session alone."""
    with_bad = Run("random:tiny", 3, window=5.0, two_part=True).go(bad=(2, 1, "forward"))
    assert (2, 1, "INVALID_ARGUMENT") in with_bad.refused
    solo = Run("random:tiny", 3, window=0.0, two_part=True).go(bad=(2, 1, "forward"))
    for i in range(3):
        _assert_close(solo.params(i), with_bad.params(i))


def test_full_fine_tuning_sessions_step_alone():
    run = Run("random:tiny", 3, window=5.0, lora_rank=0).go()
    assert not run.batches
    assert not run.registry.batcher.takes(run.sessions[0])


def test_a_batch_holds_at_most_max_rows_sequences():
    """Two sessions' 3 sequences each fit a cap of 6; a cap of 5 steps them one at a time."""
    fits = Run("random:tiny-llama", 2, window=5.0, max_rows=6).go()
    assert max(size for _, size in fits.batches) == 2
    capped = Run("random:tiny-llama", 2, window=0.05, max_rows=5).go()
    assert max(size for _, size in capped.batches) == 1
    _assert_close(fits.params(1), capped.params(1))


def test_a_dropped_step_stops_its_batch_waiting_for_it():
    """A restore drops a forward whose gradient never came: its batch's graph no longer waits for it."""
    run = Run("random:tiny", 2, window=1.0).go(stop=(1, 2, "forward"))
    session = run.sessions[1]
    graph = session._pending[3]
    assert graph is not None and graph.waiting == {id(session)}
    session._drop_pending()
    assert not graph.waiting


@pytest.mark.parametrize("model", sorted(BASES))
def test_a_session_gone_mid_batch_leaves_the_others_as_without_it(model):
    """Session 2's stream dies with its forward of step 1 batched and its backward due (the
    in-process kill -9; tests/test_batcher_grpc.py kills a real edge): sessions 0 and 1 end
    bitwise as two sessions batched without it, and its graph waits for it no longer than a window."""
    gone = Run(model, 3, window=1.0).go(stop=(2, 1, "forward"))
    two = Run(model, 2, window=1.0).go()
    assert ("forward", 3) in gone.batches and ("backward", 2) in gone.batches
    for i in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(gone.params(i), two.params(i)))
        assert len(gone.replies[i]) == len(two.replies[i]) == 2 * STEPS
        assert all(torch.equal(a, b) for a, b in zip(gone.replies[i], two.replies[i]))
        assert gone.sessions[i].next_step == STEPS
    assert gone.sessions[2]._pending[3].waiting == {id(gone.sessions[2])}


@pytest.mark.parametrize(
    "how, stop",
    [
        ("stream-ended", (2, 0, "backward")),
        ("closed", (2, 0, "backward")),
        ("stream-ended", (2, 1, "forward")),
    ],
    ids=["stream-ended", "closed", "stream-ended-mid-step"],
)
def test_a_session_gone_is_not_waited_for(how, stop):
    """Three sessions with streams attached step together; session 2 stops (after step 0, or with
    its forward of step 1 batched and its backward due) and its stream ends (its edge killed or cut
    off) or it closes: the others' later batches close as soon as both are in, instead of waiting
    the window (5 s) for it every batch."""
    run = Run("random:tiny-llama", 3, window=5.0)
    for session in run.sessions:
        session.core.attached = 1

    def leave(session) -> None:
        if how == "closed":
            run.registry.close(session.session_id)
        else:
            session.core.attached = 0

    run.go(stop=stop, leave=leave)
    later = 1 if stop[1] == 1 else STEPS - 1  # forward batches of two: step 2 (or steps 1 and 2)
    pairs = [wait for phase, size, wait in run.waits if phase == "forward" and size == 2]
    assert len(pairs) >= later and max(pairs[-later:]) < 2.5
    if stop[1] == 1:  # step 1's backward batch: its forward held session 2 too
        assert max(wait for phase, size, wait in run.waits if phase == "backward" and size == 2) < 2.5
    assert all(s.next_step == STEPS for s in run.sessions[:2])
