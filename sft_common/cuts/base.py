"""The ``Cut`` interface: what happens to layer l where the model is split, as one object.

A cut is resolved once from a split's settings (``sft_common.cuts.cut_of``: mode and factorise)
and the builders ask it; none of them branches on the kind. In the manner of PEFT's tuners, a cut
installs its modules in the cut layer in place (``parent = layer.get_submodule(...)``,
``setattr(parent, name, new)``), so a factorised model is still an ordinary Hugging Face model and
each side's part holds references to its modules. The kinds, one class each:

- ``FullWidth`` (``--mode sl``, plain split learning): layer l runs whole on the sending side, its
  hidden states cross (hidden wide); nothing is installed.
- ``FFNOutputCut`` (``--mode sft``, the paper's §III): layer l's FFN output linear is replaced by
  ``u`` (sending side) then Σ, v (receiving side); R values cross.
- ``FFNInputCut`` (``--factorise ffn-input``): a rank-R bottleneck A, B on layer l's residual
  stream before its FFN; R values cross.

The sending side is the edge's head in the two-part split and at the U's first cut, the cloud's
middle at the U's second cut; the receiving side the next part. Every method takes the model's
``Family`` and the cut layer (a module of a whole model, built or on the meta device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.models.base_model import BaseModel
from sft_common.models.families import Family, Modules
from sft_common.models.loading import materialise
from sft_common.topology.spec import FACTORISATIONS, FFN_INPUT, FFN_OUTPUT, MODES

__all__ = ["FACTORISATIONS", "FFN_INPUT", "FFN_OUTPUT", "MODES", "Cut", "TailFactors"]


# What the receiving side's tail is sent for it (the U's edge tail):
# (Σ (R,) or None, v (R, hidden)).
TailFactors = Tuple[Optional[torch.Tensor], torch.Tensor]


class Cut(ABC):
    """One kind of cut at layer l, with the split's rank and flags (``cut_of`` builds it)."""

    # The attribute the sending part holds its factor under ("u", "a"); None: no factor crosses
    # at open. Its weight is (R, in): what the cloud sends is its transpose (``edge_factor_shape``).
    factor: Optional[str] = None
    # What crosses is the hidden state itself (not factors of it): an example's rows change little
    # between epochs, so delta mode (``sft_common.wire.delta``) can send their differences.
    carries_hidden_state = False

    def __init__(self, rank: int, keep_residual: bool = False):
        self.rank = rank  # R: the values a token sends across the cut (factorised cuts)
        self.keep_residual = keep_residual  # in-process only: the residual crosses beside the cut

    # -- geometry ---------------------------------------------------------------------------

    @abstractmethod
    def width(self, hidden: int) -> int:
        """Values one token sends across the cut."""

    def edge_factor_shape(self, hidden: int, intermediate: int) -> Optional[Tuple[int, int]]:
        """The factor the cloud sends the sending part at open, or None (no factor)."""
        return None

    def tail_factor_shapes(self, hidden: int) -> Optional[Tuple[Optional[Tuple[int, ...]], Tuple[int, int]]]:
        """The shapes of (Σ, vᵀ) a receiving side built elsewhere is sent (``tail_factors``; Σ
        None where the cut has none), or None: no factor crosses."""
        return None

    def validate(self, hidden: int, intermediate: int) -> None:
        """ValueError with a user-facing message when the rank does not fit the model."""
        return None  # a cut with no rank fits any model

    # -- the two parts ----------------------------------------------------------------------

    def layers_before(self, layers: nn.ModuleList, index: int) -> List[nn.Module]:
        """The layers the sending side runs whole, up to the cut at layer ``index``."""
        return list(layers[:index])

    @abstractmethod
    def sender_modules(self, family: Family, layer: nn.Module) -> Modules:
        """The cut layer's modules the sending part runs after its whole layers, its factor last
        (what the edge's last module becomes), by the names the part holds them under."""

    @abstractmethod
    def send(
        self, family: Family, part: nn.Module, h: torch.Tensor, ctx: Dict[str, Any]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The sending part's output from the hidden states ``h`` entering the cut layer (``part``
        holds ``sender_modules``): the activations that cross (batch, seq, width) and, with
        keep_residual, the residual beside them."""

    @abstractmethod
    def receiver(self, family: Family, layer: nn.Module) -> Optional[nn.Module]:
        """What the receiving part's first module becomes: the rest of the cut layer, called
        ``(activations, residual)``; None when the cut layer ran whole on the sending side."""

    # -- building from a base model's tensors -----------------------------------------------

    def skeleton(self, family: Family, layer: nn.Module, hidden: int) -> Optional[nn.Linear]:
        """Install the cut's modules on ``layer`` on the meta device (no storage, no random draws);
        returns the sending side's factor, or None."""
        return None

    def reads(self, family: Family, layer: nn.Module) -> List[nn.Module]:
        """The cut layer's modules ``factorise`` reads: materialise them first."""
        return []

    def factorise(self, family: Family, layer: nn.Module) -> Optional[torch.Tensor]:
        """Install the cut's modules on ``layer`` from its weights (``reads`` materialised), exact
        at full rank; returns the factor the sending side is sent, (``edge_factor_shape``)."""
        return None

    def load(
        self, base: BaseModel, model: nn.Module, layer: nn.Module, device: str
    ) -> Optional[torch.Tensor]:
        """``factorise`` on a meta-device ``model``: the modules it reads are materialised from the
        base model's tensors first (alone: the rest of the model stays on meta)."""
        reads = self.reads(base.family, layer)
        if reads:
            materialise(nn.ModuleList(reads), base, model, 0, device)
        return self.factorise(base.family, layer)

    def tail_factors(self, family: Family, layer: nn.Module) -> Optional[TailFactors]:
        """From a factorised layer: what a receiving side built elsewhere is sent, or None."""
        return None

    def load_receiver(
        self, base: BaseModel, model: nn.Module, layer: nn.Module, factors: TailFactors, device: str
    ) -> None:
        """Install the receiving side on ``layer`` of a meta-device ``model`` (the sending side's
        factor stays on meta) from the cloud's ``factors``, shapes checked first (ValueError), and
        the modules it owns read from the base model's tensors."""
        raise ValueError("this cut sends no factors to its receiving side")
