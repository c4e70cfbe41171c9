"""What the U's tail ends in, chosen once per session: a task head and its loss, or the LM head and the next-token loss.

``tail_end_of(causal_lm)`` resolves the run's problem into a ``TailEnd``: how the edge's two parts
(the head, and the tail with its end) are built, and the loss on the tail's logits. The U-shaped
sessions (``ushape``, ``forward_only``) ask it and never branch on the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from sft_common.models.base_model import BaseModel
from sft_common.topology.two_part import task_loss
from sft_common.topology.ushape import EdgeFactors, UShapeSpec, build_ushape_edge, build_ushape_model
from sft_common.topology.ushape_lm import build_ushape_lm_edge, build_ushape_lm_model
from sft_edge.data.lm import lm_loss

Parts = Tuple[nn.Module, nn.Module]


@dataclass(frozen=True)
class TailEnd:
    """How the edge's parts of a U are built, and the loss of the tail's logits against the labels."""

    name: str
    build: Callable[[BaseModel, UShapeSpec, int, int, Optional[EdgeFactors], str], Parts]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # the three parts in one process from the base (an export, the reference): (base, spec, labels, seed, device)
    model: Callable[[BaseModel, UShapeSpec, int, int, str], Tuple[nn.Module, nn.Module, nn.Module]]


def lm_parts(
    base: BaseModel, spec: UShapeSpec, num_labels: int, seed: int, factors: Optional[EdgeFactors], device: str
) -> Parts:
    """The head and the LM tail (the model's LM head: no label count)."""
    return build_ushape_lm_edge(base, spec, seed, factors, device)


def lm_model(
    base: BaseModel, spec: UShapeSpec, num_labels: int, seed: int, device: str
) -> Tuple[nn.Module, nn.Module, nn.Module]:
    return build_ushape_lm_model(base, spec, seed, device)


TASK = TailEnd("task head", build_ushape_edge, task_loss, build_ushape_model)
LM = TailEnd("LM head", lm_parts, lm_loss, lm_model)


def tail_end_of(causal_lm: bool) -> TailEnd:
    """The tail's end for a causal LM (``--problem causal-lm``) or any other problem."""
    return LM if causal_lm else TASK
