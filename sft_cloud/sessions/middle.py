"""The cloud's part of a label-private (U-shaped) session: the middle, driven by four phases.

``MiddleSession`` is a ``CloudSession`` whose net2 is the U's middle (``sft_common.topology.ushape``): Σ1,
v1, the layers between the cuts and the second cut's u2 (at the FFN input: B1 and the rest of l1,
the layers between, l2's attention part and A2). It never holds a head, a label or a loss.
A step is two exchanges: ``forward_up`` (â1 in, â2 out: the middle's forward, whose autograd graph
is kept for the step) and ``gradient_up`` (∂loss/∂â2 in, ∂loss/∂â1 out: the backward and the
update). Each phase of step k is applied exactly once; a repeat of either phase of the step in
progress or of the last completed step is answered from the cache, so the edge's re-send after a
broken link works as for the two-part ``TrainStep``. Checkpoints, resume, the final weights and
evaluation are the base class's, over the middle.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import grpc
import torch

from sft_cloud.sessions.two_part import CloudSession
from sft_cloud.sessions.validation import invalid, ushape_from_config
from sft_common.models.base_model import BaseModel
from sft_common.models.lora import apply_lora
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.ushape import LORA_SIDES, EdgeFactors, build_ushape_cloud, part_factors
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError

FORWARD, GRADIENT = "forward_up", "gradient_up"


class MiddleSession(CloudSession):
    """The U's middle of one edge's run, with its optimizer; applies each phase exactly once."""

    def _build(self, base: BaseModel, device: str) -> List[torch.nn.Parameter]:
        self.net2, self.factors = build_ushape_cloud(base, ushape_from_config(self.config), device=device)
        self.edge_factor = None if self.factors is None else self.factors.u
        # The step whose forward is applied and whose gradient is awaited: (step, â1 as received,
        # with its gradient to come; â2 on the middle's graph). One at a time: the graph is bounded.
        self._pending: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None
        return part_factors(self.net2)

    def _adapt(self, factors: List[torch.nn.Parameter]) -> None:
        assert self.lora is not None
        apply_lora(self.net2, self.lora, self.config.seed, LORA_SIDES["middle"], keep=factors)

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        opened = super().opened(at)
        opened.next_step, opened.next_micro = self.next_step if at is None else at, 0
        factors: Optional[EdgeFactors] = self.factors
        if factors is not None:  # at the FFN input: B2ᵀ in tail_v, no tail_sigma
            if factors.sigma is not None:
                opened.tail_sigma.CopyFrom(codec.encode(factors.sigma, pb.FLOAT32))
            opened.tail_v.CopyFrom(codec.encode(factors.v, pb.FLOAT32))
        return opened

    # -- the four phases ------------------------------------------------------------------

    def forward_up(self, msg: pb.ForwardUp) -> pb.ForwardDown:
        """Phases 1-2: the middle's forward on â1; answers â2 for the same rows, keeps the graph."""
        with self.lock:
            self._check_trainable()
            self.fence()
            cached = self.replies.get((msg.step, 0))
            if cached is not None:
                self.replayed += 1
                return cached
            if msg.step != self.next_step or self._pending is not None:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, self._unexpected(FORWARD, msg.step))
            lengths = self._check_lengths(msg.lengths)
            x = self._decode_activations(msg.activations, lengths)
            mask = self._mask(lengths)
            with self._rng(msg.step):
                self.net2.train()
                x.requires_grad_(True)
                out, _ = self.net2(self._unpack(x, lengths), mask)
                rows = out[mask]  # (tokens, width): the real tokens only
            if not bool(torch.isfinite(rows).all()):
                raise invalid(f"step {msg.step}: the middle's output is not finite; nothing was applied")
            reply = pb.ForwardDown(
                step=msg.step,
                activations=codec.encode(rows.detach(), self.config.wire_dtype, self.config.compression),
            )
            self._pending = (msg.step, x, rows)
            self.replies[(msg.step, 0)] = reply
            return reply

    def gradient_up(self, msg: pb.GradientUp) -> pb.GradientDown:
        """Phases 3-4: ∂loss/∂â2 through the kept graph, the middle updated; answers ∂loss/∂â1."""
        with self.lock:
            self._check_trainable()
            self.fence()
            cached = self.replies.get((msg.step, 1))
            if cached is not None:
                self.replayed += 1
                return cached
            pending = self._pending
            if pending is None or pending[0] != msg.step:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, self._unexpected(GRADIENT, msg.step))
            _, x, rows = pending
            grad = codec.decode(
                msg.grad, name="gradient", dtype=self.config.wire_dtype, shape=tuple(rows.shape),
                compression=self.config.compression, max_bytes=self.max_activation_bytes(), device=self.device,
            )  # fmt: skip
            with self._compute_lock:  # the backward draws nothing, but shares the CPU threads
                rows.backward(grad)
            assert x.grad is not None
            reply = pb.GradientDown(
                step=msg.step, grad=codec.encode(x.grad, self.config.wire_dtype, self.config.compression)
            )
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._pending = None
            self.replies = {k: r for k, r in self.replies.items() if k[0] == msg.step}
            self.replies[(msg.step, 1)] = reply
            self.completed = msg.step
            self.next_step += 1
            return reply

    def _unexpected(self, phase: str, step: int) -> str:
        if self._pending is not None:
            expected = f"gradient_up of step {self._pending[0]}"
        else:
            expected = f"forward_up of step {self.next_step}"
        retry = f" (or a retry of step {self.completed})" if self.completed is not None else ""
        return f"{phase} of step {step} is out of order: the session expects {expected}{retry}"

    # -- what the two-part session does otherwise ------------------------------------------

    def train(self, msg: pb.TrainStep) -> pb.TrainReply:
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this session is label-private (the U-shape): a step is forward_up then gradient_up, not train",
        )

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """Forward only: the middle's output at the second cut for one batch; no state changes."""
        with self.lock:
            lengths = self._check_lengths(msg.lengths)
            x = self._decode_activations(msg.activations, lengths)
            mask = self._mask(lengths)
            with torch.no_grad(), self._compute_lock:
                self.net2.eval()
                out, _ = self.net2(self._unpack(x, lengths), mask)
            rows = out[mask].float()
            return pb.EvalReply(
                batch=msg.batch,
                activations=codec.encode(rows, self.config.wire_dtype, self.config.compression),
            )

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        with self.lock:
            pending = self._pending
        if pending is not None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"checkpoint at step {msg.step}, but step {pending[0]} is half applied (its gradient_up is due)",
            )
        return super().checkpoint(msg)

    def restore(self, step: int) -> None:
        super().restore(step)
        self._pending = None  # a forward whose gradient never came is dropped with its graph
