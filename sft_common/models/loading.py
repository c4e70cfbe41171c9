"""Building models from a ``BaseModel`` without random draws: a meta-device skeleton of the whole
classifier, and materialising any part of it from the checkpoint, loading only that part's tensors
(the two-part and U-shape builders, the cuts).

The public API: ``model_skeleton`` (the modules, no storage), ``materialise`` (storage and values
for a part), ``base_tensors`` (the checkpoint's tensors it reads for a part), ``base_values`` (the
checkpoint's values of some of a model's tensors),
``named_tensors`` (a module's parameters and buffers) and ``init_head``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.models.base_model import BaseModel, family_of
from sft_common.models.families import Decoder, fill_buffers


def init_head(model: Any, seed: int) -> None:
    """Initialise the head's last linear from ``seed`` alone, so every builder gets the same head."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    linear = family_of(model.config).head_linear(model)
    with torch.no_grad():
        w = torch.empty(linear.weight.shape).normal_(0.0, std, generator=g)
        linear.weight.copy_(w)
        if linear.bias is not None:
            linear.bias.zero_()


def model_skeleton(base: BaseModel, num_labels: int) -> nn.Module:
    """The model's modules with no storage (meta device): cheap, however large the model."""
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if isinstance(base.family, Decoder):  # HF pools the last non-pad token; collate pads with 0
        config.pad_token_id = 0
    classifier = base.family.model_class(1)
    with torch.device("meta"):
        return classifier(config)


def named_tensors(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """A module's parameters, then its buffers, by their names in it."""
    return list(module.named_parameters()) + list(module.named_buffers())


def base_values(base: BaseModel, model: nn.Module, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """The base model's values of ``tensors`` (tensors of ``model``, found by their names in it),
    in order, each asserted to have its tensor's shape."""
    names = {id(t): base.family.base_name(n) for n, t in named_tensors(model)}
    values = base.load(names[id(t)] for t in tensors)
    found = [values[names[id(t)]] for t in tensors]
    for tensor, value in zip(tensors, found):
        assert value.shape == tensor.shape, (
            f"{names[id(tensor)]}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}"
        )
    return found


def materialise(
    module: nn.Module,
    base: BaseModel,
    model: nn.Module,
    seed: int,
    device: str,
    skip: Tuple[str, ...] = (),
    loaded: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Give ``module`` (``model`` or a part of it) storage on ``device`` and fill it from the base
    model's tensors, found by each tensor's name in ``model`` (the family strips its prefix).

    The children named in ``skip`` are already built and left alone. Tensors the checkpoint
    lacks: the head's new tensors come from ``seed``; position / token-type ids and rotary
    frequencies are recomputed; anything else is an error. ``loaded``: ``base_tensors`` of this
    module, read before (the base model is not read again; the values are only copied from).
    """
    family = base.family
    sources = _sources(module, base, model)
    for child_name, child in module.named_children():
        if child_name not in skip:
            child.to_empty(device=device)
    own = [(n, t) for n, t in named_tensors(module) if n.split(".", 1)[0] not in skip]
    tensors = base.load(src for src in sources.values() if src is not None) if loaded is None else loaded
    gen = torch.Generator().manual_seed(seed)
    computed: List[str] = []
    with torch.no_grad():
        for name, tensor in own:
            src = sources[name]
            if src is not None and src in tensors:
                value = tensors[src]
                assert value.shape == tensor.shape, (
                    f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}"
                )
                tensor.copy_(value)
            elif name.endswith(("position_ids", "token_type_ids", "inv_freq")):
                computed.append(name)
            elif src is not None and src.startswith(family.head_new):
                if tensor.dim() > 1:
                    tensor.copy_(torch.empty(tensor.shape).normal_(0.0, 0.02, generator=gen))
                else:  # biases 0, a norm's scale 1 (ModernBERT's head)
                    tensor.fill_(float(src.lower().endswith("norm.weight")))
            else:
                raise KeyError(f"{name} ({src}) is missing from the checkpoint of {base.name!r}")
    fill_buffers(module, computed)


def base_tensors(module: nn.Module, base: BaseModel, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's tensors ``materialise`` fills ``module`` (a part of ``model``) from, by
    their names in the base model; those it lacks are absent."""
    return base.load(src for src in _sources(module, base, model).values() if src is not None)


def _sources(module: nn.Module, base: BaseModel, model: nn.Module) -> Dict[str, Optional[str]]:
    """Each of ``module``'s tensors (by its name in it): its name in the base model, or None."""
    names = {id(t): n for n, t in named_tensors(model)}
    return {
        n: base.family.base_name(names[id(t)]) if id(t) in names else None for n, t in named_tensors(module)
    }
