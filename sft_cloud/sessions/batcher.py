"""The step batcher: steps of LoRA sessions that share a frozen base, run as one forward and one backward.

Sessions of one model, split and LoRA targets (and, two-part, label count) hold one frozen base
(``sft_common.models.shared``). A step of one of them that arrives within ``window`` seconds of
another's in the same phase, with inputs of the same sequence length, joins its batch, up to
``max_rows`` sequences. The first to arrive leads: it runs the batch under the daemon's compute
lock once the batch is full, holds every session seen stepping lately, or has had no step join
it for a window; the others wait for their result. A session alone steps at once. The batch is
one forward through a ``SegmentedPart`` (each session's adapters, factors and head on its own
rows, each its own RNG stream) and one ``torch.autograd.backward`` whose leaves are the members'
own parameters and inputs, so each member's gradients are those of its solo step. The optimizer step, the replies, exactly-once, fencing and checkpoints stay each
session's own (``SessionCore``): the batcher computes, the session applies.

A member refused in the batch (a non-finite output, loss or gradient) changes nothing of its
own, and the batch runs again without it: the others get what a batch without it gives. A batch
of one, a full fine-tuning session, or a part that draws random numbers the segmented forward
cannot give each member (``Segments.clean``) runs the solo step, as the daemon always did.

The U's two phases: ``forward`` leaves a ``BatchGraph``, and the members' ``backward`` calls batch
on it (the graph is kept until each member has run its backward or dropped its step).

Forward-only sessions' evaluations (``evaluate``) fill batches the same way: those of one frozen
middle, side width and input shape run as one forward of the first member's part (every tensor
of it is the others' too), without gradient or random draws, each member's rows split off again:
each member's answer is its solo evaluation's.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from sft_common.models.segmented import SegmentedPart, Segments
from sft_common.wire.errors import ProtocolError

log = logging.getLogger("sft_cloud")

# A session that stepped this recently is waited for (for the window at most, so one that left
# without a word costs its peers a window a batch until then); long, since a CPU step of a big
# part takes seconds. One that closed, or whose stream ended (its edge killed or cut off), is not.
SEEN_SECONDS = 600.0
# A part whose batched forward drew random numbers outside its members' streams this many times
# steps alone from then on (once could be another thread's draw: an edge in the same process).
TRIPS = 3
Report = Callable[[str, int, List[float]], None]  # (phase, sessions in the batch, each one's wait in s)


class BatchGraph:
    """The autograd graph of a batched U forward: its members whose backward is still due."""

    def __init__(self, members: Sequence[Job]):
        self.waiting: Set[int] = {id(m.session) for m in members}
        self._members = {id(m.session): Seen.of(m) for m in members}

    def leave(self, member: Any) -> None:
        """``member`` ran its backward, or dropped its step: the others stop waiting for it."""
        self.waiting.discard(id(member))

    def due(self) -> int:
        """Members whose backward is still due and that are still there (a stream that ended
        since the forward, its edge killed or cut off, is not waited for)."""
        return sum(not self._members[m].gone() for m in self.waiting)


@dataclass
class Job:
    """One session's message in a batch: what it brings, and what it gets back."""

    session: Any  # its step handler: ``core`` (optimizer, grads) and ``net2``
    seed: int  # the seed its solo step sets (``training.step_seed``)
    inputs: Tuple[torch.Tensor, ...]  # net2's input, (batch, seq, width) first; batch rows on dim 0
    finish: Callable[[Any], Any]  # its rows of net2's output -> its result; raises to refuse it alone
    x: Optional[torch.Tensor] = None  # the cut's activations as received: its gradient goes down
    what: str = ""  # names the message in a refusal ("step 3 micro-batch 1")
    roots: Any = None  # what its backward starts from (the U: â2 rows; two-part: set by ``finish``)
    grad: Optional[torch.Tensor] = None  # ∂loss/∂roots (None: a scalar loss)
    graph: Optional[BatchGraph] = None  # the U: the batch its forward ran in (None: alone)
    result: Any = None
    error: Optional[BaseException] = None
    queued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0


@dataclass
class Seen:
    """A session's last step in a batch key: when, and whether a stream was attached then."""

    when: float
    session: weakref.ref[Any]
    streamed: bool

    @classmethod
    def of(cls, job: Job) -> Seen:
        return cls(job.queued, weakref.ref(job.session), bool(job.session.core.attached))

    def gone(self) -> bool:
        """Whether it is gone: collected, or its stream ended since (a session driven without a
        stream, as in a benchmark, never is)."""
        session = self.session()
        return session is None or (self.streamed and not session.core.attached)


