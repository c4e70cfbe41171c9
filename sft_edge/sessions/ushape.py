"""The edge's side of a label-private (U-shaped) session: the head and the tail, the loss here.

``UShapeSession`` holds the U's two edge parts (``sft_common.topology.ushape``): the head (embeddings ..
the first cut, u1) and the tail (Σ2, v2, the last ``tail_layers`` layers, the final norm, the task
head) with one optimizer over both; the cloud holds the middle (``sft_cloud.sessions.middle``). A step is
four phases: forward up (â1 and the lengths), forward down (â2), gradient up (∂loss/∂â2),
gradient down (∂loss/∂â1). The labels, the loss and the logits never leave this process. It
shares ``SessionClient``'s open, reconnect, re-send and rollback with ``EdgeSession`` and offers
the trainer the same calls (``train_step``, ``predict``, ``checkpoint``, ``restore``, ``close``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import grpc
import torch
from torch import nn

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import LoraSpec, resolve_lora
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir, owned_state
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import EdgeFactors, UShapeSpec, lora_part, part_factors
from sft_common.training import autocast, make_optimizer, make_schedule, seeded
from sft_common.wire import codec, delta
from sft_common.wire.codecs import Wire
from sft_common.wire.delta import CUTS
from sft_edge.data.glue import Batch
from sft_edge.link.transport import CloudError, Transport
from sft_edge.privacy.defence import ACTIVATIONS, EVAL, GRADIENT, Defence, Mechanism
from sft_edge.runs.config import LinkOptions, OptimConfig, check_factor_lr
from sft_edge.sessions.base import delta_caches, open_request
from sft_edge.sessions.client import SessionClient, checked
from sft_edge.sessions.tail_end import tail_end_of

HEAD_SIDE, TAIL_SIDE = "edge", "edge-tail"  # dropout seeds of the head's and the tail's forward


class UShapeSession(SessionClient):
    """The head and the tail here; the middle in a cloud session reached through a transport.

    Arguments as ``EdgeSession``'s, with ``spec`` a ``UShapeSpec`` (first cut, rank, tail layers,
    mode). ``num_labels`` stays here: the cloud is told 0. Each step goes whole (no micro-batches).
    ``causal_lm``: the tail ends in the model's LM head (``sft_common.topology.ushape_lm``; ``num_labels``
    unused) and the loss is the shifted next-token cross-entropy on the labelled tokens.
    """

    def __init__(
        self,
        base: BaseModel,
        spec: UShapeSpec,
        num_labels: int,
        connect: Union[Transport, Callable[[], Transport]],
        optim: OptimConfig,
        batch_size: int,
        max_seq_len: int,
        link: Optional[LinkOptions] = None,
        task: str = "",
        device: str = "cpu",
        checkpoints: Optional[CheckpointDir] = None,
        session_id: str = "",
        resume_steps: Sequence[int] = (),
        reconnect_timeout: float = 300.0,
        backoff: Tuple[float, float] = (0.25, 10.0),
        inference_only: bool = False,
        lora: Optional[LoraSpec] = None,
        causal_lm: bool = False,
    ):
        link = link or LinkOptions()
        link.validate()
        if link.micro_batches > 1 or link.cls_only:
            raise ValueError(
                "--label-private sends each step whole: --micro-batches and --cls-only are for the two-part split"
            )
        check_factor_lr(spec.mode, optim.factor_lr)
        spec.validate(base.num_hidden_layers)
        self.spec, self.optim_cfg, self.device, self.num_labels = spec, optim, device, num_labels
        self.checkpoints = checkpoints
        self.wire = Wire.named(link.wire_dtype, link.compression)
        self.defence = Defence.of(link.dp)  # clipping and noise on what is sent up (or none)
        self.first = SplitSpec(spec.split_layer, spec.rank, spec.mode, factorise=spec.factorise)
        self.width = self.first.cut_width(base.hidden_size)
        self.delta = delta_caches(link, self.first, self.width, CUTS)  # both cuts are full width
        self.lora = resolve_lora(lora, base.config.model_type)
        open_msg = open_request(
            base,
            self.first,
            0,
            optim,
            link,
            batch_size,
            max_seq_len,
            task,
            self.lora,
            session_id,
            resume_steps,
            inference_only,
            spec.tail_layers,
        )
        self.fingerprint = open_msg.fingerprint
        opened = self._open_session(connect, open_msg, reconnect_timeout, backoff)
        factors = self._factors(base, opened)
        self.end = tail_end_of(causal_lm)  # the task head and its loss, or the LM head's
        self.head, self.tail = self.end.build(base, spec, num_labels, optim.seed, factors, device)
        if self.lora is not None:  # adapters; the factors and the task head trainable; the base frozen
            lora_part(self.head, "head", self.lora, optim.seed)
            lora_part(self.tail, "tail", self.lora, optim.seed)
        self.net = nn.ModuleDict({"head": self.head, "tail": self.tail})  # what is saved, as one
        self.optimizer = make_optimizer(
            self.net.parameters(),
            optim.lr,
            optim.weight_decay,
            factors=part_factors(self.head) + part_factors(self.tail),
            factor_lr=optim.factor_lr,
        )
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)

    def _factors(self, base: BaseModel, opened: pb.SessionOpened) -> Optional[EdgeFactors]:
        """The factors the cloud sent at open, checked before anything is allocated: u1 (A1ᵀ at
        the FFN input) in edge_factor, Σ2 (none at the FFN input) and v2 (B2ᵀ) for the tail; None
        for a full-width cut."""
        cut = self.first.cut
        shapes = cut.tail_factor_shapes(base.hidden_size)
        u_shape = cut.edge_factor_shape(base.hidden_size, base.intermediate_size)
        if shapes is None or u_shape is None:
            return None
        sigma_shape, v_shape = shapes
        if sigma_shape is None and opened.HasField("tail_sigma"):
            raise CloudError(grpc.StatusCode.INTERNAL, "this cut has no Σ2, but the cloud sent one")
        sigma = _factor(opened.tail_sigma, "tail factor Σ2", sigma_shape) if sigma_shape else None
        return EdgeFactors(
            u=_factor(opened.edge_factor, "edge factor u1", u_shape),
            sigma=sigma,
            v=_factor(opened.tail_v, "tail factor v2", v_shape),
        )

    # -- what the trainer calls ------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.net

    def train_step(self, step: int, batch: Batch) -> float:
        """The four phases of one step, both edge parts' backward and the update. Returns the
        step's mean loss, computed here."""
        self.live_step = step
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an interrupted step
        mask = batch.attention_mask.bool()
        with seeded(self.optim_cfg.seed, HEAD_SIDE, step), autocast(self.device):
            first, _ = self.head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        packed = self.defence.activations.clip_rows(first.float()[mask], batch.lengths)
        noise = self.defence.activations
        sent = noise.add_noise(packed.detach(), noise.generator(self.optim_cfg.seed, ACTIVATIONS, step))
        up = pb.ForwardUp(step=step, lengths=batch.lengths)
        keys = self.encode_cut(up, sent, batch, batch.lengths)
        self._submit(pb.EdgeMessage(forward_up=up))  # phase 1
        down = self._answer("forward_down", step).forward_down  # phase 2
        second = self._unpack(self._decode_down(down, keys, batch.lengths, packed), mask)
        second.requires_grad_(True)
        with seeded(self.optim_cfg.seed, TAIL_SIDE, step), autocast(self.device):
            logits = self.tail(second, batch.attention_mask)
        loss = self.end.loss(logits.float(), batch.labels)
        loss.backward()
        assert second.grad is not None
        grad = self._noised(self.defence.gradient, second.grad[mask], batch.lengths, GRADIENT, step)
        grad_up = pb.GradientUp(step=step, grad=self.wire.encode_gradient(grad))
        self._submit(pb.EdgeMessage(gradient_up=grad_up))  # phase 3
        grad_down = self._answer("gradient_down", step).gradient_down  # phase 4: the middle is updated
        with checked("the cloud's gradient"):
            grad = self.wire.decode_gradient(
                grad_down.grad, "gradient", tuple(packed.shape), device=self.device
            )
        packed.backward(grad)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.live_step = step + 1
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        """The logits of ``batch`` from the current model, (batch, num_labels) or, for a causal LM,
        (batch, seq, vocab); changes nothing."""
        self.net.eval()
        mask = batch.attention_mask.bool()
        with autocast(self.device):
            first, _ = self.head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        packed = first.float()[mask]
        packed = self._noised(self.defence.activations, packed, batch.lengths, EVAL, self.live_step, index)
        msg = pb.EvalStep(
            batch=index, activations=self.wire.encode_activations(packed), lengths=batch.lengths
        )
        reply = self.request(pb.EdgeMessage(eval=msg)).eval
        second = self._unpack(self._decode_rows(reply.activations, packed), mask)
        with autocast(self.device):
            return self.tail(second, batch.attention_mask).float()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Both edge parts' trained state (``head.*``, ``tail.*``): with LoRA, not the frozen base."""
        return owned_state(self.net)

    # -- the cuts -------------------------------------------------------------------------

    def _noised(
        self, noise: Mechanism, rows: torch.Tensor, lengths: List[int], side: str, step: int, index: int = 0
    ) -> torch.Tensor:
        """``rows`` clipped and noised by ``noise`` (as they are where it is ``NoNoise``), the noise
        drawn for (seed, side, step, index)."""
        return noise.apply(rows, lengths, noise.generator(self.optim_cfg.seed, side, step, index))

    def _answer(self, kind: str, step: int) -> pb.CloudMessage:
        reply = self._result()
        got = reply.WhichOneof("kind")
        got_step = getattr(reply, got).step if got in ("forward_down", "gradient_down") else None
        if got != kind or got_step != step:
            raise CloudError(
                grpc.StatusCode.INTERNAL, f"expected {kind} of step {step}, got {got} of step {got_step}"
            )
        return reply

    def decoded(self, first: torch.Tensor, reply: pb.DecodeReply) -> torch.Tensor:
        """What the tail reads at the rows of a ``DecodeStep`` (KV-cached generation): the middle's
        output (n, width) for ``first`` (n, width), the first cut's rows sent."""
        return self._decode_rows(reply.activations, first)

    def _decode_rows(self, tensor: pb.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The middle's (tokens, width) output, for the rows of ``like``."""
        with checked():
            return self.wire.decode_activations(
                tensor, "the middle's output", tuple(like.shape), down=True, device=self.device
            )

    def _decode_down(
        self, down: pb.ForwardDown, keys: List[bytes], lengths: List[int], like: torch.Tensor
    ) -> torch.Tensor:
        """A training step's second cut: as ``_decode_rows``, or in delta mode against the second
        cut's cache, which then keeps what was decoded."""
        if self.delta is None:
            return self._decode_rows(down.activations, like)
        with checked():
            codecs = self.delta.mode.codecs(self.wire.down)
            cache = self.delta["down"]
            rows = delta.decode(codecs, cache, keys, lengths, down.activations, down.delta, self.width)
        cache.update(keys, lengths, rows)
        return rows.to(self.device)

    def _unpack(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(tokens, width) -> (batch, seq, width), zeros at padded positions."""
        full = rows.new_zeros(*mask.shape, self.width)
        return full.index_put((mask,), rows)


def _factor(tensor: pb.Tensor, name: str, shape: Tuple[int, ...]) -> torch.Tensor:
    """One SVD factor the cloud sent at open (fp32, its shape checked before allocation)."""
    with checked(f"the cloud's {name}"):
        return codec.decode(tensor, name=name, dtype=pb.FLOAT32, shape=shape)


__all__: List[str] = ["UShapeSession"]
