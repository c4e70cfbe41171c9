"""The two-part session's steps: net2 (the model above the cut, with the head) trained by ``TrainStep``.

A ``TwoPartSession`` is a plain class: a test drives it with ``pb`` messages and no network. Every
message is validated completely before anything changes, so a refused message (a
``ProtocolError``) leaves the session exactly as it was. A step may come in micro-batches: their
gradients accumulate, and the optimizer steps after the last. What every session shares (exactly
once, fencing, checkpoints) is its ``SessionCore``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from sft_cloud.sessions.adapters import adapt_lora
from sft_cloud.sessions.batcher import Job
from sft_cloud.sessions.core import CoreAttributes, SessionCore, not_its_step
from sft_cloud.sessions.host import DEFAULT_HOST, SessionHost
from sft_cloud.sessions.inputs import ActivationInput
from sft_cloud.sessions.validation import invalid
from sft_common.models.base_model import BaseModel
from sft_common.models.lora import head_parameters, lora_from_config
from sft_common.models.shared import SharedBase
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.topology.two_part import build_cloud_half, factor_parameters, task_loss
from sft_common.wire import codec


def check_two_part(config: pb.SessionConfig, spec: SplitSpec, base: BaseModel) -> None:
    """A two-part split: the cut fits the model, and net2's head has 1..10000 labels."""
    try:
        spec.validate(base.num_hidden_layers, base.hidden_size, base.intermediate_size)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if config.tail_layers:
        raise invalid(f"tail_layers {config.tail_layers} needs label_private (the U-shaped split)")
    if not 1 <= config.num_labels <= 10_000:
        raise invalid(f"num_labels must be in 1..10000, got {config.num_labels}")