@dataclass
class Group:
    """The jobs of one batch while it fills."""

    deadline: float  # closes then unless full: a window after the last step joined it
    jobs: List[Job] = field(default_factory=list)
    rows: int = 0
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class StepBatcher:
    """Batches concurrent LoRA sessions' steps through their shared frozen base (see the module)."""

    def __init__(
        self, window: float = 0.005, max_rows: int = 256, compute_lock: Optional[threading.Lock] = None
    ):
        """``window``: seconds a batch waits for more steps (0: every step alone, as before);
        ``max_rows``: sequences a batch holds at most."""
        self.window = window
        self.max_rows = max_rows
        self.compute_lock = compute_lock or threading.Lock()
        self.report: Report = lambda phase, size, waits: None  # the daemon's metrics
        self._cond = threading.Condition()
        self._open: Dict[Any, Group] = {}
        self._seen: Dict[Any, Dict[int, Seen]] = {}  # key -> {id(session): its last step}
        self._parts: Dict[Any, SegmentedPart] = {}
        self._trips: Dict[Any, int] = {}  # batches of a part that drew outside its members' streams
        self.solo_only: Set[Any] = set()  # parts whose random draws cannot be segmented: steps alone

    def takes(self, session: Any) -> bool:
        """Whether ``session``'s steps may be batched: LoRA on a shared base, and a window."""
        return self.window > 0 and getattr(session, "lora", None) is not None and _frozen(session) is not None

    # -- the phases ----------------------------------------------------------------------------

    def forward(self, job: Job) -> Tuple[Any, Optional[BatchGraph]]:
        """The U's forward: ``job.finish``'s result, and the graph its backward batches on (None:
        it ran alone, its backward runs alone too)."""

        def run(jobs: List[Job]) -> None:
            live = self._forward(jobs)
            if len(live) > 1:
                graph = BatchGraph(live)
                for member in live:
                    member.graph = graph

        result = self._submit(("forward", *self._key(job)), job, run, self._expected)
        return result, job.graph

    def backward(self, graph: BatchGraph, job: Job) -> None:
        """The U's backward of a member of ``graph``: ``job.grad`` through ``job.roots`` into its
        parameters' gradients and ``job.x.grad``."""
        try:
            self._submit(("backward", id(graph)), job, self._backward, lambda _: graph.due())
        finally:
            if job.error is None:
                graph.leave(job.session)

    def evaluate(self, job: Job) -> Any:
        """A forward-only evaluation, with others' on the same frozen middle (``job.session.forward``
        on the inputs, (batch, seq, width) and the mask, of all of them); ``job.finish``'s result."""
        s = job.session
        key = ("eval", type(s).__name__, _frozen(s), s.config.side_width, tuple(job.inputs[0].shape[1:]))
        return self._submit(key, job, _evaluate, self._expected)

    def step(self, job: Job) -> Any:
        """A two-part step: forward, then backward from ``finish``'s loss (``job.roots``) into its
        parameters' gradients and ``job.x.grad``; returns ``finish``'s result."""
        return self._submit(("step", *self._key(job)), job, self.compute, self._expected)

    # -- computing a batch (under the compute lock) --------------------------------------------

    def compute(self, jobs: List[Job]) -> None:
        """What a two-part batch's leader runs: ``jobs``' forward, batched when they can be, then
        one backward from the ``roots`` (and ``grad``) their ``finish`` set; a refused job gets its
        error, and the others run again without it. The caller holds the compute lock."""
        live = jobs
        while live:
            live = self._forward(live)
            if self._backward(live, again=False):
                return
            live = [j for j in live if j.error is None]

    def _forward(self, jobs: List[Job]) -> List[Job]:
        """Every job's forward, batched when it can be; returns those not refused."""
        key = self._key(jobs[0])[:-1]  # the part's (not the input's shape)
        live = list(jobs)
        while len(live) > 1 and key not in self.solo_only:
            part = self._parts.get(key) or self._parts.setdefault(key, SegmentedPart(live[0].session.net2))
            seg = Segments([j.rows for j in live], [j.seed for j in live], jobs[0].session.device)
            for job in live:
                if not job.session.net2.training:  # (train() walks every module: not each step)
                    job.session.net2.train()
            out = part(
                [j.session.net2 for j in live], seg, *[torch.cat(t) for t in zip(*(j.inputs for j in live))]
            )
            if not seg.clean():  # this batch runs alone; after a few, every batch of this part
                self._trips[key] = self._trips.get(key, 0) + 1
                if self._trips[key] >= TRIPS:
                    self.solo_only.add(key)
                    log.warning(
                        "step batcher: %s draws random numbers it cannot segment: steps alone", key[0]
                    )
                break
            refused = [j for i, j in enumerate(live) if not _finish(j, seg.part(out, i))]
            if not refused:
                return live
            live = [j for j in live if j not in refused]  # again without them: as if never sent
            for job in live:
                job.result = None
        for job in live:  # alone, as the daemon always ran a step
            torch.manual_seed(job.seed)
            job.session.net2.train()
            _finish(job, job.session.net2(*job.inputs))
        return [j for j in live if j.error is None]

    def _backward(self, jobs: List[Job], again: bool = True) -> bool:
        """One backward for every job; a job whose gradients are not finite is refused and has its
        gradients put back, the others' too, and the backward runs again without it. Returns
        whether no job was refused (``again`` False: the caller runs the forward again first)."""
        live = [j for j in jobs if j.error is None]
        while live:
            saved = [j.session.core.grads() for j in live]
            leaves = [t for j in live for t in [*j.session.core.params(), j.x]]
            # The graph is kept: a refused member's batch runs again without it (and, the U, the
            # members whose gradient comes later run theirs on it).
            torch.autograd.backward([j.roots for j in live], [j.grad for j in live], True, inputs=leaves)
            refused = [j for j in live if not j.session.core.grads_finite(j.x)]
            if not refused:
                return True
            for job, s in zip(live, saved):
                job.session.core.put_back(s, job.x)
            for job in refused:
                job.error = job.session.core.not_finite(job.what)
            if not again:
                return False
            live = [j for j in live if j not in refused]
        return True

    # -- filling a batch -----------------------------------------------------------------------

    def _submit(
        self, key: Any, job: Job, run: Callable[[List[Job]], Any], expected: Callable[[Any], int]
    ) -> Any:
        """Add ``job`` to the open batch of ``key`` (or open one and lead it); return its result."""
        with self._cond:
            if key[0] != "backward":
                self._seen.setdefault(key[1:], {})[id(job.session)] = Seen.of(job)
            group = self._open.get(key)
            lead = group is None or group.rows + job.rows > self.max_rows
            if lead:
                if group is not None:
                    self._close(key, group)
                group = self._open[key] = Group(deadline=job.queued + self.window)
            assert group is not None
            group.jobs.append(job)
            group.rows += job.rows
            # Open while steps keep coming: each one's arrival holds it a window longer (steps
            # decoded one after another under the GIL arrive spread over more than one window).
            group.deadline = max(group.deadline, job.queued + self.window)
            if group.rows >= self.max_rows or len(group.jobs) >= expected(key):
                self._close(key, group)
            while lead and not group.closed:
                left = group.deadline - time.monotonic()
                if left <= 0:
                    self._close(key, group)
                else:
                    self._cond.wait(left)
        if lead:
            self._lead(key[0], group, run)
        else:
            group.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self, phase: str, group: Group, run: Callable[[List[Job]], Any]) -> None:
        try:
            with self.compute_lock:
                start = time.monotonic()
                run(group.jobs)
            self.report(phase, len(group.jobs), [start - j.queued for j in group.jobs])
        except BaseException as exc:  # a fault of the batch, not of one member: each is told
            for job in group.jobs:
                job.error = job.error or exc
            raise
        finally:
            group.done.set()

    def _close(self, key: Any, group: Group) -> None:
        group.closed = True
        if self._open.get(key) is group:
            del self._open[key]
        self._cond.notify_all()

    def _expected(self, key: Any) -> int:
        """Sessions of this key that stepped lately and are still there: a batch that holds them
        all waits no longer."""
        seen = self._seen.get(key[1:], {})
        now = time.monotonic()
        for session, last in list(seen.items()):
            if now - last.when > SEEN_SECONDS or last.gone():
                del seen[session]
        return len(seen)

    def forget(self, session: Any) -> None:
        """``session`` closed or was evicted (the registry tells; None: nothing): its peers'
        batches wait for it no more."""
        if session is None:
            return
        with self._cond:
            for seen in self._seen.values():
                seen.pop(id(session), None)

    @staticmethod
    def _key(job: Job) -> Tuple[Any, ...]:
        """What members of one batch share: the part's kind and frozen base, its adapters' targets,
        its label count (a two-part head's width) and the input's shape past the batch."""
        s = job.session
        return (
            type(s).__name__,
            _frozen(s),
            s.lora.targets,
            s.config.num_labels,
            tuple(job.inputs[0].shape[1:]),
        )


