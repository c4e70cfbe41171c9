"""What every edge session offers the trainer (``Session``), and the one ``SessionConfig`` builder.

Four classes implement ``Session``: ``EdgeSession`` (the two-part split), ``UShapeSession`` (the
label-private U), ``ForwardOnlySession`` (the U with a frozen head and middle) and ``LocalSession``
(the unsplit model, no cloud); the last two checkpoint all they train here (``StateHere``). The trainer, evaluation,
predict and generate use only these members. The two split sessions open their cloud session with
the ``pb.OpenSession`` that ``open_request`` builds (its ``SessionConfig`` and fingerprint; the U's
with its tail).
"""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence

import torch

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import LoraSpec, lora_record
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import FFN_INPUT, FFN_OUTPUT, SplitSpec, session_fingerprint
from sft_common.wire.codecs import Wire
from sft_common.wire.delta import DeltaCaches, DeltaMode, new_salt
from sft_edge.data.glue import Batch
from sft_edge.runs.config import LinkOptions, OptimConfig

# The cut's settings as the protocol spells them.
WIRE_MODES = {"sft": pb.SFT, "sl": pb.SL}
WIRE_FACTORISE = {FFN_OUTPUT: pb.FFN_OUTPUT, FFN_INPUT: pb.FFN_INPUT}


class Session(Protocol):
    """One run's trainable model on this device, and whatever it trains with (a cloud session)."""

    start_step: int  # the step training continues from (a resumed session's)
    session_id: str  # the cloud session's id ("" for the local one)
    checkpoints: Optional[CheckpointDir]
    resumes: int  # re-attachments after broken links
    bytes_sent: int  # serialized bytes over every stream of the session
    bytes_received: int

    @property
    def module(self) -> torch.nn.Module:
        """This side's trained module (what its checkpoints and the run's weights hold)."""
        ...

    def current_lr(self) -> float:
        """The learning rate the next ``train_step`` uses (the schedule's, for the progress bar)."""
        ...

    def train_step(self, step: int, batch: Batch) -> float:
        """One optimizer step on ``batch``; returns its mean loss."""
        ...

    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        """The logits of ``batch`` from the current model; changes nothing."""
        ...

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What training owns of ``module`` (with LoRA: not the frozen base)."""
        ...

    def checkpoint(self, step: int, run: Dict) -> None: ...

    def restore(self, step: int) -> Dict: ...

    def close(self) -> Optional[int]:
        """End the session; the number of steps the cloud applied (None: no cloud)."""
        ...


class StateHere:
    """``checkpoint`` and ``restore`` of a session whose whole trained state is on this device
    (``LocalSession``; ``ForwardOnlySession``, whose cloud holds nothing of the run): no cloud
    to agree on a step with, so this side's ``module``, optimizer and schedule go to disk alone."""

    checkpoints: Optional[CheckpointDir]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    device: str

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def checkpoint(self, step: int, run: Dict) -> None:
        assert self.checkpoints is not None, "checkpoint() needs a checkpoint folder"
        self.checkpoints.save_state(step, self.module, self.optimizer, self.schedule, run=run)

    def restore(self, step: int) -> Dict:
        assert self.checkpoints is not None
        state = self.checkpoints.load_state(step, self.module, self.optimizer, self.schedule, self.device)
        return state["run"]


def session_config(
    base_name: str,
    spec: SplitSpec,
    num_labels: int,
    optim: OptimConfig,
    wire: Wire,
    batch_size: int,
    max_seq_len: int,
    task: str,
    lora: Optional[LoraSpec],
) -> pb.SessionConfig:
    """What the cloud is told at open: the model and the cut, the wire, the optimizer and its
    schedule (the same on both sides), the largest batch it must accept, the LoRA asked for."""
    config = pb.SessionConfig(
        model=base_name,
        mode=WIRE_MODES[spec.mode],
        split_layer=spec.split_layer,
        rank=spec.rank,
        num_labels=num_labels,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_steps,
        total_steps=optim.total_steps,
        seed=optim.seed,
        max_batch_size=batch_size,
        max_seq_len=max_seq_len,
        task=task,
        factor_lr=optim.factor_lr or 0.0,
        factorise=WIRE_FACTORISE[spec.factorise],
    )
    wire.configure(config)
    if lora is not None:
        config.lora_rank, config.lora_alpha = lora.rank, lora.alpha
        config.lora_targets.extend(lora.targets)
    return config


def open_request(
    base: BaseModel,
    spec: SplitSpec,
    num_labels: int,
    optim: OptimConfig,
    link: LinkOptions,
    batch_size: int,
    max_seq_len: int,
    task: str,
    lora: Optional[LoraSpec],
    session_id: str,
    resume_steps: Sequence[int],
    inference_only: bool,
    tail_layers: Optional[int] = None,
) -> pb.OpenSession:
    """The message that opens (or re-attaches to, or reopens for inference) a cloud session:
    ``session_config`` and the fingerprint of the halves it shapes. ``spec``: the two-part split,
    or the U's first cut with ``tail_layers`` (the U: label-private, the cloud told 0 labels)."""
    wire = Wire.named(link.wire_dtype, link.compression)
    config = session_config(base.name, spec, num_labels, optim, wire, batch_size, max_seq_len, task, lora)
    chosen = DeltaMode.named(link.delta_cache_mb)
    if chosen is not None and not inference_only:
        chosen.configure(config)
    if tail_layers is not None:
        config.label_private, config.tail_layers = True, tail_layers
    fingerprint = session_fingerprint(base.fingerprint, spec, num_labels, lora_record(lora), tail_layers)
    return pb.OpenSession(
        config=config,
        fingerprint=fingerprint,
        session_id=session_id,
        resume_steps=list(resume_steps),
        inference_only=inference_only,
        pack_stream=wire.packed,
    )


def delta_caches(
    link: LinkOptions, spec: SplitSpec, width: int, cuts: Sequence[str]
) -> Optional[DeltaCaches]:
    """Delta mode's caches for a split session whose cuts are ``width`` wide (None: off), with a
    new salt for the example keys (a checkpoint's replaces it on restore)."""
    chosen = DeltaMode.named(link.delta_cache_mb)
    if chosen is None:
        return None
    if not spec.cut.carries_hidden_state:
        raise ValueError("--delta-cache-mb is for full-width cuts (--mode sl): a rank-R cut sends factors")
    return DeltaCaches(chosen, width, cuts, new_salt())


def delta_memory(session: object) -> Optional[int]:
    """Bytes delta mode's caches hold on this side (None: the session has none)."""
    caches = getattr(session, "delta", None)
    return caches.used if isinstance(caches, DeltaCaches) else None