class TwoPartSession(CoreAttributes):
    """net2 of one edge's run, with its optimizer; applies each training step exactly once."""

    def __init__(
        self,
        session_id: str,
        owner: str,
        config: pb.SessionConfig,
        base: BaseModel,
        host: SessionHost = DEFAULT_HOST,
        shared_base: Optional[SharedBase] = None,
    ):
        """``host``: where it runs, the limits its config is checked against, its checkpoints.
        ``shared_base``: with LoRA, the frozen base of every session of this model and split
        (recorded by the first; later sessions are built on its tensors, their head their own)."""
        self.config = config
        self.spec = host.check(config, base, check_two_part)
        self.device = host.device
        self.lora = lora_from_config(config, base)
        width = self.spec.cut_width(base.hidden_size)
        self.inputs = ActivationInput(config, width, host.device)
        # With LoRA, built on the frozen base of this model and split (the first session's).
        shared = shared_base if self.lora else None
        net2, edge_factor = build_cloud_half(
            base, self.spec, config.num_labels, config.seed, host.device, shared
        )
        # u for the edge (SessionOpened.edge_factor); None: none sent.
        self.edge_factor: Optional[torch.Tensor] = edge_factor
        factors = factor_parameters(net2)
        # With LoRA: adapters; Σ, v and the head trainable; the base frozen, shareable.
        keep = factors + head_parameters(net2)
        lora_dict = adapt_lora(net2, self.lora, config.seed, "cloud", keep, shared_base, host.compute_lock)
        fingerprint = session_fingerprint(base.fingerprint, self.spec, config.num_labels, lora_dict, None)
        self.core = SessionCore(
            session_id, owner, config, fingerprint, net2, factors, host, rolled_back=self._drop_micro_batches
        )
        self.core.delta = self.inputs.caches
        self.next_micro = 0  # micro-batches of next_step applied so far (gradients accumulated)
        self._plan: Optional[Tuple[int, int]] = None  # (micro_count, step_examples) of next_step
        self._seen = 0  # examples of next_step applied so far

    @property
    def width(self) -> int:
        """Values a token at the cut."""
        return self.inputs.width

    def describe(self) -> str:
        c = self.config
        return f"{self.spec.mode} at layer {c.split_layer}, rank {c.rank}, {c.num_labels} labels"

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        """The answer to an open. ``at``: the step ``resume`` chose; when it is the completed step
        before ``next_step``, the edge is told to go on there, its micro-batches all cached."""
        step, micro = self.core.next_step, self.next_micro
        if at is not None and at != step:
            step, micro = at, sum(1 for s, _ in self.core.replies if s == at)
        return self.core.opened(step, micro, self.edge_factor)

    def step(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        """A two-part step is one ``train`` message (per micro-batch)."""
        if kind != "train":
            raise not_its_step(
                f"{kind} is for label-private sessions (the U-shape); this one is a two-part split"
            )
        return pb.CloudMessage(train=self.train(msg.train))

    def train(self, msg: pb.TrainStep) -> pb.TrainReply:
        """Apply training step ``msg.step`` (or one micro-batch of it) exactly once: a repeat of
        an applied message gets its cached reply. The optimizer steps after the last micro-batch."""
        return self.core.apply(
            (msg.step, msg.micro), lambda: self._out_of_order(msg), lambda: self._train(msg)
        )

    def _train(self, msg: pb.TrainStep) -> pb.TrainReply:
        lengths = self.inputs.lengths(msg.lengths)
        count, examples = self._check_micro(msg, len(lengths))
        labels = self._check_labels(msg, len(lengths))
        x, keys = self.inputs.decode_step(msg, lengths)
        x.requires_grad_(True)
        what = f"step {msg.step} micro-batch {msg.micro}"
        inputs = self.inputs.unpack(x, lengths)
        job = Job(
            self, self.core.seed(self.core.next_step, msg.micro), inputs, lambda _: None, x=x, what=what
        )

        def finish(logits: torch.Tensor) -> torch.Tensor:
            loss = task_loss(logits, labels)
            if not bool(torch.isfinite(loss)):
                raise invalid(f"{what}: the loss is not finite; nothing was applied")
            # Each micro-batch's mean loss counts by its share of the step's examples, so the
            # accumulated gradients are those of the whole batch's mean loss.
            job.roots = loss if examples == len(lengths) else loss * (len(lengths) / examples)
            return loss

        job.finish = finish
        batcher = self.core.batched(self)
        if batcher is not None:  # with other sessions' steps through the shared base
            loss = batcher.step(job)
            assert x.grad is not None
            grad = x.grad
        else:
            with self.core.rng(self.core.next_step, msg.micro):
                self.net2.train()
                loss = finish(self.net2(*inputs))
                grad = self.core.backward(job.roots, None, x, what)
        reply = pb.TrainReply(
            step=msg.step, loss=float(loss.detach()), grad=self.inputs.encode_gradient(grad), micro=msg.micro
        )
        self.inputs.keep(keys, lengths, x.detach())  # delta mode: the step is applied
        if msg.micro == count - 1:  # the step is complete: update net2
            self.core.complete(msg.step)
            self._drop_micro_batches()
        else:
            self.next_micro += 1
            self._plan = (count, examples)
            self._seen += len(lengths)
        return reply

    def _drop_micro_batches(self) -> None:
        """The step in progress starts again from its first micro-batch (completed or rolled back)."""
        self.next_micro, self._plan, self._seen = 0, None, 0

    def _out_of_order(self, msg: pb.TrainStep) -> Optional[str]:
        if msg.step == self.core.next_step and msg.micro == self.next_micro:
            return None
        where = f"step {msg.step}" + (f" micro-batch {msg.micro}" if msg.micro else "")
        expected = f"step {self.core.next_step}" + (
            f" micro-batch {self.next_micro}" if self.next_micro else ""
        )
        return f"{where} is out of order: {self.core.expected(expected)}"

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

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """Forward only: logits for one batch; no state changes."""
        with self.core.lock:
            lengths = self.inputs.lengths(msg.lengths)
            x = self.inputs.decode(msg.activations, lengths)
            with torch.no_grad(), self.core.compute_lock:
                self.net2.eval()
                logits = self.net2(*self.inputs.unpack(x, lengths))
            if not bool(torch.isfinite(logits).all()):
                raise invalid(
                    f"evaluation batch {msg.batch}: the logits are not finite (activations too large?)"
                )
            return pb.EvalReply(batch=msg.batch, logits=codec.encode(logits.float(), pb.FLOAT32))

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        """Write the state after ``msg.step`` whole steps; refused with micro-batches of a step applied."""
        return self.core.checkpoint(msg, lambda: self._part_applied(msg))

    def _part_applied(self, msg: pb.Checkpoint) -> Optional[str]:
        if not self.next_micro:
            return None
        return (
            f"checkpoint at step {msg.step}, but the session is at step {self.core.next_step} "
            f"with {self.next_micro} of its micro-batches applied"
        )