def _frozen(session: Any) -> Optional[int]:
    """Which frozen base ``session``'s part is built on (None: it has none: full fine-tuning)."""
    frozen = next((p for p in session.net2.parameters() if not p.requires_grad), None)
    return None if frozen is None else id(frozen)


def _evaluate(jobs: List[Job]) -> None:
    """The leader of an evaluation batch: one forward of every member's inputs, without gradient,
    through the first member's part (they share all its tensors); each member finishes its rows."""
    inputs = [torch.cat(t) for t in zip(*(j.inputs for j in jobs))] if len(jobs) > 1 else jobs[0].inputs
    with torch.no_grad():
        out = jobs[0].session.forward(*inputs)
    start = 0
    for job in jobs:
        _finish(job, _rows(out, start, start + job.rows))
        start += job.rows


def _rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` (dim 0) of a tensor, or of each tensor of a tuple (None stays None)."""
    if isinstance(value, tuple):
        return tuple(_rows(v, start, stop) for v in value)
    return None if value is None else value[start:stop]


def _finish(job: Job, out: Any) -> bool:
    """``job.finish`` on its output; a refusal is the job's alone. Returns whether it was taken."""
    try:
        job.result = job.finish(out)
        return True
    except ProtocolError as exc:
        job.error = exc
        return False
