"""The FFN-input cut (``--factorise ffn-input``): a rank-R bottleneck on layer l's residual stream.

The paper's released code factorises the FFN *input* linear. With r the cut layer's post-attention
residual stream (post-LN: the attention block's output after its norm; pre-LN: h + attn(norm(h)))
and ``W`` the FFN input weight as the layer applies it to r (``Family.ffn_in_weight``: gate and up
stacked, a pre-LN norm's scale multiplied in), truncated to ``W ≈ U_R Σ_R V_Rᵀ``:

- the edge runs embeddings .. layer l's attention part, then ``A = V_Rᵀ``: ``z = A r``, (batch, seq, R);
- the cloud runs ``B = V_R``: ``r̂ = B z``, then the rest of layer l from r̂ (its FFN input,
  activation, output linear, dropout, ``+ r̂``, a post-LN norm), then layers l+1.. and the head.

At initialisation ``W r̂ = U_R Σ_R V_Rᵀ r``: the truncated SVD of the FFN input; the residual is r
projected on the same subspace, so it crosses inside the R values (at R = hidden, ``B A = I`` and the
model is unchanged). ``InputCut`` (A and B) is installed on the cut layer beside its own modules,
which its forward leaves alone; the halves take A, and B with the layer's FFN (``InputTail``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.cuts.base import Cut, TailFactors
from sft_common.models.base_model import BaseModel
from sft_common.models.families import Family, Modules
from sft_common.models.loading import materialise

ATTRIBUTE = "input_cut"  # where a cut layer holds its InputCut


class Factor(nn.Linear):
    """A bias-free linear that is one of the cut's factors (``topology.two_part.factor_parameters``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


