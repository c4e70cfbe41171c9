"""One frozen base for the LoRA sessions of one model and split: a later session is built on it.

Under LoRA a cloud part trains its adapters, its SVD factors and (two-part) its head; every other
tensor stays as the base model has it. The first session of a model and split builds its part
from the base model as usual and ``record``s it here: its frozen tensors (by their name in the
part), its factors' starting values and what the edge is sent at open. A later session builds its
part on the meta device and ``build_on`` puts these in place: the frozen tensors are the first
session's themselves (no copy, not even a transient one), the factors fresh copies of their
starting values; no SVD is computed again, and the base model is read only for what each session
builds itself (a two-part net2's head: its seed and label count are the session's).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Tuple, cast

import torch
from torch import nn


@dataclass
class SharedBase:
    """What the LoRA sessions of one model and split share; filled by the first (``record``)."""

    # The part's frozen parameters and buffers, by their name in the part (PEFT's ``base_layer``
    # left out: ``lora.share_frozen`` finds them under the same names once the adapters are in).
    frozen: Dict[str, torch.Tensor] = field(default_factory=dict)
    start: Dict[str, torch.Tensor] = field(default_factory=dict)  # the factors' values at open
    sent: Any = None  # what the edge is sent at open (the U's EdgeFactors, the two-part u)
    # The base model's tensors a two-part head is built from (``loading.base_tensors``: BERT's
    # pooler), read once: each session's head is its own, but not each one reads the base.
    head: Dict[str, torch.Tensor] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one build at a time records

    @property
    def recorded(self) -> bool:
        """Whether a session has recorded its part (a later one can be built on it)."""
        return bool(self.frozen)


def record(
    shared: SharedBase,
    part: nn.Module,
    trainable: Iterable[nn.Parameter],
    sent: Any,
    per_session: Iterable[nn.Parameter] = (),
) -> None:
    """Keep what a just-built ``part`` shares: its tensors but ``trainable`` (frozen from now on:
    the session's LoRA freezes them), copies of the factors' starting values, and ``sent``.
    ``per_session``: tensors each session builds itself (a two-part net2's head, which depends on
    the session's seed and label count), neither shared nor recorded."""
    own = {id(p) for p in trainable}
    skip = {id(p) for p in per_session}
    for name, tensor in _tensors(part):
        if id(tensor) in skip:
            continue
        if id(tensor) not in own:
            shared.frozen[shared_name(name)] = tensor
        elif name not in shared.start:
            shared.start[name] = tensor.detach().clone()
    shared.sent = sent


def build_on(shared: SharedBase, part: nn.Module, trainable: Iterable[nn.Parameter], device: str) -> None:
    """Give a meta-device ``part`` its tensors from ``shared`` (``recorded``): ``trainable`` ones
    (the factors) fresh storage on ``device`` holding their starting values, every other one the
    shared tensor itself. Parameters the part does not hold (``trainable`` that are not the
    factors, such as a head) are left on meta, for the caller to build."""
    own = {id(p) for p in trainable}
    placed: Dict[int, torch.Tensor] = {}
    for name, tensor in _tensors(part):
        if id(tensor) in placed:
            continue
        if id(tensor) not in own:
            placed[id(tensor)] = shared.frozen[shared_name(name)]
        elif name in shared.start:
            value = torch.empty_like(tensor, device=device)
            with torch.no_grad():
                value.copy_(shared.start[name])
            placed[id(tensor)] = nn.Parameter(value)
    for name, tensor in _tensors(part, remove_duplicate=False):
        if id(tensor) in placed:
            owner, attr = _owner(part, name)
            if attr in owner._parameters:  # a frozen one is the first session's Parameter
                owner._parameters[attr] = cast(nn.Parameter, placed[id(tensor)])
            else:
                owner._buffers[attr] = placed[id(tensor)]


def _tensors(part: nn.Module, remove_duplicate: bool = True) -> Iterable[Tuple[str, torch.Tensor]]:
    """``part``'s parameters, then its buffers, by their names in it."""
    named = list(part.named_parameters(remove_duplicate=remove_duplicate))
    return named + list(part.named_buffers(remove_duplicate=remove_duplicate))


def shared_name(name: str) -> str:
    """A tensor's name in a part as sessions share it: a LoRA-wrapped linear's ``q_proj.base_layer.weight``
    is the ``q_proj.weight`` it was before PEFT wrapped it."""
    return name.replace(".base_layer.", ".")


def _owner(part: nn.Module, name: str) -> Tuple[nn.Module, str]:
    owner_name, _, attr = name.rpartition(".")
    return (part.get_submodule(owner_name) if owner_name else part), attr
