"""The edge's calibration pass for ``--svd-init activation-aware`` and ``residual-aware``: net1 on a
few training batches up to what enters its factor, that input's second moment, and the factors it
gives.

- The FFN-output cut: g, the cut layer's FFN activation (the input of ``u``); whitened factors of
  the FFN output weight W (``sft_common.cuts.whiten.whitened_factors``). The edge keeps u; the cloud is
  sent Σ_R (``OpenSession.cloud_sigma``) and v (``cloud_v``, (R, hidden)).
- ``residual-aware`` (the FFN-output cut only): also the residual r the cut drops, and the factors
  that best predict the layer's whole output r + W g from g (``whiten.residual_aware_factors``);
  the same Σ and v are sent.
- The FFN-input cut (``--factorise ffn-input``): r, the post-attention residual stream (the input
  of ``A``); its top-R principal directions V_R (``principal_directions``): A = V_Rᵀ here, B = V_R
  on the cloud, sent as ``cloud_v`` = V_Rᵀ (R, hidden), with no Σ.

The statistics come from the device's data, so they are computed here and never sent; what the
factors reveal of them: docs/privacy.md.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from sft_common.cuts.whiten import (
    CrossMoment,
    SecondMoment,
    principal_directions,
    residual_aware_factors,
    whitened_factors,
)
from sft_common.models.base_model import BaseModel

# The meta-device builders (no storage, no random draws), as build_cloud_half uses them.
from sft_common.models.loading import materialise, model_skeleton
from sft_common.topology.spec import FFN_INPUT, RESIDUAL_AWARE, SplitSpec
from sft_common.topology.two_part import EdgeHalf, build_edge_half
from sft_edge.data.glue import Batch

log = logging.getLogger("sft_edge")
# Below this many calibration tokens per rank the top-R directions sent to the cloud are those of a
# handful of activations (with n <= R tokens, exactly their span): warned about, not refused.
FEW_TOKENS_PER_RANK = 32


def ffn_output_weight(base: BaseModel, spec: SplitSpec) -> torch.Tensor:
    """The cut layer's FFN output weight W (hidden, intermediate), public: read by name from the
    base model alone (GPT-2's Conv1D transposed as ``Family.ffn_weight`` does)."""
    model = model_skeleton(base, num_labels=2)
    _, _, linear, _, _ = base.family.ffn_output(base.family.layers(model)[spec.split_layer])
    materialise(nn.ModuleList([linear]), base, model, 0, "cpu")
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
    try:
        with _eval_mode(net1):
            for batch in batches:
                b = batch.to(device)
                seen.clear()
                net1(b.input_ids, b.attention_mask, b.token_type_ids)
                moment.add(seen[0][b.attention_mask.bool()])
    finally:
        hook.remove()
    return moment


@torch.no_grad()
def residual_moments(
    net1: EdgeHalf, batches: Iterable[Batch], device: str
) -> Tuple[SecondMoment, CrossMoment]:
    """At the FFN-output cut: E[g gᵀ] of the FFN activation and E[r gᵀ] of the residual against it
    (float64), over the real tokens of ``batches``, in eval mode."""
    moment = SecondMoment(net1.u.in_features)
    cross: Optional[CrossMoment] = None
    with _eval_mode(net1):
        for batch in batches:
            b = batch.to(device)
            g, r = net1.cut_inputs(b.input_ids, b.attention_mask, b.token_type_ids)
            real = b.attention_mask.bool()
            cross = cross or CrossMoment(r.shape[-1], g.shape[-1])
            moment.add(g[real])
            cross.add(r[real], g[real])
    if cross is None:
        raise ValueError("no calibration batches: the residual statistics of nothing are undefined")
    return moment, cross


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) meanwhile, its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def calibrated_edge_half(
    base: BaseModel, spec: SplitSpec, batches: Iterable[Batch], device: str = "cpu"
) -> Tuple[EdgeHalf, Optional[torch.Tensor], torch.Tensor]:
    """net1 with its calibrated factor (``spec.init``), and the cloud's: Σ (R,) and v (R, hidden) for the
    FFN-output cut; None and V_Rᵀ (R, hidden) for the FFN-input cut."""
    shape = spec.edge_factor_shape(base.hidden_size, base.intermediate_size)
    net1 = build_edge_half(base, spec, torch.zeros(shape), device=device)  # what enters it is all we need
    sigma: Optional[torch.Tensor] = None
    if spec.init == RESIDUAL_AWARE:
        moment, cross = residual_moments(net1, batches, device)
        weight = ffn_output_weight(base, spec)
        u, sigma, v = residual_aware_factors(weight, cross.matrix(), moment.matrix(), spec.rank)
        edge = u.t()
    elif spec.factorise == FFN_INPUT:
        moment = input_moment(net1, batches, device)
        v = principal_directions(moment.matrix(), spec.rank).t().contiguous()
        edge = v  # A = V_Rᵀ
    else:
        moment = input_moment(net1, batches, device)
        u, sigma, v = whitened_factors(ffn_output_weight(base, spec), moment.matrix(), spec.rank)
        edge = u.t()
    with torch.no_grad():
        _factor(net1).weight.copy_(edge)
    log.info(
        "%s init: %d calibration tokens at layer %d (%s), rank %d",
        spec.init,
        moment.count,
        spec.split_layer,
        spec.factorise,
        spec.rank,
    )
    if moment.count < FEW_TOKENS_PER_RANK * spec.rank:
        log.warning(
            "only %d calibration tokens for rank %d: the factors sent to the cloud come close to "
            "spanning these examples' own activations (docs/privacy.md); use more "
            "--calibration-batches (at least %d tokens)",
            moment.count,
            spec.rank,
            FEW_TOKENS_PER_RANK * spec.rank,
        )
    return net1, sigma, v
