"""The cloud's part of a forward-only session: the U's middle with the base's weights, frozen.

``FrozenMiddleSession`` answers ``EvalStep``s (â1 in, the middle's output at the second cut out)
and nothing else: no optimizer state, no training step, no checkpoint, no final weights, so no
gradient, label or loss ever reaches it. The edge trains its tail on what it is sent
(``sft_edge.sessions.forward_only``) and caches it, so each example crosses once. The middle is
built on the frozen base that the LoRA sessions of the same model and cuts share
(``sft_common.models.shared``): a forward-only session costs the daemon no copy of the layers.
With ``side_width`` d (``--adapters parallel``) each answer also carries every middle layer's
output projected to d (``sft_common.topology.side``), for the edge's side network.
With the daemon's ``--batch-window-ms``, evaluations of sessions on one frozen middle, side width
and sequence length run as one forward (``batcher.StepBatcher.evaluate``), each answer its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch

from sft_cloud.sessions.batcher import Job
from sft_cloud.sessions.core import CoreAttributes, SessionCore, not_its_step
from sft_cloud.sessions.host import DEFAULT_HOST, SessionHost
from sft_cloud.sessions.inputs import ActivationInput
from sft_cloud.sessions.middle import check_middle
from sft_cloud.sessions.validation import invalid, ushape_from_config
from sft_common.models.base_model import BaseModel
from sft_common.models.shared import SharedBase
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.side import middle_taps, side_projection
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.topology.ushape import build_ushape_cloud

FULL_WIDTH = ("sl",)  # the modes whose cuts carry the whole hidden state


def check_frozen(config: pb.SessionConfig, spec: SplitSpec, base: BaseModel) -> None:
    """A forward-only U: the middle's cuts as any U's, full width, and nothing to train here."""
    check_middle(config, spec, base)
    if spec.mode not in FULL_WIDTH:
        raise invalid(
            "forward_only: the cuts carry the full width (mode SL): the head is frozen, so a rank-R cut "
            "would drop what the first layers compute for good"
        )
    if config.lora_rank:
        raise invalid("forward_only: the middle is the base's, frozen; LoRA trains on the edge (lora_rank 0)")
    if not 0 <= config.side_width <= base.hidden_size:
        raise invalid(
            f"side_width must be in 0..{base.hidden_size} (the model's width), got {config.side_width}"
        )


class FrozenMiddleSession(CoreAttributes):
    """The U's middle, frozen and shared; evaluations only (each is one forward, no state changes)."""

    def __init__(
        self,
        session_id: str,
        owner: str,
        config: pb.SessionConfig,
        base: BaseModel,
        host: SessionHost = DEFAULT_HOST,
        shared_base: Optional[SharedBase] = None,
    ):
        """As ``MiddleSession``'s; the host's ``checkpoint_dir`` is not used: there is nothing to keep."""
        self.config = config
        self.spec = host.check(config, base, check_frozen)
        self.device = host.device
        self.inputs = ActivationInput(config, self.spec.cut_width(base.hidden_size), host.device)
        middle, _ = build_ushape_cloud(base, ushape_from_config(config), host.device, shared_base)
        middle.requires_grad_(False)  # the shared tensors are frozen for the LoRA sessions too
        middle.eval()
        self.middle = middle  # core.net2, typed
        fingerprint = session_fingerprint(base.fingerprint, self.spec, 0, None, config.tail_layers)
        unkept = dataclasses.replace(host, checkpoint_dir=None)  # no checkpoint, so no lease either
        self.core = SessionCore(session_id, owner, config, fingerprint, middle, [], unkept)
        self.core.inference_only = True  # no step and no final weights: close saves nothing
        self.projection = (  # the side network's P (the edge computes the same), or None
            side_projection(base.fingerprint, base.hidden_size, config.side_width).to(host.device)
            if config.side_width
            else None
        )

    @property
    def width(self) -> int:
        """Values a token at the first cut (the model's width)."""
        return self.inputs.width

    def describe(self) -> str:
        c = self.config
        side = f", each layer's output projected to {c.side_width} for a side network" if c.side_width else ""
        return f"forward-only U (frozen middle{side}, {c.tail_layers} tail layers on the edge) at layer {c.split_layer}"

    def opened(self, at: Optional[int] = None) -> pb.SessionOpened:
        """The answer to an open: full-width cuts, so no factor goes to the edge."""
        return self.core.opened(self.core.next_step if at is None else at, 0, None)

    def step(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        raise not_its_step(
            f"this session is forward-only: the cloud runs the frozen middle for evaluations and takes no {kind}"
        )

    def evaluate(self, msg: pb.EvalStep) -> pb.EvalReply:
        """The frozen middle's output at the second cut for one batch's real tokens; with the
        daemon's batch window, in one forward with other sessions' evaluations on this base."""
        with self.core.lock:
            lengths = self.inputs.lengths(msg.lengths)
            x = self.inputs.decode(msg.activations, lengths)
            padded, mask = self.inputs.unpack(x, lengths)
            job = Job(self, 0, (padded, mask), functools.partial(_real_rows, msg.batch, mask))
            batcher = self.core.batcher
            if batcher is not None and batcher.window > 0:
                rows, side = batcher.evaluate(job)
            else:
                with torch.no_grad(), self.core.compute_lock:
                    rows, side = job.finish(self.forward(padded, mask))
            reply = pb.EvalReply(batch=msg.batch, activations=self.inputs.encode_activations(rows))
            if side is not None:
                reply.side.CopyFrom(self.inputs.encode_activations(side))
            return reply

    def forward(
        self, padded: torch.Tensor, mask: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The middle's output (batch, seq, width) on ``padded`` (batch, seq, width) and ``mask``
        (batch, seq) and, with a side width, its layers' outputs projected (else None). Sessions
        of one frozen middle and side width compute the same: the batcher calls one for all."""
        if self.projection is None:
            return self.core.net2(padded, mask)[0], None
        return middle_taps(self.middle, padded, mask, self.projection)

    def checkpoint(self, msg: pb.Checkpoint) -> pb.CheckpointDone:
        raise not_its_step(
            "this session is forward-only: it holds nothing to checkpoint (the edge's checkpoints are its own)"
        )


def _real_rows(
    batch: int, mask: torch.Tensor, out: Tuple[torch.Tensor, Optional[torch.Tensor]]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(tokens, width) rows of the middle's output at the real tokens (and of its side taps), fp32;
    refused when not finite."""
    rows = out[0][mask].float()
    side = None if out[1] is None else out[1][mask].float()
    if not all(bool(torch.isfinite(t).all()) for t in (rows, side) if t is not None):
        raise invalid(f"batch {batch}: the middle's output is not finite (activations too large?)")
    return rows, side
