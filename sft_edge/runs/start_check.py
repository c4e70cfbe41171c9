"""Step 0 of a split causal LM against the unsplit model: a warning when a cut or wire has broken it.

Before any training, a split model whose cut and wire carry the model computes the unsplit model's
function (to the wire's rounding), so its dev loss at step 0 is the unsplit model's. A rank-R cut
of a pre-LN decoder does not carry it: SmolLM2 at R=8 starts at perplexity 3.1e10 against 8.35
(docs/accuracy.md), and nothing said so until the generated text was gibberish. So a split
causal-LM run also evaluates the unsplit model here, on the same dev rows, once at step 0 (it
needs the whole model in this process for that one evaluation), and warns when the split model
starts more than ``THRESHOLD`` above it, naming the setting to change. The report's
``start_check`` holds both losses.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from sft_edge.runs.config import TrainConfig
from sft_edge.runs.problems import evaluate_lm

log = logging.getLogger("sft_edge")

THRESHOLD = 0.05  # the split model's dev loss at step 0 may exceed the unsplit model's by this share


class UnsplitLM:
    """The whole causal LM as a session's ``predict`` (for ``evaluate_lm``)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def predict(self, batch: Any, index: int = 0) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


# The setting to change, by the run's --mode (sft: a rank-R cut; sl: the full width, so the wire).
ADVICE = {
    "sft": "its rank-{rank} cut drops the decoder's residual stream: train with --mode sl --wire-dtype "
    "int4-6-hadamard-grad4 (the full width at 4.3 and 6.3 bits a value; docs/accuracy.md)",
    "sl": "--wire-dtype {wire} rounds the hidden states too coarsely for this model: try --wire-dtype int8 "
    "(or fp16)",
}


def advice(cfg: TrainConfig) -> str:
    """The setting to change, for this run's cut and wire."""
    return ADVICE[cfg.mode or "sft"].format(rank=cfg.rank, wire=cfg.wire_dtype)


def start_check(cfg: TrainConfig, run: Any, split_loss: float) -> Optional[Dict[str, float]]:
    """The unsplit model's dev loss beside the split model's at step 0, with a warning logged when
    the split one is more than ``THRESHOLD`` above it; None where nothing crosses a link (the
    causal-LM problem calls this: ``CausalLM.start_check``)."""
    if not run.kind.has_link:
        return None
    from sft_common.topology.ushape_lm import build_causal_lm

    model = build_causal_lm(run.base, cfg.seed, run.device).eval()
    unsplit = evaluate_lm(UnsplitLM(model), run.dev_data, cfg.batch_size, run.device)["loss"]
    del model
    excess = (split_loss - unsplit) / abs(unsplit) if unsplit else 0.0
    if excess > THRESHOLD:
        log.warning(
            "the split model starts at dev loss %.4g, %.0f%% above the unsplit model's %.4g: %s",
            split_loss,
            100 * excess,
            unsplit,
            advice(cfg),
        )
    return {"split_loss": split_loss, "unsplit_loss": unsplit, "excess": excess}
