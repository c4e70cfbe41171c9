"""Model families: where each architecture keeps what the split needs, and how it runs it.

``split.py`` is written once over these adapters (``base.Family``: what a family names and runs).
Adding a family: one subclass (a few attributes and the methods that differ) in a module of its
own or beside its kin, listed in ``FAMILIES`` here, and its tests (tests/sft_common/
test_families.py). Layers are called as transformers 5.x calls them; BERT and RoBERTa's also run
under 4.40+ (tuples there), the others are refused before 5.0 (``since``).
"""

from __future__ import annotations

from typing import Optional, Tuple

from sft_common.families.base import (
    Family,
    Modules,
    additive_mask,
    causal_mask,
    fill_buffers,
    layer_output,
)
from sft_common.families.decoders import Decoder, Gpt2, Llama, Qwen2
from sft_common.families.encoders import Bert, DistilBert, Roberta, XlmRoberta

__all__ = [
    "FAMILIES", "Bert", "Decoder", "DistilBert", "Family", "Gpt2", "Llama", "Modules", "Qwen2",
    "Roberta", "XlmRoberta", "additive_mask", "causal_mask", "fill_buffers", "find_family",
    "layer_output", "supported",
]  # fmt: skip

FAMILIES: Tuple[Family, ...] = (Bert(), Roberta(), XlmRoberta(), DistilBert(), Gpt2(), Llama(), Qwen2())


def find_family(model_type: Optional[str]) -> Optional[Family]:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported() -> str:
    """The families and their model types, for refusals: "BERT (bert), RoBERTa (roberta), ..."."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
