"""The edge's calibration pass for ``--svd-init activation-aware``: net1 on a few training batches up
to what enters its factor, that input's second moment, and the factors it gives.

- The FFN-output cut: g, the cut layer's FFN activation (the input of ``u``); whitened factors of
  the FFN output weight W (``sft_common.whiten.whitened_factors``). The edge keeps u; the cloud is
  sent Σ_R (``OpenSession.cloud_sigma``) and v (``cloud_v``, (R, hidden)).
- The FFN-input cut (``--factorise ffn-input``): r, the post-attention residual stream (the input
  of ``A``); its top-R principal directions V_R (``principal_directions``): A = V_Rᵀ here, B = V_R
  on the cloud, sent as ``cloud_v`` = V_Rᵀ (R, hidden), with no Σ.

The statistics come from the device's data, so they are computed here and never sent; what the
factors reveal of them: docs/privacy.md.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from sft_common.models import BaseModel
from sft_common.spec import FFN_INPUT, SplitSpec

# The meta-device builders (no storage, no random draws), as build_cloud_half uses them.
from sft_common.split import EdgeHalf, _ffn_out, _materialise, _skeleton, build_edge_half
from sft_common.whiten import SecondMoment, principal_directions, whitened_factors
from sft_edge.data import Batch

log = logging.getLogger("sft_edge")
# Below this many calibration tokens per rank the top-R directions sent to the cloud are those of a
# handful of activations (with n <= R tokens, exactly their span): warned about, not refused.
FEW_TOKENS_PER_RANK = 32


def ffn_output_weight(base: BaseModel, spec: SplitSpec) -> torch.Tensor:
    """The cut layer's FFN output weight W (hidden, intermediate), public: read by name from the
    base model alone (GPT-2's Conv1D transposed as ``Family.ffn_weight`` does)."""
    model = _skeleton(base, num_labels=2)
    _, _, linear, _, _ = _ffn_out(base.family, base.family.layers(model)[spec.split_layer])
    _materialise(nn.ModuleList([linear]), base, model, 0, "cpu")
    return base.family.ffn_weight(linear).detach()


def _factor(net1: EdgeHalf) -> nn.Linear:
    """The edge's factor: ``u`` (FFN-output cut) or ``A`` (FFN-input cut)."""
    return net1.a if net1.spec.factorise == FFN_INPUT else net1.u


@torch.no_grad()
def input_moment(net1: EdgeHalf, batches: Iterable[Batch], device: str) -> SecondMoment:
    """E[x xᵀ] (float64) of what enters net1's factor (g, or r at the FFN-input cut), over the
    real tokens of ``batches``, in eval mode (no dropout)."""
    seen: List[torch.Tensor] = []
    factor = _factor(net1)
    hook = factor.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    moment = SecondMoment(factor.in_features)
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
) -> Tuple[EdgeHalf, Optional[torch.Tensor], torch.Tensor]:
    """net1 with its activation-aware factor, and the cloud's: Σ (R,) and v (R, hidden) for the
    FFN-output cut; None and V_Rᵀ (R, hidden) for the FFN-input cut."""
    shape = spec.edge_factor_shape(base.hidden_size, base.intermediate_size)
    net1 = build_edge_half(base, spec, torch.zeros(shape), device=device)  # what enters it is all we need
    moment = input_moment(net1, batches, device)
    sigma: Optional[torch.Tensor] = None
    if spec.factorise == FFN_INPUT:
        v = principal_directions(moment.matrix(), spec.rank).t().contiguous()
        edge = v  # A = V_Rᵀ
    else:
        u, sigma, v = whitened_factors(ffn_output_weight(base, spec), moment.matrix(), spec.rank)
        edge = u.t()
    with torch.no_grad():
        _factor(net1).weight.copy_(edge)
    log.info(
        "activation-aware init: %d calibration tokens at layer %d (%s), rank %d",
        moment.count, spec.split_layer, spec.factorise, spec.rank,
    )  # fmt: skip
    if moment.count < FEW_TOKENS_PER_RANK * spec.rank:
        log.warning(
            "only %d calibration tokens for rank %d: the factors sent to the cloud come close to "
            "spanning these examples' own activations (docs/privacy.md); use more "
            "--calibration-batches (at least %d tokens)",
            moment.count, spec.rank, FEW_TOKENS_PER_RANK * spec.rank,
        )  # fmt: skip
    return net1, sigma, v
