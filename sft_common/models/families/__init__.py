"""Model families: where each architecture keeps what the split needs, and how it runs it.

``split.py`` is written once over these adapters (``base.Family``: what a family names and runs):
``encoders`` (BERT, RoBERTa, XLM-R, DistilBERT), ``deberta``, ``modernbert``, ``decoders`` (GPT-2,
Llama, Qwen2). Adding a family: one subclass (a few attributes and the methods that differ) in a
module of its own or beside its kin, listed in ``FAMILIES`` here, a ``tiny-*`` preset
(``models.RANDOM_PRESETS``) and its tests (tests/sft_common/models/test_families.py,
tests/test_families_grpc.py). Layers are called as transformers 5.x calls them; BERT and RoBERTa's
also run under 4.40+ (tuples there), DeBERTa-v2's from 4.47, ModernBERT's from 5.1, the others from
5.0; an older transformers is refused by name (``Family.since``, ``Family.too_old``).
"""

from __future__ import annotations

from typing import Optional, Tuple

from sft_common.models.families.base import (
    Family,
    Modules,
    additive_mask,
    causal_mask,
    fill_buffers,
    layer_output,
)
from sft_common.models.families.deberta import DebertaV2
from sft_common.models.families.decoders import Decoder, Gpt2, Llama, Qwen2
from sft_common.models.families.encoders import Bert, DistilBert, Roberta, XlmRoberta
from sft_common.models.families.modernbert import ModernBert

__all__ = [
    "FAMILIES",
    "Bert",
    "DebertaV2",
    "Decoder",
    "DistilBert",
    "Family",
    "Gpt2",
    "Llama",
    "ModernBert",
    "Modules",
    "Qwen2",
    "Roberta",
    "XlmRoberta",
    "additive_mask",
    "causal_mask",
    "fill_buffers",
    "find_family",
    "layer_output",
    "supported",
]

FAMILIES: Tuple[Family, ...] = (
    Bert(),
    Roberta(),
    XlmRoberta(),
    DistilBert(),
    DebertaV2(),
    ModernBert(),
    Gpt2(),
    Llama(),
    Qwen2(),
)


def find_family(model_type: Optional[str]) -> Optional[Family]:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported() -> str:
    """The families and their model types, for refusals: "BERT (bert), RoBERTa (roberta), ..."."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
