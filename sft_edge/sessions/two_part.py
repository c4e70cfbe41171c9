"""The edge's side of one cloud session: net1, its optimizer, and the protocol that drives net2.

``EdgeSession`` is the one client of the session protocol: it opens (or re-attaches to) the
cloud session and checks the fingerprint, builds net1 with the ``u`` the cloud sends, runs
training steps (pipelined micro-batches included) and evaluations, agrees on checkpoints, and
closes. When the link breaks it reconnects with backoff, re-attaches offering the steps it can
continue from (the live step first, then its checkpoints) and re-sends the messages of the step
in flight from the first micro-batch: the cloud answers those it had applied from its cache, so
nothing is applied twice. If the cloud can only continue from an earlier checkpoint (it
restarted), the session loads its own checkpoint of that step and raises ``Rollback``. That
machinery is ``sft_edge.sessions.client.SessionClient``, shared with the U-shape's ``UShapeSession``.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import grpc
import torch

from sft_common.models.base_model import BaseModel
from sft_common.models.families import Decoder
from sft_common.models.lora import LoraSpec, apply_lora, resolve_lora
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir, owned_state
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import EdgeHalf, build_edge_half, factor_parameters
from sft_common.training import autocast, make_optimizer, make_schedule, seeded
from sft_common.wire import codec
from sft_common.wire.codecs import Wire
from sft_edge.data.glue import Batch
from sft_edge.link.transport import CloudError, Transport
from sft_edge.privacy.defence import ACTIVATIONS, EVAL, Defence
from sft_edge.runs.config import LinkOptions, OptimConfig, check_factor_lr
from sft_edge.sessions.base import delta_caches, open_request
from sft_edge.sessions.client import Rollback, SessionClient, checked

__all__ = ["EdgeSession", "Rollback"]

log = logging.getLogger("sft_edge")


class EdgeSession(SessionClient):
    """net1 here; net2 in a cloud session reached through a transport.

    ``connect``: a zero-argument factory of fresh transports (``transport.connector``), so the
    session can reconnect; or one transport, which then cannot be replaced when its link fails.
    ``checkpoints``: where this side's checkpoints live (``--output-dir/checkpoints``); None: none.

    With ``link.micro_batches`` > 1 a step's batch goes out as that many micro-batches, up to
    ``link.pipeline_depth`` of them in flight: the edge computes micro-batch k+1 while k crosses
    the link and the cloud works on it, and runs k's backward pass while the cloud works on k+1.
    Both sides accumulate gradients and step their optimizers once per step, so the update is
    the whole batch's (up to float summation order and per-micro-batch dropout).
    ``link.cls_only`` (a cut at the last layer only): send each example's first ([CLS]) row
    alone; above the last layer only per-token operations and the pooler, which reads that row,
    run, so the other rows' gradients are exactly zero.
    """

    def __init__(
        self,
        base: BaseModel,
        spec: SplitSpec,
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
    ):
        """Open a new cloud session, or re-attach to ``session_id`` at one of ``resume_steps``;
        ``start_step`` says where the cloud continues. ``inference_only``: reopen the finished
        session ``session_id`` to predict, export or forget (no step can change it)."""
        link = link or LinkOptions()
        link.validate()
        check_factor_lr(spec.mode, optim.factor_lr)
        if link.cls_only:
            check_cls_only(base, spec)
        self.spec, self.link, self.optim_cfg, self.device = spec, link, optim, device
        self.num_labels = num_labels
        self.decoder = isinstance(base.family, Decoder)
        self.checkpoints = checkpoints
        self.wire = Wire.named(link.wire_dtype, link.compression)
        self.delta = delta_caches(link, spec, spec.cut_width(base.hidden_size), ("up",))
        self.defence = Defence.of(link.dp)  # clipping and noise on the activations sent (or none)
        self.lora = resolve_lora(lora, base.config.model_type)
        open_msg = open_request(
            base,
            spec,
            num_labels,
            optim,
            link,
            batch_size,
            max_seq_len,
            task,
            self.lora,
            session_id,
            resume_steps,
            inference_only,
        )
        self.fingerprint = open_msg.fingerprint
        opened = self._open_session(connect, open_msg, reconnect_timeout, backoff)
        self.net1: EdgeHalf = _net1(base, spec, opened, device)
        if self.lora is not None:  # adapters; the base frozen, u trainable
            apply_lora(self.net1, self.lora, optim.seed, "edge", keep=factor_parameters(self.net1))
        self.optimizer = make_optimizer(
            self.net1.parameters(),
            optim.lr,
            optim.weight_decay,
            factors=factor_parameters(self.net1),
            factor_lr=optim.factor_lr,
        )
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)

    # -- what the trainer and the drop-in API call ---------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        return self.net1

    def train_step(self, step: int, batch: Batch) -> float:
        """One step: net1 forward, the cut across the link, the gradient back, net1 backward and
        update. Returns the step's mean loss as the cloud computed it."""
        self.live_step = step
        self.net1.train()
        self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an interrupted step
        parts = batch.split(self.link.micro_batches)
        examples = len(batch.lengths)
        in_flight: Deque[Tuple[int, torch.Tensor, int]] = collections.deque()
        loss = 0.0
        for micro, part in enumerate(parts):
            packed = self.send_cut(step, part, micro, len(parts), examples)
            in_flight.append((micro, packed, len(part.lengths)))
            if len(in_flight) >= self.link.pipeline_depth:
                loss += self._backward(step, *in_flight.popleft(), examples)
        while in_flight:
            loss += self._backward(step, *in_flight.popleft(), examples)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.live_step = step + 1
        return loss

    def send_cut(
        self, step: int, batch: Batch, micro: int = 0, micro_count: int = 1, examples: int = 0
    ) -> torch.Tensor:
        """net1's forward on ``batch`` (seeded by step and micro-batch) and its cut sent as a
        ``TrainStep``; returns the cut, still on net1's graph, for ``receive_gradient``. With a
        defence the cut is clipped (on the graph) and sent with noise drawn for (step, micro)."""
        self.live_step = step
        with seeded(self.optim_cfg.seed, "edge", step, micro):
            packed, lengths = self._cut(batch)
        noise = self.defence.activations
        packed = noise.clip_rows(packed, lengths)
        sent = noise.add_noise(
            packed.detach(), noise.generator(self.optim_cfg.seed, ACTIVATIONS, step, micro)
        )
        msg = pb.TrainStep(step=step, lengths=lengths)
        self.encode_cut(msg, sent, batch, lengths)
        if self.num_labels == 1:
            msg.targets.extend(batch.labels.float().tolist())
        else:
            msg.labels.extend(batch.labels.tolist())
        if micro_count > 1:
            msg.micro, msg.micro_count, msg.step_examples = micro, micro_count, examples
        self._submit(pb.EdgeMessage(train=msg))
        return packed

    def receive_gradient(self, step: int, packed: torch.Tensor, micro: int = 0) -> Tuple[torch.Tensor, float]:
        """The cloud's answer to the oldest cut in flight: (d loss / d ``packed``, its loss)."""
        reply = self._result().train
        if reply.step != step or reply.micro != micro:
            raise CloudError(
                grpc.StatusCode.INTERNAL,
                f"expected the answer to step {step} micro-batch {micro}, got step {reply.step} "
                f"micro-batch {reply.micro}",
            )
        with checked("the cloud's gradient"):
            grad = self.wire.decode_gradient(reply.grad, "gradient", tuple(packed.shape), device=self.device)
        return grad, reply.loss

    def exchange(self, step: int, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """One whole step's cut sent and answered, without net1's backward or update (the
        drop-in API leaves those to the user's loop): (cut, d loss / d cut, loss)."""
        packed = self.send_cut(step, batch)
        grad, loss = self.receive_gradient(step, packed)
        self.live_step = step + 1
        return packed, grad, loss

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        """The logits of ``batch`` (batch, num_labels) from the current model; changes nothing."""
        self.net1.eval()
        packed, lengths = self._cut(batch)
        noise = self.defence.activations
        packed = noise.apply(
            packed, lengths, noise.generator(self.optim_cfg.seed, EVAL, self.live_step, index)
        )
        msg = pb.EvalStep(batch=index, activations=self.wire.encode_activations(packed), lengths=lengths)
        reply = self.request(pb.EdgeMessage(eval=msg)).eval
        shape = (len(batch.lengths), self.num_labels)
        with checked("the cloud's logits"):
            return codec.decode(reply.logits, name="logits", dtype=pb.FLOAT32, shape=shape)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """net1's trained state: with LoRA its adapters and u, not the frozen base."""
        return owned_state(self.net1)

    # -- the cut --------------------------------------------------------------------------

    def _cut(self, batch: Batch) -> Tuple[torch.Tensor, List[int]]:
        """net1's activations for the real tokens only, (tokens, width), and the lengths that
        say which example each row belongs to (with ``cls_only``: one row per example)."""
        with autocast(self.device):
            a, _ = self.net1(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        if self.link.cls_only:  # the row the head pools: the first, or a decoder's last real one
            rows = (
                torch.tensor(batch.lengths, device=a.device) - 1
                if self.decoder
                else torch.zeros_like(a[:, 0, 0], dtype=torch.long)
            )
            return a[torch.arange(a.shape[0], device=a.device), rows].float(), [1] * len(batch.lengths)
        return a.float()[batch.attention_mask.bool()], batch.lengths

    def _backward(self, step: int, micro: int, packed: torch.Tensor, n: int, examples: int) -> float:
        """One micro-batch's gradient into net1 (gradients accumulate); returns its loss weighted
        by its share of the step's examples."""
        grad, loss = self.receive_gradient(step, packed, micro)
        packed.backward(grad)
        return loss * (n / examples)


def check_cls_only(base: BaseModel, spec: SplitSpec) -> None:
    """``--cls-only`` sends one row an example: exact only where nothing above the cut reads the others."""
    last = base.num_hidden_layers - 1
    if spec.split_layer != last:
        raise ValueError(
            f"--cls-only needs the cut at the last layer ({last}), not {spec.split_layer}: "
            "the layers above the cut read every token"
        )
    if getattr(base.config, "classifier_pooling", "cls") == "mean":
        raise ValueError(
            "--cls-only sends one row an example, but this model's head pools the mean of every token"
        )


def _net1(base: BaseModel, spec: SplitSpec, opened: pb.SessionOpened, device: str) -> EdgeHalf:
    """net1 with the factor the cloud sent (its plain SVD), or none where the cut has none."""
    u, shape = None, spec.cut.edge_factor_shape(base.hidden_size, base.intermediate_size)
    if shape is not None:
        with checked("the cloud's edge factor"):
            u = codec.decode(opened.edge_factor, name="edge factor", dtype=pb.FLOAT32, shape=shape)
    return build_edge_half(base, spec, u, device=device)