class InputCut(nn.Module):
    """A (edge): Linear(hidden -> R), weight V_Rᵀ (R, hidden); B (cloud): Linear(R -> hidden),
    weight V_R (hidden, R)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.a = Factor(hidden, rank)
        self.b = Factor(rank, hidden)


class InputTail(nn.Module):
    """The cloud's side of the FFN-input cut: ``B``, then the rest of the cut layer from r̂ = B z:
    the FFN input and activation (the family's ``ffn_in_parts``), the output linear, its dropout,
    ``+ r̂`` and, post-LN, the norm. Holds the layer's own modules (references). Input z:
    (batch, seq, R); output: the layer's output (batch, seq, hidden)."""

    def __init__(self, family: Family, layer: nn.Module):
        super().__init__()
        self.family = family
        self.b = input_cut_of(layer).b
        for name, module in family.ffn_in_parts(layer).items():
            setattr(self, name, module)
        _, _, linear, dropout, norm = family.ffn_output(layer)
        self.ffn_out = linear
        self.ffn_dropout = nn.Identity() if dropout is None else dropout
        self.ffn_norm = nn.Identity() if norm is None else norm

    def forward(self, z: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual``: unused (the residual crosses in z), for CloudHalf's one call."""
        r = self.b(z)  # the residual stream, as the bottleneck lets it through
        return self.ffn_norm(self.ffn_dropout(self.ffn_out(self.family.ffn_in(self, r))) + r)


def input_factors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """V_R (hidden, R): the top-R right singular vectors of ``weight`` (out, hidden), in float64."""
    _, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return vh[:rank].t().float().contiguous()


def tail_modules(family: Family, layer: nn.Module) -> List[nn.Module]:
    """The cut layer's modules the cloud runs after B (materialised before the SVD reads them)."""
    _, _, linear, dropout, norm = family.ffn_output(layer)
    parts = list(family.ffn_in_parts(layer).values()) + [linear, dropout, norm]
    return [m for m in parts if m is not None]


def install(layer: nn.Module, cut: InputCut) -> InputCut:
    setattr(layer, ATTRIBUTE, cut)
    return cut


def input_cut_of(layer: nn.Module) -> InputCut:
    cut = getattr(layer, ATTRIBUTE, None)
    assert isinstance(cut, InputCut), "the cut layer's FFN input is not factorised"
    return cut


def skeleton(layer: nn.Module, hidden: int, rank: int) -> InputCut:
    """A and B on the meta device (no storage, no random draws), installed on the layer."""
    with torch.device("meta"):
        return install(layer, InputCut(hidden, rank))


def factorise_input(family: Family, layer: nn.Module, rank: int) -> Tuple[InputCut, torch.Tensor]:
    """Install A = V_Rᵀ and B = V_R on the layer (its FFN input weights materialised); returns
    the cut and V_R (hidden, R), the factor the edge is sent."""
    weight = family.ffn_in_weight(layer)
    v = input_factors(weight, rank)
    # Built without initialisation (every value is copied below): a random init would draw from
    # the process-wide RNG (see ffn_output.factorise_layer).
    cut = skeleton(layer, weight.shape[1], rank).to_empty(device=weight.device)
    with torch.no_grad():
        cut.a.weight.copy_(v.t())
        cut.b.weight.copy_(v)
    return cut, v


class FFNInputCut(Cut):
    """``--factorise ffn-input``: the attention part and A end the sending part, ``InputTail``
    (B and the rest of the layer) starts the next; the residual crosses inside the R values."""

    factor = "a"

    def width(self, hidden: int) -> int:
        return self.rank

    def edge_factor_shape(self, hidden: int, intermediate: int) -> Optional[Tuple[int, int]]:
        return (hidden, self.rank)  # Aᵀ

    def tail_factor_shapes(self, hidden: int) -> Optional[Tuple[Optional[Tuple[int, ...]], Tuple[int, int]]]:
        return None, (self.rank, hidden)  # no Σ; Bᵀ

    def validate(self, hidden: int, intermediate: int) -> None:
        if self.keep_residual:
            raise ValueError("keep_residual is for the FFN-output cut: at the FFN input the residual crosses")
        if not 1 <= self.rank <= hidden:
            raise ValueError(
                f"rank {self.rank} is out of range: the FFN-input cut's bottleneck reads the "
                f"{hidden}-wide residual stream, so 1 <= R <= {hidden}"
            )

    def sender_modules(self, family: Family, layer: nn.Module) -> Modules:
        return {**family.attend_parts(layer), "a": input_cut_of(layer).a}

    def send(
        self, family: Family, part: nn.Module, h: torch.Tensor, ctx: Dict[str, Any]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return part.get_submodule("a")(
            family.attend(part, h, ctx)
        ), None  # the residual crosses inside the R values

    def receiver(self, family: Family, layer: nn.Module) -> Optional[nn.Module]:
        return InputTail(family, layer)

    def skeleton(self, family: Family, layer: nn.Module, hidden: int) -> Optional[nn.Linear]:
        return skeleton(layer, hidden, self.rank).a

    def reads(self, family: Family, layer: nn.Module) -> List[nn.Module]:
        return tail_modules(family, layer)  # the layer's FFN first: the SVD reads W·diag(γ)

    def factorise(self, family: Family, layer: nn.Module) -> Optional[torch.Tensor]:
        return factorise_input(family, layer, self.rank)[1]  # Aᵀ = V_R (hidden, R)

    def tail_factors(self, family: Family, layer: nn.Module) -> Optional[TailFactors]:
        return None, input_cut_of(layer).b.weight.detach().t().contiguous()  # Bᵀ = V_Rᵀ (R, hidden)

    def load_receiver(
        self, base: BaseModel, model: nn.Module, layer: nn.Module, factors: TailFactors, device: str
    ) -> None:
        """B from the cloud; the layer's FFN (and a pre-LN norm) read from the base weights."""
        sigma, v = factors
        hidden, rank = base.hidden_size, self.rank
        if sigma is not None or tuple(v.shape) != (rank, hidden):
            raise ValueError(f"edge factor B2ᵀ must have shape {(rank, hidden)}, with no Σ2")
        materialise(nn.ModuleList(tail_modules(base.family, layer)), base, model, 0, device)
        b = skeleton(layer, hidden, rank).b.to_empty(device=device)
        with torch.no_grad():
            b.weight.copy_(v.t())
