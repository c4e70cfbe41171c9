"""LoRA on a cloud session's net2: adapters seeded by the session, the frozen base shared by the daemon's sessions."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, List, Optional

import torch

from sft_cloud.sessions.validation import invalid
from sft_common.models.lora import LoraSpec, apply_lora, share_frozen
from sft_common.models.shared import SharedBase


def adapt_lora(
    net2: torch.nn.Module,
    lora: Optional[LoraSpec],
    seed: int,
    side: str,
    keep: List[torch.nn.Parameter],
    shared_base: Optional[SharedBase],
    compute_lock: Optional[threading.Lock] = None,
) -> Optional[Dict[str, Any]]:
    """LoRA on net2 when the config asks for it (``lora``; None: every parameter trains): adapters
    seeded by (``seed``, ``side``), the other parameters frozen but ``keep``, the frozen base shared
    with the other sessions of this model and split (``shared_base``, filled by the first).
    Returns what the session's fingerprint records of it (None: no LoRA)."""
    if lora is None:
        return None
    try:
        # the adapters are drawn from the process's RNG: not while another session's step draws
        with compute_lock or contextlib.nullcontext():
            apply_lora(net2, lora, seed, side, keep)
    except ValueError as exc:  # PEFT: no module of that name to adapt
        raise invalid(f"--lora-targets: {exc}") from None
    if shared_base is not None:
        share_frozen(net2, shared_base.frozen)
    return lora.as_dict()
