"""The FFN-output cut (the paper's §III, ``--mode sft``): layer l's FFN output linear, SVD-factorised.

With the FFN output linear ``W`` (hidden x intermediate) and ``W^T = u · diag(Σ) · v`` truncated to
rank R (paper §III-B, Eq. 2-3), ``SVDOutput`` replaces the linear in place (as PEFT swaps a target
module): ``u`` on the sending side, whose output ``â = g · u`` (batch, seq, R) crosses, then
``SVDTail`` on the receiving side: Σ, v (+ the original bias), the layer's dropout and, post-LN,
its norm, without the residual add (the residual stays on the sending side, paper §III-A).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.cuts.base import Cut, TailFactors
from sft_common.models.base_model import BaseModel
from sft_common.models.families import Family, Modules
from sft_common.models.loading import base_values


def svd_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a Linear weight W (out x in): returns u (in, R), Σ (R,), v (R, out).

    ``W^T ≈ u @ diag(Σ) @ v``; computed in float64 so the factors are exact to float32 precision.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double().t(), full_matrices=False)
    return u[:, :rank].float().contiguous(), s[:rank].float().contiguous(), vh[:rank].float().contiguous()


class SVDTail(nn.Module):
    """The cloud's side of the cut: ``Σ``, ``v`` with the original bias, dropout, and a post-LN
    layer's norm (``LayerNorm``; pre-LN: Identity). Input â: (batch, seq, R). Without
    ``keep_residual`` the norm sees ``â Σ v + b`` alone (the residual input stays on the edge,
    paper §III-A); a pre-LN layer's output is then ``â Σ v + b`` alone (docs/design.md)."""

    def __init__(
        self,
        rank: int,
        hidden: int,
        norm: Optional[nn.Module],
        dropout: Optional[float],
        keep_residual: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        self.sigma = nn.Parameter(torch.ones(rank))  # (R,) singular values
        self.v = nn.Linear(rank, hidden, bias=bias)  # weight (hidden, R) = v^T; bias = the original bias
        self.dropout = nn.Identity() if dropout is None else nn.Dropout(dropout)
        self.LayerNorm = nn.Identity() if norm is None else copy.deepcopy(norm)
        self.keep_residual = keep_residual

    def project(self, a_hat: torch.Tensor) -> torch.Tensor:
        return self.v(a_hat * self.sigma)

    def forward(self, a_hat: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.dropout(self.project(a_hat))
        if self.keep_residual:
            if residual is None:
                raise ValueError("keep_residual needs the residual input")
            x = x + residual
        return self.LayerNorm(x)


class SVDOutput(nn.Module):
    """Drop-in for the cut layer's FFN output: ``u`` on the edge, then ``SVDTail`` on the cloud.

    It replaces a ``BertOutput``-like block (called with the residual: dense, dropout, LayerNorm)
    or, in the other families, the bare linear (called with x alone: the layer adds dropout,
    residual and norm itself), so a factorised model is still an ordinary Hugging Face model."""

    def __init__(self, u: nn.Linear, tail: SVDTail):
        super().__init__()
        self.u = u  # Linear(intermediate, R, bias=False); weight (R, intermediate) = u^T
        self.tail = tail

    def forward(
        self, hidden_states: torch.Tensor, input_tensor: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if input_tensor is None:
            return self.tail.project(self.u(hidden_states))
        return self.tail(self.u(hidden_states), input_tensor)


def svd_skeleton(family: Family, layer: nn.Module, rank: int, keep_residual: bool = False) -> SVDOutput:
    """u and the tail for this layer's FFN output, on the meta device (no storage, no draws)."""
    _, _, linear, dropout, norm = family.ffn_output(layer)
    hidden, inter = family.ffn_weight(linear).shape
    p = None if dropout is None else dropout.p
    with torch.device("meta"):
        down = nn.Linear(inter, rank, bias=False)
        tail = SVDTail(rank, hidden, norm, p, keep_residual, bias=linear.bias is not None)
    return SVDOutput(down, tail.to("meta"))


def install(family: Family, layer: nn.Module, svd: SVDOutput) -> SVDOutput:
    """Put ``svd`` in the place of the layer's FFN output (PEFT-style: setattr on its parent)."""
    parent, attr, *_ = family.ffn_output(layer)
    setattr(parent, attr, svd)
    return svd


def svd_of(family: Family, layer: nn.Module) -> SVDOutput:
    """The ``SVDOutput`` installed on a cut layer."""
    svd = layer.get_submodule(family.ffn_out)
    assert isinstance(svd, SVDOutput), f"{family.ffn_out} of the cut layer is not factorised"
    return svd


def factorise_layer(family: Family, layer: nn.Module, rank: int, keep_residual: bool = False) -> SVDOutput:
    """Factorise a layer's FFN output linear (weights in place) at rank R: its SVDOutput."""
    _, _, linear, dropout, norm = family.ffn_output(layer)
    weight = family.ffn_weight(linear)
    u, s, v = svd_factors(weight, rank)
    # Built without initialisation (every value is copied below): random init would draw from
    # the process-wide RNG and shift the dropout masks of another session's step meanwhile.
    svd = svd_skeleton(family, layer, rank, keep_residual).to_empty(device=weight.device)
    with torch.no_grad():
        svd.u.weight.copy_(u.t())
        svd.tail.sigma.copy_(s)
        svd.tail.v.weight.copy_(v.t())
        if linear.bias is not None:
            svd.tail.v.bias.copy_(linear.bias)
        if norm is not None:
            svd.tail.LayerNorm.load_state_dict(norm.state_dict())
    return svd


class FFNOutputCut(Cut):
    """``--mode sft``: u (intermediate -> R) ends the sending part, ``SVDTail`` starts the next."""

    factor = "u"

    def width(self, hidden: int) -> int:
        return self.rank

    def edge_factor_shape(self, hidden: int, intermediate: int) -> Optional[Tuple[int, int]]:
        return (intermediate, self.rank)  # u

    def tail_factor_shapes(self, hidden: int) -> Optional[Tuple[Optional[Tuple[int, ...]], Tuple[int, int]]]:
        return (self.rank,), (self.rank, hidden)  # Σ, vᵀ

    def validate(self, hidden: int, intermediate: int) -> None:
        if not 1 <= self.rank <= min(hidden, intermediate):
            raise ValueError(
                f"rank {self.rank} is out of range: the FFN output of this model is "
                f"{hidden}x{intermediate}, so 1 <= R <= {min(hidden, intermediate)}"
            )

    def sender_modules(self, family: Family, layer: nn.Module) -> Modules:
        return {**family.cut_parts(layer), "u": svd_of(family, layer).u}

    def send(
        self, family: Family, part: nn.Module, h: torch.Tensor, ctx: Dict[str, Any]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x, residual = family.cut(part, h, ctx)
        return part.get_submodule("u")(x), (residual if self.keep_residual else None)

    def receiver(self, family: Family, layer: nn.Module) -> Optional[nn.Module]:
        return svd_of(family, layer).tail

    def skeleton(self, family: Family, layer: nn.Module, hidden: int) -> Optional[nn.Linear]:
        return install(family, layer, svd_skeleton(family, layer, self.rank, self.keep_residual)).u

    def reads(self, family: Family, layer: nn.Module) -> List[nn.Module]:
        _, _, linear, _, norm = family.ffn_output(layer)  # the linear, and the norm after it
        return [m for m in (linear, norm) if m is not None]

    def factorise(self, family: Family, layer: nn.Module) -> Optional[torch.Tensor]:
        svd = install(family, layer, factorise_layer(family, layer, self.rank, self.keep_residual))
        return svd.u.weight.detach().t().contiguous()  # u (intermediate, R)

    def tail_factors(self, family: Family, layer: nn.Module) -> Optional[TailFactors]:
        tail = svd_of(family, layer).tail
        return tail.sigma.detach().clone(), tail.v.weight.detach().t().contiguous()

    def load_receiver(
        self, base: BaseModel, model: nn.Module, layer: nn.Module, factors: TailFactors, device: str
    ) -> None:
        """Σ and v from the cloud; v's bias and a post-LN norm read from the base weights."""
        sigma, v = factors
        hidden, rank = base.hidden_size, self.rank
        if sigma is None or tuple(sigma.shape) != (rank,) or tuple(v.shape) != (rank, hidden):
            raise ValueError(f"edge factors Σ2, v2 must have shapes {(rank,)} and {(rank, hidden)}")
        family = base.family
        _, _, linear, _, norm = family.ffn_output(layer)
        originals = ([("v.bias", linear.bias)] if linear.bias is not None else []) + [
            ("LayerNorm." + n, p) for n, p in (norm.named_parameters() if norm is not None else ())
        ]
        values = base_values(base, model, [t for _, t in originals])
        tail = install(family, layer, svd_skeleton(family, layer, rank, self.keep_residual)).tail
        tail.to_empty(device=device)
        with torch.no_grad():  # (no random init: every value is copied)
            tail.sigma.copy_(sigma)
            tail.v.weight.copy_(v.t())
            for (name, _), value in zip(originals, values):
                tail.get_parameter(name).copy_(value)
