"""A side network beside a frozen U (``--forward-only --adapters parallel``): PAC's parallel adapters, ladder side-tuning.

The backbone (the edge's head and tail, the cloud's middle) stays frozen; a small network of width
d runs beside it on the edge and reads the middle's hidden states, projected to d on the cloud:

- ``side_projection``: P, a fixed (hidden, d) matrix with orthonormal columns, drawn from a seed
  derived from the base's fingerprint, so the cloud and the edge compute the same P with nothing
  sent (QR of a float64 Gaussian, columns signed so that R's diagonal is positive, then float32).
- ``middle_taps`` (cloud): the middle's forward, plus each of its layers' outputs h_i times P,
  side by side: (batch, seq, layers * d).
- ``SideNetwork`` (edge): s = P·x1 (x1 the first cut, projected here), then for each tapped layer
  s = s + adapter_i(s + P·h_i) (adapter: LayerNorm, d -> d/4, GELU, d/4 -> d), and the tail reads
  h2 + up(norm(s)) instead of h2. ``up`` starts at zero, so at step 0 the model is the frozen one.

Width: ``SIDE_WIDTH`` (64) values a token a layer, or the model's width where that is smaller.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch
from torch import nn

from sft_common.models.families.base import layer_output
from sft_common.topology.ushape import CloudMiddle

SIDE_WIDTH = 64  # d: values a token each tapped layer is projected to (PAC's and LST's order)
BOTTLENECK = 4  # an adapter's hidden width is d / BOTTLENECK


def side_width(hidden: int) -> int:
    """The side network's width for a model of width ``hidden``: ``SIDE_WIDTH``, at most ``hidden``."""
    return min(SIDE_WIDTH, hidden)


def side_projection(fingerprint: str, hidden: int, width: int) -> torch.Tensor:
    """P: (hidden, width) float32 with orthonormal columns, a function of the base's fingerprint alone."""
    assert 0 < width <= hidden, f"side width {width} must be in 1..{hidden}"
    digest = hashlib.sha256(f"side-projection:{fingerprint}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    q, r = torch.linalg.qr(torch.randn(hidden, width, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@contextmanager
def tapped(layers: nn.ModuleList, projection: torch.Tensor) -> Iterator[List[torch.Tensor]]:
    """While open, each forward of ``layers`` appends its output times ``projection`` to the list yielded."""
    taps: List[torch.Tensor] = []

    def keep(module: nn.Module, args: object, out: object) -> None:
        taps.append(layer_output(out).float() @ projection)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield taps
    finally:
        for hook in hooks:
            hook.remove()


def middle_taps(
    middle: CloudMiddle, cut: torch.Tensor, mask: torch.Tensor, projection: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The U's middle on ``cut``: (its output at the second cut (batch, seq, hidden),
    its layers' outputs projected, (batch, seq, layers * d))."""
    with tapped(middle.layers, projection.to(cut.device)) as taps:
        out, _ = middle(cut, mask)
    assert len(taps) == len(middle.layers), "each middle layer runs once"
    return out, torch.cat(taps, dim=-1)


class SideAdapter(nn.Module):
    """One tapped layer's adapter: LayerNorm, d -> d / BOTTLENECK, GELU, back to d."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, max(1, width // BOTTLENECK))
        self.up = nn.Linear(max(1, width // BOTTLENECK), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(self.norm(x))))


class SideNetwork(nn.Module):
    """The trainable side network: (1 + layers) projected states in, what is added to the tail's input out.

    ``projection`` (P, not saved: rebuilt from the base) is a buffer; ``seed`` draws the adapters'
    initialisation (its own generator: no global RNG state), ``up`` is zero."""

    projection: torch.Tensor

    def __init__(self, hidden: int, layers: int, projection: torch.Tensor, seed: int):
        super().__init__()
        self.width = projection.shape[1]
        self.layers = layers
        self.register_buffer("projection", projection, persistent=False)
        adapters = [SideAdapter(self.width) for _ in range(layers)]
        self.adapters = nn.ModuleList(adapters)
        self.norm = nn.LayerNorm(self.width)
        self.up = nn.Linear(self.width, hidden)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for adapter in adapters:
                for linear in (adapter.down, adapter.up):
                    bound = linear.in_features**-0.5
                    linear.weight.uniform_(-bound, bound, generator=g)
                    linear.bias.uniform_(-bound, bound, generator=g)
            self.up.weight.zero_()
            self.up.bias.zero_()

    @property
    def inputs(self) -> int:
        """Values a token the network reads: P·x1 and each tapped layer's P·h_i."""
        return (1 + self.layers) * self.width

    def start(self, first: torch.Tensor) -> torch.Tensor:
        """P·x1: the first cut (..., hidden) projected to (..., d), computed on the edge."""
        return first.float() @ self.projection

    def forward(self, side: torch.Tensor) -> torch.Tensor:
        """side: (batch, seq, (1 + layers) * d), [P·x1, P·h_1, ...]. Returns (batch, seq, hidden)."""
        assert side.shape[-1] == self.inputs, f"side inputs {side.shape[-1]}, expected {self.inputs}"
        s, *taps = side.split(self.width, dim=-1)
        for adapter, tap in zip(self.adapters, taps):
            s = s + adapter(s + tap)
        return self.up(self.norm(s))
