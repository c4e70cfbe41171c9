"""What every cloud session shares, whatever its steps: exactly-once application, fencing, checkpoints.

A step handler (``two_part.TwoPartSession``, ``middle.MiddleSession``) builds its net2 and holds a
``SessionCore`` over it. The core applies each training message exactly once (the session's
lock, the inference-only refusal, the lease's fence, the cached reply of a repeat, the order
check), completes a step (the optimizer, the schedule, the replies kept), and owns what outlives
a step: checkpoints, resume, the final weights. It knows nothing of the messages' contents.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, TypeVar

import grpc
import torch

from sft_cloud.sessions.batcher import StepBatcher
from sft_cloud.sessions.host import DEFAULT_HOST, SessionHost
from sft_cloud.sessions.validation import invalid
from sft_common.proto import sft_pb2 as pb
from sft_common.storage import checkpoint
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_common.wire import codec
from sft_common.wire.delta import DeltaCaches
from sft_common.wire.errors import ProtocolError

R = TypeVar("R")


class SessionCore:
    """One session's identity, net2, optimizer and step state; applies its training messages exactly once."""

    def __init__(
        self,
        session_id: str,
        owner: str,
        config: pb.SessionConfig,
        fingerprint: str,
        net2: torch.nn.Module,
        factors: List[torch.nn.Parameter],
        host: SessionHost = DEFAULT_HOST,
        rolled_back: Callable[[], None] = lambda: None,
    ):
        """``factors``: net2's SVD factors (their own learning rate with ``factor_lr``).
        ``host``: its device, compute lock and checkpoint folder (its limits are checked before).
        ``rolled_back``: the handler drops its part-applied step (a restore calls it)."""
        self.session_id = session_id
        self.owner = owner  # the identity that opened it; only it may attach again
        self.config = config
        self.fingerprint = fingerprint
        self.net2 = net2
        self.device = host.device
        self.optimizer = make_optimizer(
            net2.parameters(),
            config.lr,
            config.weight_decay,
            factors=factors,
            factor_lr=config.factor_lr or None,
        )
        self.schedule = make_schedule(self.optimizer, config.warmup_steps, config.total_steps)
        self._rolled_back = rolled_back
        self.next_step = 0
        # Replies to every applied message of the step in progress and of the last completed
        # step, keyed by (step, part) (a micro-batch, or a phase of the U): a message the edge
        # re-sends after a broken link is answered from here.
        self.replies: Dict[Tuple[int, int], Any] = {}
        self.completed: Optional[int] = None  # the last completed step whose replies are all cached
        self.last_reply: Any = None  # the most recent reply (tests, metrics)
        self.replayed = 0  # retried messages answered from the cache instead of applied again
        self.inference_only = False  # a finished session reopened: evaluations and export only
        self.final_path: Optional[str] = None  # its final weights, once reopened (sessions.finished)
        self.final_digest: Optional[str] = None  # their SHA-256, computed at the first fetch
        self.bytes_received = self.bytes_sent = 0  # serialized messages of all its streams
        self.lock = threading.Lock()  # one message at a time per session
        self.attached = 0  # open streams on this session (idle eviction skips attached ones)
        self.last_active = time.monotonic()
        # <checkpoint_dir>/<session id>/: step-<k>.safetensors and, at close, final.safetensors.
        # None: the daemon runs without --checkpoint-dir and keeps no checkpoints.
        self.dir = os.path.join(host.checkpoint_dir, session_id) if host.checkpoint_dir else None
        self.ckpts = CheckpointDir(self.dir) if self.dir else None  # the newest 3 are kept
        # Raises (ABORTED) once another replica took the session over (sft_cloud.daemon.lease):
        # before a step is applied and final.safetensors written; a lease's FencedCheckpointDir
        # checks too.
        self.fence: Callable[[], None] = lambda: None
        # Dropout draws from the process-wide RNG; seeding it per step and computing under one
        # lock makes each step's randomness a function of (seed, step) alone.
        self.compute_lock = host.compute_lock or threading.Lock()
        self.batcher: Optional[StepBatcher] = None  # batches its steps with others' (None: alone)
        self.delta: Optional[DeltaCaches] = None  # delta mode's caches (set by the handler), checkpointed

    # -- a training message, exactly once ---------------------------------------------------

    def apply(
        self, key: Tuple[int, int], out_of_order: Callable[[], Optional[str]], compute: Callable[[], R]
    ) -> R:
        """Apply the training message ``key`` = (step, part) exactly once and return its reply.

        A repeat of an applied message gets its cached reply; ``out_of_order`` says why a new
        one cannot be applied now (None: it can); ``compute`` validates and applies it, and
        changes nothing when it raises."""
        with self.lock:
            self.check_trainable()
            self.fence()
            cached = self.replies.get(key)
            if cached is not None:
                self.replayed += 1
                return cached
            refusal = out_of_order()
            if refusal is not None:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            reply = compute()
            self.replies[key] = reply
            self.last_reply = reply
            return reply

    def backward(
        self, out: torch.Tensor, grad: Optional[torch.Tensor], x: torch.Tensor, what: str
    ) -> torch.Tensor:
        """``out.backward(grad)`` into net2's gradients; returns ∂/∂``x`` (the cut's gradient).

        A finite loss of huge but finite activations can still overflow its gradients: when any
        is not finite the message is refused and net2's gradients are put back as they were
        (earlier micro-batches' included), so nothing is applied."""
        saved = self.grads()
        out.backward(grad)
        if self.grads_finite(x):
            assert x.grad is not None
            return x.grad
        self.put_back(saved, x)
        raise self.not_finite(what)

    def params(self) -> List[torch.nn.Parameter]:
        """What its optimizer trains."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def grads(self) -> Optional[List[Optional[torch.Tensor]]]:
        """Copies of its gradients to put back after a refused backward (None: none accumulating)."""
        params = self.params()
        return (
            [None if p.grad is None else p.grad.clone() for p in params] if self.has_grads(params) else None
        )

    def put_back(self, saved: Optional[List[Optional[torch.Tensor]]], x: Optional[torch.Tensor]) -> None:
        """Its gradients as ``grads`` saved them; the input ``x``'s gradient dropped."""
        params = self.params()
        for p, grad in zip(params, saved or [None] * len(params)):
            p.grad = grad
        if x is not None:
            x.grad = None

    def grads_finite(self, x: Optional[torch.Tensor]) -> bool:
        """Whether a backward left the input ``x`` a gradient and every gradient finite."""
        grads = [p.grad for p in self.params() if p.grad is not None]
        return (
            x is not None
            and x.grad is not None
            and all(bool(torch.isfinite(g).all()) for g in [x.grad, *grads])
        )

    @staticmethod
    def not_finite(what: str) -> ProtocolError:
        """The refusal of a message whose gradients overflowed."""
        return invalid(f"{what}: the gradients are not finite (activations too large?); nothing was applied")

    @staticmethod
    def has_grads(params: Sequence[torch.Tensor]) -> bool:
        """Whether gradients are accumulating (a step's later micro-batch), so must be kept."""
        return any(p.grad is not None for p in params)

    def complete(self, step: int) -> None:
        """Step ``step``'s gradients are all in: update net2; keep only this step's replies."""
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.replies = {k: r for k, r in self.replies.items() if k[0] == step}
        self.completed = step
        self.next_step += 1

    def expected(self, what: str) -> str:
        """The end of an out-of-order refusal: what the session expects, and the retry it accepts."""
        retry = f" (or a retry of step {self.completed})" if self.completed is not None else ""
        return f"the session expects {what}{retry}"

    @contextlib.contextmanager
    def rng(self, step: int, micro: int = 0) -> Iterator[None]:
        """Compute under the daemon's compute lock, with the RNG seeded by (seed, step, micro)."""
        with self.compute_lock:
            torch.manual_seed(self.seed(step, micro))
            yield

    def seed(self, step: int, micro: int = 0) -> int:
        """The RNG seed of a step's compute (a batched step's member draws from its own stream)."""
        return step_seed(self.config.seed, "cloud", step, micro)

    def batched(self, session: Any) -> Optional[StepBatcher]:
        """The batcher that runs ``session``'s steps, when they may be batched (None: alone)."""
        return self.batcher if self.batcher is not None and self.batcher.takes(session) else None

    def check_trainable(self) -> None:
        if self.inference_only:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this finished session was reopened for inference only: no step can change it",
            )

    def opened(self, step: int, micro: int, edge_factor: Optional[torch.Tensor]) -> pb.SessionOpened:
        """The answer to an open that goes on at (``step``, ``micro``)."""
        factor = None if edge_factor is None else codec.encode(edge_factor, pb.FLOAT32)
        return pb.SessionOpened(
            session_id=self.session_id,
            fingerprint=self.fingerprint,
            edge_factor=factor,
            next_step=step,
            next_micro=micro,
            delta_cache_bytes=self.config.delta_cache_bytes,
        )

    # -- checkpoints, resume, final weights -------------------------------------------------

    def checkpoint(self, msg: pb.Checkpoint, part_applied: Callable[[], Optional[str]]) -> pb.CheckpointDone:
        """Write the state after ``msg.step`` steps; the edge writes its own after this answer.
        ``part_applied`` says why the step in progress cannot be saved yet (None: it can)."""
        with self.lock:
            self.check_trainable()
            if self.ckpts is None:
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the daemon runs without --checkpoint-dir, so it cannot checkpoint sessions",
                )
            refusal = part_applied()
            if refusal is None and msg.step != self.next_step:
                refusal = f"checkpoint at step {msg.step}, but the session is at step {self.next_step}"
            if refusal is not None:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            self.save_checkpoint()
            return pb.CheckpointDone(step=msg.step)

    def save_checkpoint(self) -> str:
        """Checkpoint the state after ``next_step`` whole steps (caller holds the lock); older
        ones past the newest 3 are removed. Gradients of a partly applied step are not saved:
        after a restore the edge sends that step again from its start."""
        assert self.ckpts is not None
        return self.ckpts.save_state(
            self.next_step,
            self.net2,
            self.optimizer,
            self.schedule,
            self.delta.state() if self.delta is not None else None,
            session_id=self.session_id,
            owner=self.owner,
            fingerprint=self.fingerprint,
            config=self.config.SerializeToString().hex(),
        )

    def restore(self, step: int) -> None:
        """Roll the whole session state back (or forward, after a restart) to checkpoint ``step``."""
        assert self.ckpts is not None
        tensors, meta = self.ckpts.load(step, device=self.device)
        if meta["fingerprint"] != self.fingerprint:
            raise ProtocolError(grpc.StatusCode.DATA_LOSS, f"checkpoint {step} belongs to another model")
        checkpoint.unpack(tensors, meta, self.net2, self.optimizer, self.schedule)
        if self.delta is not None:
            self.delta.load({k: v.cpu() for k, v in tensors.items() if k.startswith("delta/")})
        self.optimizer.zero_grad(set_to_none=True)  # a partly accumulated step is dropped
        self.next_step = int(meta["step"])
        self.replies, self.completed, self.last_reply = {}, None, None
        self._rolled_back()

    def resume(self, steps: Sequence[int]) -> Tuple[int, bool]:
        """Pick the first of the edge's candidate steps this session can continue from.

        Returns (step, restored). The live state serves step ``next_step`` (parts of it the edge
        sends again are answered from the cache), and also the step before it when its replies
        are cached; any other step needs a checkpoint of this session.
        """
        with self.lock:
            held = sorted(self.ckpts.steps()) if self.ckpts else []  # ascending, for the message
            for step in steps:
                if step == self.next_step:
                    return step, False
                if step == self.next_step - 1 and step == self.completed:
                    return step, False
                if step in held:
                    self.restore(step)
                    return step, True
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot resume at any of the steps {list(steps)}: the cloud session is at step "
                f"{self.next_step} and holds checkpoints at {held or 'no steps'}",
            )

    def save_final(self) -> Optional[str]:
        """At close: net2's trained weights as ``final.safetensors``; step checkpoints are removed."""
        if self.ckpts is None:
            return None
        self.fence()
        path = os.path.join(self.ckpts.folder, "final.safetensors")
        state = checkpoint.owned_state(self.net2)  # with LoRA: adapters, factors, head; not the base
        # Flat string metadata, not a checkpoint's ``sft`` JSON: readers of the final weights take
        # step and fingerprint straight from the header.
        meta = {"step": str(self.next_step), "fingerprint": self.fingerprint, "replayed": str(self.replayed)}
        meta.update(owner=self.owner, config=self.config.SerializeToString().hex())  # to reopen it
        checkpoint.save_atomic(path, state, meta)
        self.ckpts.clear()
        return path

    def touch(self) -> None:
        self.last_active = time.monotonic()


