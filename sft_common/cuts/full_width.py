"""The full-width cut (``--mode sl``, plain split learning): the cut layer's hidden states cross.

Nothing is factorised or installed: layer l runs whole on the sending side and its output,
(batch, seq, hidden), is what the next part reads. A cut that changes only how the full width is
carried (a quantised wire) is a subclass of this one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.cuts.base import Cut
from sft_common.models.families import Family, Modules


class FullWidth(Cut):
    """Plain split learning: no factor, no receiving module; ``hidden`` values a token."""

    carries_hidden_state = True

    def width(self, hidden: int) -> int:
        return hidden

    def layers_before(self, layers: nn.ModuleList, index: int) -> List[nn.Module]:
        return list(layers[: index + 1])  # the cut layer too: it runs whole

    def sender_modules(self, family: Family, layer: nn.Module) -> Modules:
        return {}

    def send(
        self, family: Family, part: nn.Module, h: torch.Tensor, ctx: Dict[str, Any]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return h, None

    def receiver(self, family: Family, layer: nn.Module) -> Optional[nn.Module]:
        return None
