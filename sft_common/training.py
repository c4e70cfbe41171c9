"""What both halves of a training run share: the optimizer, the LR schedule, per-step seeds."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from sft_common.topology.two_part import task_loss


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    factors: Sequence[torch.nn.Parameter] = (),
    factor_lr: Optional[float] = None,
) -> torch.optim.AdamW:
    """AdamW, as in the Hugging Face GLUE recipe. Per-parameter, so two halves each running
    their own optimizer update exactly as one optimizer over the whole model would.

    ``factor_lr``: the learning rate of ``factors`` (the SVD factors u, Σ, v: see
    ``split.factor_parameters``), in a parameter group of their own; None: ``lr`` for all, one
    group. The schedule scales both groups alike.

    The fused kernel where this torch has one for the parameters' device (CUDA; CPU from torch
    2.4): it updates in place, where the default multi-tensor step allocates temporaries the
    size of the parameters (44 MiB for MiniLM's word embeddings, measured; docs/benchmarks.md §5).
    """
    trainable = [p for p in params if p.requires_grad]
    groups: list = trainable or [{"params": []}]  # nothing to train (a forward-only middle): a no-op
    if factor_lr is not None and factors:
        ids = {id(p) for p in factors}
        groups = [
            {"params": [p for p in trainable if id(p) not in ids]},
            {"params": [p for p in trainable if id(p) in ids], "lr": factor_lr},
        ]
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device / version
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR, then linear decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, side: str, step: int, micro: int = 0) -> int:
    """The RNG seed for one side's work on one step, or one micro-batch of it (dropout masks).

    Derived, not carried: a step's randomness depends only on (seed, side, step, micro), so a
    resumed or retried step draws the same dropout masks as it would have the first time.
    Micro-batch 0 draws what the whole step would.
    """
    key = f"{seed}:{side}:{step}" + (f":{micro}" if micro else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def one_process_step(
    edge: torch.nn.Module,
    cloud: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    batch: Any,
    seed: int,
    step: int,
    micro_batches: int = 1,
) -> float:
    """One step of the split model with both halves in this process, computed as split training
    computes it: each side's dropout seeded per (step, micro-batch) as that side seeds it, each
    micro-batch's mean loss weighted by its share of the batch, one update a step. Returns the
    step's loss. The reference the split is tested against (tests/helpers.py), and the loop of
    bench/studies/residual_ablation.py."""
    total = 0.0
    for i, part in enumerate(batch.split(micro_batches)):
        torch.manual_seed(step_seed(seed, "edge", step, i))
        cut, residual = edge(part.input_ids, part.attention_mask, part.token_type_ids)
        torch.manual_seed(step_seed(seed, "cloud", step, i))
        loss = task_loss(cloud(cut, part.attention_mask, residual), part.labels)
        share = len(part.lengths) / len(batch.lengths)
        (loss * share).backward()
        total += float(loss.detach()) * share
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@contextlib.contextmanager
def seeded(seed: int, side: str, step: int, micro: int = 0) -> Iterator[None]:
    """Dropout masks of one side's work on one step (micro-batch): a function of the step."""
    torch.manual_seed(step_seed(seed, side, step, micro))
    yield


def resolve_device(device: str) -> str:
    """``--device``: auto picks CUDA where torch sees it; cuda without a CUDA device is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def autocast(device: str) -> contextlib.AbstractContextManager:
    """Mixed precision where it helps: bf16 autocast on GPUs that have it, else full precision."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
