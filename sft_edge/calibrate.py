"""The edge's calibration pass for ``--svd-init activation-aware``: net1 on a few training batches up
to the cut layer's FFN activation g, the second moment of g, and the whitened factors it gives.

The statistics come from the device's data, so they are computed here and never sent: the cloud
gets Σ_R and v (``OpenSession.cloud_sigma``, ``cloud_v``), the edge keeps u (``sft_common.whiten``
for the math; docs/privacy.md for what Σ_R and v reveal).
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Tuple

import torch
from torch import nn

from sft_common.models import BaseModel
from sft_common.spec import SplitSpec

# The meta-device builders (no storage, no random draws), as build_cloud_half uses them.
from sft_common.split import EdgeHalf, _ffn_out, _materialise, _skeleton, build_edge_half
from sft_common.whiten import SecondMoment, whitened_factors
from sft_edge.data import Batch

log = logging.getLogger("sft_edge")


def ffn_output_weight(base: BaseModel, spec: SplitSpec) -> torch.Tensor:
    """The cut layer's FFN output weight W (hidden, intermediate), public: read by name from the
    base model alone (GPT-2's Conv1D transposed as ``Family.ffn_weight`` does)."""
    model = _skeleton(base, num_labels=2)
    _, _, linear, _, _ = _ffn_out(base.family, base.family.layers(model)[spec.split_layer])
    _materialise(nn.ModuleList([linear]), base, model, 0, "cpu")
    return base.family.ffn_weight(linear).detach()


@torch.no_grad()
def activation_moment(net1: EdgeHalf, batches: Iterable[Batch], device: str) -> SecondMoment:
    """E[g gᵀ] (float64) of the FFN activation g that enters net1's ``u``, over the real tokens of
    ``batches``, in eval mode (no dropout)."""
    seen: List[torch.Tensor] = []
    hook = net1.u.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    moment = SecondMoment(net1.u.in_features)
    was_training = net1.training
    net1.eval()
    try:
        for batch in batches:
            b = batch.to(device)
            seen.clear()
            net1(b.input_ids, b.attention_mask, b.token_type_ids)
            moment.add(seen[0][b.attention_mask.bool()])
    finally:
        hook.remove()
        net1.train(was_training)
    return moment


def calibrated_edge_half(
    base: BaseModel, spec: SplitSpec, batches: Iterable[Batch], device: str = "cpu"
) -> Tuple[EdgeHalf, torch.Tensor, torch.Tensor]:
    """net1 with its activation-aware u, and the cloud's factors Σ (R,) and v (R, hidden)."""
    placeholder = torch.zeros(base.intermediate_size, spec.rank)  # g does not depend on u
    net1 = build_edge_half(base, spec, placeholder, device=device)
    moment = activation_moment(net1, batches, device)
    u, sigma, v = whitened_factors(ffn_output_weight(base, spec), moment.matrix(), spec.rank)
    with torch.no_grad():
        net1.u.weight.copy_(u.t())
    log.info(
        "activation-aware init: %d calibration tokens at layer %d, rank %d (Σ %.3g .. %.3g)",
        moment.count, spec.split_layer, spec.rank, float(sigma[0]), float(sigma[-1]),
    )  # fmt: skip
    return net1, sigma, v
