"""The whole unsplit model in this process (``--local``): the baseline split training is compared with.

A classifier, or (``--problem causal-lm``) Hugging Face's causal LM with the loss on the
labelled tokens, the U's loss (``sft_common.topology.ushape_lm.build_causal_lm``).

``LocalSession`` offers what ``EdgeSession`` offers the trainer (train_step, predict, checkpoint,
restore, close, traffic counters), so one loop drives both.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from sft_common.models.base_model import BaseModel
from sft_common.models.families import Decoder
from sft_common.models.lora import LoraSpec, apply_lora, lora_on_model
from sft_common.storage.checkpoint import CheckpointDir, owned_state
from sft_common.topology.two_part import build_full_model
from sft_common.training import autocast, make_optimizer, make_schedule, seeded
from sft_edge.data.glue import Batch
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.base import StateHere
from sft_edge.sessions.tail_end import tail_end_of


class LocalSession(StateHere):
    """The whole model, its optimizer and schedule; no link, so no traffic and no resumes."""

    bytes_sent = 0
    bytes_received = 0
    resumes = 0
    session_id = ""

    def __init__(
        self,
        base: BaseModel,
        num_labels: int,
        optim: OptimConfig,
        device: str = "cpu",
        checkpoints: Optional[CheckpointDir] = None,
        start_step: int = 0,
        lora: Optional[LoraSpec] = None,
        causal_lm: bool = False,
    ):
        self.optim_cfg = optim
        self.device = device
        self.checkpoints = checkpoints
        self.start_step = start_step
        self.model = build_local_model(base, num_labels, optim.seed, device, lora, causal_lm)
        # the U's loss: the task head's, or the next-token loss on the labelled tokens
        self.loss = tail_end_of(causal_lm).loss
        self.decoder = isinstance(base.family, Decoder)
        self.optimizer = make_optimizer(self.model.parameters(), optim.lr, optim.weight_decay)
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def _logits(self, batch: Batch) -> torch.Tensor:
        kwargs = {} if self.decoder else {"token_type_ids": batch.token_type_ids}  # GPT-2 would add them
        with autocast(self.device):
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        return out.logits.float()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, step: int, batch: Batch) -> float:
        self.model.train()
        with seeded(self.optim_cfg.seed, "local", step):
            loss = self.loss(self._logits(batch), batch.labels)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        self.model.eval()
        return self._logits(batch)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained state: with LoRA the adapters and the head, not the frozen base."""
        return owned_state(self.model)

    def close(self) -> Optional[int]:
        return None


def build_local_model(
    base: BaseModel,
    num_labels: int,
    seed: int,
    device: str = "cpu",
    lora: Optional[LoraSpec] = None,
    causal_lm: bool = False,
) -> torch.nn.Module:
    """The whole model ``--local`` trains (and a ``--local`` run's folder loads into): the
    classifier with its seeded head, or the causal LM; with LoRA, the adapters on it, the
    classifier's head trainable, the LM head frozen (as on the U's tail)."""
    if not causal_lm:
        model = build_full_model(base, num_labels, seed, device=device)
        if lora is not None:  # the same adapters on the whole model; its head stays trainable
            lora_on_model(model, lora, seed)
        return model
    from sft_common.topology.ushape_lm import build_causal_lm

    model = build_causal_lm(base, seed, device)
    if lora is not None:
        apply_lora(model, lora.resolved(base.config.model_type), seed, "local", keep=[])
    return model