def not_its_step(message: str) -> ProtocolError:
    """The refusal of a training message of another kind of session (``train`` to the U's middle)."""
    return ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, message)


class FromCore:
    """A step handler's attribute that is its core's: ``session.next_step`` reads ``session.core.next_step``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, session: Any, owner: Optional[type] = None) -> Any:
        if session is None:
            return self
        return getattr(session.core, self.name)


class CoreAttributes:
    """What the registry, logs and tests read of a session, forwarded to its ``core`` (the step
    handlers hold a ``SessionCore`` and add nothing to these)."""

    session_id = FromCore()
    owner = FromCore()
    fingerprint = FromCore()
    net2 = FromCore()
    optimizer = FromCore()
    next_step = FromCore()
    replies = FromCore()
    last_reply = FromCore()
    replayed = FromCore()
    attached = FromCore()


class Session(Protocol):
    """What the registry, the stream protocol and the daemon ask of a session, whatever its steps."""

    core: SessionCore
    config: pb.SessionConfig
    device: str

    @property
    def net2(self) -> torch.nn.Module: ...

    def describe(self) -> str:
        """What it trains, for the daemon's log."""
        ...

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        """The answer to an open; ``at``: the step ``core.resume`` chose."""
        ...

    def step(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        """A training message (``train``, ``forward_up``, ``gradient_up``), or a refusal of a kind
        that is not this session's."""
        ...

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """Forward only, no state changes."""
        ...

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        """Save the state after ``msg.step`` whole steps."""
        ...
