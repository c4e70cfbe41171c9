"""One cloud training session: net2, its optimizer and step counter, driven by protocol messages.

A ``CloudSession`` is a plain class: a test drives it with ``pb`` messages and no network. Every
message is validated completely before anything changes, so a refused message (a
``ProtocolError``) leaves the session exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import torch

from sft_cloud.sessions.validation import check_config, decode_factors, invalid
from sft_common.cuts.input_cut import InputTail
from sft_common.models.base_model import BaseModel
from sft_common.models.lora import apply_lora, head_parameters, lora_from_config, share_frozen
from sft_common.proto import sft_pb2 as pb
from sft_common.storage import checkpoint
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import PLAIN, session_fingerprint
from sft_common.topology.two_part import (
    SVDTail,
    build_cloud_half,
    factor_parameters,
    lengths_to_mask,
    task_loss,
)
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError


class CloudSession:
    """net2 of one edge's run, with its optimizer; applies each training step exactly once."""

    net2: torch.nn.Module  # a CloudHalf; a MiddleSession's: the U's middle
    edge_factor: Optional[torch.Tensor]  # u for the edge (SessionOpened.edge_factor); None: none sent

    def __init__(
        self,
        session_id: str,
        owner: str,
        config: pb.SessionConfig,
        base: BaseModel,
        device: str = "cpu",
        compute_lock: Optional[threading.Lock] = None,
        max_batch: int = 256,
        max_seq: int = 512,
        checkpoint_dir: Optional[str] = None,
        shared_base: Optional[Dict[str, torch.nn.Parameter]] = None,
        cloud_factors: Optional[Tuple[pb.Tensor, pb.Tensor]] = None,
    ):
        """``shared_base``: with LoRA, the frozen parameters of every session of this model and
        split (filled by the first; later sessions use its tensors instead of their own copies).
        ``cloud_factors``: Σ and v as the edge computed them (a new calibrated session; checked
        by ``validation.given_factors``), used instead of this side's SVD."""
        self.session_id = session_id
        self.owner = owner  # the identity that opened it; only it may attach again
        self.config = config
        self.spec = check_config(config, base, max_batch, max_seq)
        self.device = device
        self.lora = lora_from_config(config, base)
        lora = self.lora.as_dict() if self.lora else None
        tail_layers = config.tail_layers if config.label_private else None  # the U-shape's
        self.fingerprint = session_fingerprint(
            base.fingerprint, self.spec, config.num_labels, lora, tail_layers
        )
        self.width = self.spec.cut_width(base.hidden_size)
        given = None if cloud_factors is None else decode_factors(cloud_factors, self.spec, base.hidden_size)
        factors = self._build(base, device)
        if self.spec.init != PLAIN:  # the edge computed u: the cloud's would be the plain SVD's
            self.edge_factor = None
        if given is not None:  # (without: rebuilt from a checkpoint, which restores them)
            self._use_factors(*given)
        if self.lora is not None:  # adapters; Σ, v and the head trainable; the base frozen, shareable
            try:
                self._adapt(factors)
            except ValueError as exc:  # PEFT: no module of that name to adapt
                raise invalid(f"--lora-targets: {exc}") from None
            if shared_base is not None:
                share_frozen(self.net2, shared_base)
        self.optimizer = make_optimizer(
            self.net2.parameters(), config.lr, config.weight_decay,
            factors=factors, factor_lr=config.factor_lr or None,
        )  # fmt: skip
        self.schedule = make_schedule(self.optimizer, config.warmup_steps, config.total_steps)
        self.next_step = 0
        self.next_micro = 0  # micro-batches of next_step applied so far (gradients accumulated)
        self._plan: Optional[Tuple[int, int]] = None  # (micro_count, step_examples) of next_step
        self._seen = 0  # examples of next_step applied so far
        # Replies to every applied (step, micro) of the step in progress and of the last completed
        # step: a message the edge re-sends after a broken link is answered from here.
        self.replies: Dict[Tuple[int, int], Any] = {}  # MiddleSession: (step, phase)
        self.completed: Optional[int] = None  # the last completed step whose replies are all cached
        self.last_reply: Optional[pb.TrainReply] = None  # the most recent reply (tests, metrics)
        self.replayed = 0  # retried messages answered from the cache instead of applied again
        self.inference_only = False  # a finished session reopened: evaluations and export only
        self.bytes_received = self.bytes_sent = 0  # serialized messages of all its streams
        self.lock = threading.Lock()  # one message at a time per session
        self.attached = 0  # open streams on this session (idle eviction skips attached ones)
        self.last_active = time.monotonic()
        # <checkpoint_dir>/<session id>/: step-<k>.safetensors and, at close, final.safetensors.
        # None: the daemon runs without --checkpoint-dir and keeps no checkpoints.
        self.dir = os.path.join(checkpoint_dir, session_id) if checkpoint_dir else None
        self.ckpts = CheckpointDir(self.dir) if self.dir else None  # the newest 3 are kept
        # Raises (ABORTED) once another replica took the session over (sft_cloud.daemon.lease): before a
        # step is applied and final.safetensors written; a lease's FencedCheckpointDir checks too.
        self.fence: Callable[[], None] = lambda: None
        # Dropout draws from the process-wide RNG; seeding it per step and computing under one
        # lock makes each step's randomness a function of (seed, step) alone.
        self._compute_lock = compute_lock or threading.Lock()

    def _build(self, base: BaseModel, device: str) -> List[torch.nn.Parameter]:
        """net2 and the edge's factor (``MiddleSession``: the U's middle); returns its SVD factors."""
        self.net2, self.edge_factor = build_cloud_half(
            base, self.spec, self.config.num_labels, self.config.seed, device=device
        )
        return factor_parameters(self.net2)

    @torch.no_grad()
    def _use_factors(self, sigma: Optional[torch.Tensor], v: torch.Tensor) -> None:
        """The edge's calibrated factors: Σ and v (R, hidden), or B = vᵀ at the FFN input."""
        tail = getattr(self.net2, "tail", None)
        if isinstance(tail, SVDTail) and sigma is not None:
            tail.sigma.copy_(sigma)
            tail.v.weight.copy_(v.t())
        else:
            assert isinstance(tail, InputTail) and sigma is None, "activation-aware init needs an SFT cut"
            tail.b.weight.copy_(v.t())

    def _adapt(self, factors: List[torch.nn.Parameter]) -> None:
        """LoRA on net2: adapters; Σ, v and the head stay trainable."""
        assert self.lora is not None
        apply_lora(self.net2, self.lora, self.config.seed, "cloud", factors + head_parameters(self.net2))

    # -- messages -------------------------------------------------------------------------

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        """The answer to an open. ``at``: the step ``resume`` chose; when it is the completed step
        before ``next_step``, the edge is told to go on there, its micro-batches all cached."""
        factor = None
        if self.edge_factor is not None:
            factor = codec.encode(self.edge_factor, pb.FLOAT32)
        step, micro = self.next_step, self.next_micro
        if at is not None and at != step:
            step, micro = at, sum(1 for s, _ in self.replies if s == at)
        return pb.SessionOpened(
            session_id=self.session_id,
            fingerprint=self.fingerprint,
            edge_factor=factor,
            next_step=step,
            next_micro=micro,
        )

    def train(self, msg: pb.TrainStep) -> pb.TrainReply:
        """Apply training step ``msg.step`` (or one micro-batch of it) exactly once: a repeat of
        an applied message gets its cached reply. The optimizer steps after the last micro-batch."""
        with self.lock:
            self._check_trainable()
            self.fence()
            cached = self.replies.get((msg.step, msg.micro))
            if cached is not None:
                self.replayed += 1
                return cached
            if msg.step != self.next_step or msg.micro != self.next_micro:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, self._out_of_order(msg))
            lengths = self._check_lengths(msg.lengths)
            count, examples = self._check_micro(msg, len(lengths))
            labels = self._check_labels(msg, len(lengths))
            x = self._decode_activations(msg.activations, lengths)
            with self._rng(self.next_step, msg.micro):
                self.net2.train()
                x.requires_grad_(True)
                logits = self.net2(self._unpack(x, lengths), self._mask(lengths))
                loss = task_loss(logits, labels)
                if not bool(torch.isfinite(loss)):
                    raise invalid(
                        f"step {msg.step} micro-batch {msg.micro}: the loss is not finite; "
                        "nothing was applied"
                    )
                # Each micro-batch's mean loss counts by its share of the step's examples, so the
                # accumulated gradients are those of the whole batch's mean loss.
                weighted = loss if examples == len(lengths) else loss * (len(lengths) / examples)
                weighted.backward()
            grad = x.grad
            assert grad is not None
            reply = pb.TrainReply(
                step=msg.step,
                loss=float(loss.detach()),
                grad=codec.encode(grad, self.config.wire_dtype, self.config.compression),
                micro=msg.micro,
            )
            if msg.micro == count - 1:  # the step is complete: update net2
                self.optimizer.step()
                self.schedule.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.replies = {k: r for k, r in self.replies.items() if k[0] == msg.step}
                self.completed = msg.step
                self.next_step += 1
                self.next_micro, self._plan, self._seen = 0, None, 0
            else:
                self.next_micro += 1
                self._plan = (count, examples)
                self._seen += len(lengths)
            self.replies[(msg.step, msg.micro)] = reply
            self.last_reply = reply
            return reply

    def _out_of_order(self, msg: pb.TrainStep) -> str:
        where = f"step {msg.step}" + (f" micro-batch {msg.micro}" if msg.micro else "")
        expected = f"step {self.next_step}" + (f" micro-batch {self.next_micro}" if self.next_micro else "")
        retry = f" (or a retry of step {self.completed})" if self.completed is not None else ""
        return f"{where} is out of order: the session expects {expected}{retry}"

    def _check_micro(self, msg: pb.TrainStep, n: int) -> Tuple[int, int]:
        """(micro_count, step_examples) of a message, checked against the step in progress."""
        count = msg.micro_count or 1
        examples = msg.step_examples or n
        limit = self.config.max_batch_size
        if not 1 <= count <= limit or not 1 <= examples <= limit:
            raise invalid(
                f"a step of {examples} examples in {count} micro-batches; the session allows "
                f"1..{limit} of each"
            )
        if msg.micro >= count:
            raise invalid(f"micro-batch {msg.micro} of a step of {count} micro-batches")
        if self._plan is not None and self._plan != (count, examples):
            raise invalid(
                f"micro-batch {msg.micro} says step {msg.step} has {count} micro-batches of "
                f"{examples} examples; micro-batch 0 said {self._plan[0]} of {self._plan[1]}"
            )
        after = count - msg.micro - 1  # micro-batches still to come, at least one example each
        if self._seen + n + after > examples or (after == 0 and self._seen + n != examples):
            raise invalid(
                f"step {msg.step}: micro-batches 0..{msg.micro} hold {self._seen + n} examples, "
                f"which cannot add up to step_examples {examples} in {count} micro-batches"
            )
        return count, examples

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """Forward only: logits for one batch; no state changes."""
        with self.lock:
            lengths = self._check_lengths(msg.lengths)
            x = self._decode_activations(msg.activations, lengths)
            with torch.no_grad(), self._compute_lock:
                self.net2.eval()
                logits = self.net2(self._unpack(x, lengths), self._mask(lengths))
            return pb.EvalReply(batch=msg.batch, logits=codec.encode(logits.float(), pb.FLOAT32))

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        """Write the state after ``msg.step`` steps; the edge writes its own after this answer."""
        with self.lock:
            self._check_trainable()
            if self.ckpts is None:
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the daemon runs without --checkpoint-dir, so it cannot checkpoint sessions",
                )
            if msg.step != self.next_step or self.next_micro:
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"checkpoint at step {msg.step}, but the session is at step {self.next_step}"
                    + (f" with {self.next_micro} of its micro-batches applied" if self.next_micro else ""),
                )
            self.save_checkpoint()
            return pb.CheckpointDone(step=msg.step)

    def save_checkpoint(self) -> str:
        """Checkpoint the state after ``next_step`` whole steps (caller holds the lock); older
        ones past the newest 3 are removed. Gradients of a partly applied step are not saved:
        after a restore the edge sends that step again from its first micro-batch."""
        assert self.ckpts is not None
        return self.ckpts.save_state(
            self.next_step, self.net2, self.optimizer, self.schedule,
            session_id=self.session_id, owner=self.owner, fingerprint=self.fingerprint,
            config=self.config.SerializeToString().hex(),
        )  # fmt: skip

    def restore(self, step: int) -> None:
        """Roll the whole session state back (or forward, after a restart) to checkpoint ``step``."""
        assert self.ckpts is not None
        tensors, meta = self.ckpts.load(step, device=self.device)
        if meta["fingerprint"] != self.fingerprint:
            raise ProtocolError(grpc.StatusCode.DATA_LOSS, f"checkpoint {step} belongs to another model")
        checkpoint.unpack(tensors, meta, self.net2, self.optimizer, self.schedule)
        self.optimizer.zero_grad(set_to_none=True)  # a partly accumulated step is dropped
        self.next_step = int(meta["step"])
        self.next_micro, self._plan, self._seen = 0, None, 0
        self.replies, self.completed, self.last_reply = {}, None, None

    def resume(self, steps: Sequence[int]) -> Tuple[int, bool]:
        """Pick the first of the edge's candidate steps this session can continue from.

        Returns (step, restored). The live state serves step ``next_step`` (micro-batches of it
        the edge sends again are answered from the cache), and also the step before it when its
        replies are cached; any other step needs a checkpoint of this session.
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
        state = checkpoint.owned_state(self.net2)  # with LoRA: adapters, Σ, v, head; not the base
        # Flat string metadata, not a checkpoint's ``sft`` JSON: readers of the final weights take
        # step and fingerprint straight from the header.
        meta = {"step": str(self.next_step), "fingerprint": self.fingerprint, "replayed": str(self.replayed)}
        meta.update(owner=self.owner, config=self.config.SerializeToString().hex())  # to reopen it
        checkpoint.save_atomic(path, state, meta)
        self.ckpts.clear()
        return path

    # -- validation and helpers -----------------------------------------------------------

    def _check_trainable(self) -> None:
        if self.inference_only:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this finished session was reopened for inference only: no step can change it",
            )

    def _check_lengths(self, lengths_field) -> List[int]:
        lengths = list(lengths_field)
        if not 1 <= len(lengths) <= self.config.max_batch_size:
            raise invalid(
                f"batch of {len(lengths)} examples; the session allows 1..{self.config.max_batch_size}"
            )
        bad = [n for n in lengths if not 1 <= n <= self.config.max_seq_len]
        if bad:
            raise invalid(f"sequence length {bad[0]} is outside 1..{self.config.max_seq_len}")
        return lengths

    def _check_labels(self, msg: pb.TrainStep, batch: int) -> torch.Tensor:
        if self.config.num_labels == 1:
            if len(msg.targets) != batch or len(msg.labels):
                raise invalid(
                    f"regression needs {batch} targets and no labels, got {len(msg.targets)} targets"
                )
            targets = torch.tensor(list(msg.targets), dtype=torch.float32)
            if not bool(torch.isfinite(targets).all()):
                raise invalid("targets contain NaN or Inf")
            return targets.to(self.device)
        if len(msg.labels) != batch or len(msg.targets):
            raise invalid(f"classification needs {batch} labels and no targets, got {len(msg.labels)} labels")
        bad = [y for y in msg.labels if not 0 <= y < self.config.num_labels]
        if bad:
            raise invalid(f"label {bad[0]} is outside 0..{self.config.num_labels - 1}")
        return torch.tensor(list(msg.labels), dtype=torch.long, device=self.device)

    def _decode_activations(self, tensor: pb.Tensor, lengths: List[int]) -> torch.Tensor:
        tokens = sum(lengths)
        return codec.decode(
            tensor,
            name="activations",
            dtype=self.config.wire_dtype,
            shape=(tokens, self.width),
            compression=self.config.compression,
            max_bytes=self.max_activation_bytes(),
            device=self.device,
        )

    def max_activation_bytes(self) -> int:
        """The largest activation payload this session can legitimately send (fp32 bound)."""
        return self.config.max_batch_size * self.config.max_seq_len * self.width * 4

    def _mask(self, lengths: List[int]) -> torch.Tensor:
        t = torch.tensor(lengths, device=self.device)
        return lengths_to_mask(t, max(lengths))

    def _unpack(self, x: torch.Tensor, lengths: List[int]) -> torch.Tensor:
        """(tokens, width) -> (batch, max_len, width), zeros at padded positions."""
        mask = self._mask(lengths)
        full = x.new_zeros(len(lengths), max(lengths), self.width)
        return full.index_put((mask,), x)

    @contextlib.contextmanager
    def _rng(self, step: int, micro: int = 0) -> Iterator[None]:
        with self._compute_lock:
            torch.manual_seed(step_seed(self.config.seed, "cloud", step, micro))
            yield

    def touch(self) -> None:
        self.last_active = time.monotonic()
