"""The cloud's part of a label-private (U-shaped) session: the middle, driven by four phases.

``MiddleSession`` holds the U's middle (``sft_common.topology.ushape``): Σ1, v1, the layers
between the cuts and the second cut's u2 (at the FFN input: B1 and the rest of l1, the layers
between, l2's attention part and A2). It never holds a head, a label or a loss.
A step is two exchanges: ``forward_up`` (â1 in, â2 out: the middle's forward, whose autograd graph
is kept for the step) and ``gradient_up`` (∂loss/∂â2 in, ∂loss/∂â1 out: the backward and the
update). Each phase of step k is applied exactly once by the session's ``SessionCore``; a repeat
of either phase of the step in progress or of the last completed step is answered from its
cache, so the edge's re-send after a broken link works as for the two-part ``TrainStep``.
Checkpoints, resume and the final weights are the core's, over the middle.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from sft_cloud.sessions.adapters import adapt_lora
from sft_cloud.sessions.batcher import BatchGraph, Job
from sft_cloud.sessions.core import CoreAttributes, SessionCore, not_its_step
from sft_cloud.sessions.host import DEFAULT_HOST, SessionHost
from sft_cloud.sessions.inputs import ActivationInput
from sft_cloud.sessions.validation import invalid, ushape_from_config
from sft_common.models.base_model import BaseModel
from sft_common.models.lora import lora_from_config
from sft_common.models.shared import SharedBase
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.topology.ushape import LORA_SIDES, build_ushape_cloud, part_factors
from sft_common.wire import codec

FORWARD, GRADIENT = "forward_up", "gradient_up"


def check_middle(config: pb.SessionConfig, spec: SplitSpec, base: BaseModel) -> None:
    """A U: both cuts fit the model, and the cloud is told no labels."""
    try:
        spec.validate(base.num_hidden_layers, base.hidden_size, base.intermediate_size)
        ushape_from_config(config).validate(base.num_hidden_layers)
    except ValueError as exc:
        raise invalid(f"label_private: {exc}") from None
    if config.num_labels != 0:
        raise invalid(
            f"label_private: num_labels must be 0, got {config.num_labels}: the head is on the edge "
            "and the cloud is told nothing about the labels"
        )


class MiddleSession(CoreAttributes):
    """The U's middle of one edge's run, with its optimizer; applies each phase exactly once."""

    projection: Optional[torch.Tensor] = None  # no side network reads its layers (FrozenMiddleSession's P)

    def __init__(
        self,
        session_id: str,
        owner: str,
        config: pb.SessionConfig,
        base: BaseModel,
        host: SessionHost = DEFAULT_HOST,
        shared_base: Optional[SharedBase] = None,
    ):
        """As ``TwoPartSession``'s."""
        self.config = config
        self.spec = host.check(config, base, check_middle)
        self.device = host.device
        self.lora = lora_from_config(config, base)
        self.inputs = ActivationInput(config, self.spec.cut_width(base.hidden_size), host.device)
        # With LoRA, built on the frozen base of this model and split (the first session's).
        shared = shared_base if self.lora else None
        net2, self.factors = build_ushape_cloud(base, ushape_from_config(config), host.device, shared)
        # u1 for the edge (SessionOpened.edge_factor); None at the FFN input.
        self.edge_factor = None if self.factors is None else self.factors.u
        factors = part_factors(net2)
        # With LoRA: adapters; the factors trainable; the base frozen, shareable.
        side = LORA_SIDES["middle"]
        lora_dict = adapt_lora(net2, self.lora, config.seed, side, factors, shared_base, host.compute_lock)
        fingerprint = session_fingerprint(
            base.fingerprint, self.spec, config.num_labels, lora_dict, config.tail_layers
        )
        self.core = SessionCore(
            session_id, owner, config, fingerprint, net2, factors, host, rolled_back=self._drop_pending
        )
        self.core.delta = self.inputs.caches
        # The step whose forward is applied and whose gradient is awaited: (step, â1 as received,
        # with its gradient to come; â2 on the middle's graph; the batch that graph is shared with,
        # None: its own). One at a time: the graph is bounded.
        self._pending: Optional[Tuple[int, torch.Tensor, torch.Tensor, Optional[BatchGraph]]] = None

    @property
    def width(self) -> int:
        """Values a token at the first cut."""
        return self.inputs.width

    def describe(self) -> str:
        c = self.config
        return (
            f"{self.spec.mode} label-private (U-shape, {c.tail_layers} tail layers) at layer "
            f"{c.split_layer}, rank {c.rank}, {c.num_labels} labels"
        )

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        """The answer to an open; the second cut's factors go to the edge's tail."""
        opened = self.core.opened(self.core.next_step if at is None else at, 0, self.edge_factor)
        factors = self.factors
        if factors is not None:  # at the FFN input: B2ᵀ in tail_v, no tail_sigma
            if factors.sigma is not None:
                opened.tail_sigma.CopyFrom(codec.encode(factors.sigma, pb.FLOAT32))
            opened.tail_v.CopyFrom(codec.encode(factors.v, pb.FLOAT32))
        return opened

    def step(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        """A U's step is ``forward_up`` then ``gradient_up``."""
        if kind == FORWARD:
            return pb.CloudMessage(forward_down=self.forward_up(msg.forward_up))
        if kind == GRADIENT:
            return pb.CloudMessage(gradient_down=self.gradient_up(msg.gradient_up))
        raise not_its_step(
            f"this session is label-private (the U-shape): a step is forward_up then gradient_up, not {kind}"
        )

    # -- the four phases ------------------------------------------------------------------

    def forward_up(self, msg: pb.ForwardUp) -> pb.ForwardDown:
        """Phases 1-2: the middle's forward on â1; answers â2 for the same rows, keeps the graph."""
        return self.core.apply(
            (msg.step, 0), lambda: self._forward_refusal(msg.step), lambda: self._forward(msg)
        )

    def _forward_refusal(self, step: int) -> Optional[str]:
        if step == self.core.next_step and self._pending is None:
            return None
        return self._unexpected(FORWARD, step)

    def _forward(self, msg: pb.ForwardUp) -> pb.ForwardDown:
        lengths = self.inputs.lengths(msg.lengths)
        x, keys = self.inputs.decode_step(msg, lengths)
        x.requires_grad_(True)
        padded, mask = self.inputs.unpack(x, lengths)
        job = Job(
            self, self.core.seed(msg.step), (padded, mask), lambda out: self._rows(out[0], mask, msg.step)
        )
        batcher = self.core.batched(self)
        graph: Optional[BatchGraph] = None
        if batcher is not None:  # with other sessions' forwards through the shared base
            rows, graph = batcher.forward(job)
        else:
            with self.core.rng(msg.step):
                self.net2.train()
                rows = job.finish(self.net2(padded, mask))
        down = pb.ForwardDown(step=msg.step)
        self.inputs.encode_down(rows.detach(), keys, lengths, down)  # delta mode: keeps what it sends
        self.inputs.keep(keys, lengths, x.detach())  # and what it received
        self._pending = (msg.step, x, rows, graph)
        return down

    @staticmethod
    def _rows(out: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        """(tokens, width): the middle's output at the real tokens, refused when not finite."""
        rows = out[mask]
        if not bool(torch.isfinite(rows).all()):
            raise invalid(f"step {step}: the middle's output is not finite; nothing was applied")
        return rows

    def gradient_up(self, msg: pb.GradientUp) -> pb.GradientDown:
        """Phases 3-4: ∂loss/∂â2 through the kept graph, the middle updated; answers ∂loss/∂â1."""
        return self.core.apply(
            (msg.step, 1), lambda: self._gradient_refusal(msg.step), lambda: self._backward(msg)
        )

    def _gradient_refusal(self, step: int) -> Optional[str]:
        if self._pending is not None and self._pending[0] == step:
            return None
        return self._unexpected(GRADIENT, step)

    def _backward(self, msg: pb.GradientUp) -> pb.GradientDown:
        assert self._pending is not None
        _, x, rows, graph = self._pending
        grad = self.inputs.decode_gradient(msg.grad, tuple(rows.shape))
        what = f"step {msg.step}"
        if graph is not None and self.core.batcher is not None:  # with its forward batch's others
            self.core.batcher.backward(
                graph, Job(self, 0, (), lambda out: out, x=x, what=what, roots=rows, grad=grad)
            )
            assert x.grad is not None
            grad_in = x.grad
        else:
            with self.core.compute_lock:  # the backward draws nothing, but shares the CPU threads
                grad_in = self.core.backward(rows, grad, x, what)
        reply = pb.GradientDown(step=msg.step, grad=self.inputs.encode_gradient(grad_in))
        self.core.complete(msg.step)
        self._pending = None
        return reply

    def _drop_pending(self) -> None:
        """A forward whose gradient never came is dropped with its graph (a restore)."""
        if self._pending is not None and self._pending[3] is not None:
            self._pending[3].leave(self)  # its batch's others wait no more for its backward
        self._pending = None

    def _unexpected(self, phase: str, step: int) -> str:
        if self._pending is not None:
            expected = f"gradient_up of step {self._pending[0]}"
        else:
            expected = f"forward_up of step {self.core.next_step}"
        return f"{phase} of step {step} is out of order: {self.core.expected(expected)}"

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """Forward only: the middle's output at the second cut for one batch; no state changes."""
        with self.core.lock:
            lengths = self.inputs.lengths(msg.lengths)
            x = self.inputs.decode(msg.activations, lengths)
            padded, mask = self.inputs.unpack(x, lengths)
            with torch.no_grad(), self.core.compute_lock:
                self.net2.eval()
                out, _ = self.net2(padded, mask)
            rows = out[mask].float()
            if not bool(torch.isfinite(rows).all()):
                raise invalid(
                    f"evaluation batch {msg.batch}: the middle's output is not finite (activations too large?)"
                )
            return pb.EvalReply(batch=msg.batch, activations=self.inputs.encode_activations(rows))

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        """Write the state after ``msg.step`` whole steps; refused between a step's two phases."""
        return self.core.checkpoint(msg, lambda: self._half_applied(msg))

    def _half_applied(self, msg: pb.Checkpoint) -> Optional[str]:
        if self._pending is None:
            return None
        return f"checkpoint at step {msg.step}, but step {self._pending[0]} is half applied (its gradient_up is due)"
