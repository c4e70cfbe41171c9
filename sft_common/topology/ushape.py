"""The U-shaped split: the edge holds the bottom and the top of the model, the cloud the middle.

With the head and the loss on the edge, the cloud never sees a label (for a causal LM: the text).
For first cut l1, ``tail_layers`` N and L layers, the second cut is layer l2 = L - N - 1, the
cloud's last layer; both cuts are SFT-factorised at rank R (paper §III-B, Eq. 2-3, at each cut):

- ``EdgeHead`` (edge): embeddings, layers 0..l1-1, layer l1 up to its FFN activation, then u1.
  Output â1: (batch, seq, R). It is the two-part split's ``EdgeHalf`` at l1, unchanged.
- ``CloudMiddle`` (cloud): Σ1, v1 (+ dropout, post-LN norm) of l1; layers l1+1..l2-1; layer l2 up
  to its FFN activation, then u2. Output â2: (batch, seq, R).
- ``EdgeTail`` (edge): Σ2, v2 (+ dropout, post-LN norm) of l2; layers l2+1..L-1, the final norm
  (pre-LN), the head. Output: logits. It is the two-part split's ``CloudHalf`` at l2, unchanged.

Plain split learning (mode "sl") cuts after l1 and after l2 instead: hidden states cross, nothing
is factorised. With ``keep_residual`` (in-process only) each cut also hands on its residual
input, and at full rank the three parts reproduce the unsplit model.

Who holds what: the cloud reads the base weights of layers l1..l2 (it computes both SVDs) and
sends the edge ``EdgeFactors``: u1 for the head, Σ2 and v2 for the tail. The edge reads the rest
of the base weights itself, the original bias and norm of l2's FFN output included.

With ``factorise`` "ffn-input" both cuts are FFN-input cuts (``sft_common.cuts.input_cut``): the head
ends with l1's attention part and A1; the middle starts with B1 and the rest of l1 and ends with
l2's attention part and A2; the tail starts with B2 and the rest of l2. The residual crosses inside
the R values at both cuts, so at R = hidden the U is the unsplit model exactly (no keep_residual).
The cloud computes both SVDs and sends the edge A1ᵀ (hidden, R) and B2ᵀ (R, hidden); the edge reads
l2's FFN (and, pre-LN, its norm) itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from sft_common.models.base_model import BaseModel, family_of
from sft_common.models.families import Family
from sft_common.models.loading import init_head, materialise, model_skeleton
from sft_common.models.lora import LoraSpec, apply_lora, head_parameters
from sft_common.models.shared import SharedBase, build_on, record
from sft_common.topology.spec import FACTORISATIONS, FFN_OUTPUT, MODES, SplitSpec
from sft_common.topology.two_part import (
    CloudHalf,
    EdgeHalf,
    adopt,
    build_edge_half,
    build_full_model,
    factor_parameters,
    factorise,
)

EdgeHead = EdgeHalf  # the U's first part: the two-part edge half at the first cut
EdgeTail = CloudHalf  # the U's last part: the two-part cloud half at the second cut

# The side each part's LoRA initialisation is seeded by (``lora.apply_lora``).
LORA_SIDES = {"head": "edge", "middle": "cloud", "tail": "edge-tail"}


@dataclass(frozen=True)
class UShapeSpec:
    """Where and how a model is cut into the edge's head, the cloud's middle and the edge's tail."""

    split_layer: int  # l1: 0-based index of the layer whose FFN output is the first cut
    rank: int = 8  # SFT rank R of both factorised FFN outputs (ignored for "sl")
    tail_layers: int = 1  # N: whole layers the edge runs after the second cut
    mode: str = "sft"  # "sft": rank-R activations cross at both cuts; "sl": full hidden states
    keep_residual: bool = False  # in-process only: keep both cut layers' residuals (exactness tests)
    factorise: str = FFN_OUTPUT  # SFT: both cuts at the FFN output linear, or both at the FFN input

    def second_layer(self, num_layers: int) -> int:
        """l2 = L - N - 1: the cloud's last layer, whose FFN output is the second cut."""
        return num_layers - self.tail_layers - 1

    def validate(self, num_layers: int) -> None:
        """Raise ValueError with a user-facing message when the U does not fit an L-layer model."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.factorise not in FACTORISATIONS:
            raise ValueError(f"factorise must be one of {', '.join(FACTORISATIONS)}, got {self.factorise!r}")
        if self.tail_layers < 1:
            raise ValueError(
                f"tail layers must be >= 1, got {self.tail_layers}: the edge runs at least the last layer"
            )
        if not 0 <= self.split_layer < num_layers:
            raise ValueError(
                f"split layer {self.split_layer} is out of range: the model has {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )
        if self.split_layer >= self.second_layer(num_layers):
            raise ValueError(
                f"split layer {self.split_layer} and {self.tail_layers} tail layers leave the cloud no "
                f"layer: of the model's {num_layers} layers the edge runs up to layer {self.split_layer} "
                f"and the last {self.tail_layers}, and the cloud needs at least one between them "
                f"(split layer + 1 < {num_layers} - tail layers)"
            )

    def cuts(self, num_layers: int) -> Tuple[SplitSpec, SplitSpec]:
        """The two cuts as two-part splits: at l1 (edge head | cloud) and at l2 (cloud | edge tail)."""
        second = self.second_layer(num_layers)
        return (
            SplitSpec(self.split_layer, self.rank, self.mode, self.keep_residual, factorise=self.factorise),
            SplitSpec(second, self.rank, self.mode, self.keep_residual, factorise=self.factorise),
        )


@dataclass
class EdgeFactors:
    """What the cloud sends the edge at open (SFT; fp32): the factors of both cuts the edge runs.
    At the FFN input: u = A1ᵀ (hidden, R), no Σ2, v = B2ᵀ (R, hidden)."""

    u: torch.Tensor  # (intermediate, R): the first cut's u1, for the head
    sigma: Optional[torch.Tensor]  # (R,): the second cut's Σ2, for the tail (None at the FFN input)
    v: torch.Tensor  # (R, hidden): the second cut's v2, for the tail (v2's bias the edge reads itself)


class CloudMiddle(nn.Module):
    """The cloud's part: (Σ1, v1, dropout, norm for SFT), layers l1+1..l2-1, layer l2 up to its
    FFN activation, u2; SL: layers l1+1..l2 whole. At the FFN input: B1 and the rest of l1, the
    layers between, l2's attention part and A2 (``a``)."""

    tail: Optional[nn.Module]
    u: Optional[nn.Linear]
    a: Optional[nn.Linear]

    def __init__(self, model: nn.Module, spec: UShapeSpec):
        super().__init__()
        self.family: Family = family_of(model.config)
        family, layers = self.family, self.family.layers(model)
        self.spec = spec
        first, second = spec.cuts(len(layers))
        self.cut = second.cut  # the cut the middle ends with (the same kind as the first)
        self.u, self.a = None, None  # the second cut's factor, where it has one
        self.tail = first.cut.receiver(family, layers[first.split_layer])
        self.layers = nn.ModuleList(
            self.cut.layers_before(layers, second.split_layer)[first.split_layer + 1 :]
        )
        adopt(self, self.cut.sender_modules(family, layers[second.split_layer]))
        adopt(self, family.shared(model))

    def forward(
        self, cut: torch.Tensor, attention_mask: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """cut: (batch, seq, width) from the head. Returns the second cut's activations
        (batch, seq, width) and, with keep_residual, layer l2's residual."""
        family = self.family
        h = cut if self.tail is None else self.tail(cut, residual)
        ctx = family.context(self, attention_mask, h)
        for layer in self.layers:
            h = family.run_layer(layer, h, ctx)
        return self.cut.send(family, self, h, ctx)


def part_factors(part: nn.Module) -> List[nn.Parameter]:
    """The SVD factors a part holds (``split.factor_parameters``, plus the middle's u2)."""
    params = factor_parameters(part)
    if isinstance(part, CloudMiddle) and part.u is not None:
        params.extend(part.u.parameters())  # u2's weight (no bias)
    return params


def lora_part(part: nn.Module, which: str, spec: LoraSpec, seed: int) -> None:
    """LoRA on one part (``which``: "head", "middle" or "tail"), in place: adapters seeded by
    ``(seed, LORA_SIDES[which])``; the factors and, on the tail, the task head stay trainable."""
    keep = part_factors(part) + (head_parameters(part) if which == "tail" else [])
    apply_lora(part, spec, seed, LORA_SIDES[which], keep=keep)


def validate_ushape(base: BaseModel, spec: UShapeSpec) -> Tuple[SplitSpec, SplitSpec]:
    """ValueError with a user-facing message when the U does not fit ``base``; else its two cuts."""
    spec.validate(base.num_hidden_layers)
    if getattr(base.config, "relative_attention", False):  # DeBERTa-v2 (Family.shared with weights)
        raise ValueError(
            f"the U-shape does not support {base.family.name} yet: its relative-position embeddings serve "
            "every layer, so the edge's two parts and the cloud's middle would each need their own copy"
        )
    cuts = spec.cuts(base.num_hidden_layers)
    for cut in cuts:
        cut.validate(base.num_hidden_layers, base.hidden_size, base.intermediate_size)
    return cuts


def build_ushape_model(
    base: BaseModel, spec: UShapeSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[EdgeHead, CloudMiddle, EdgeTail]:
    """The three parts of one factorised model in one process (the reference for U-shaped training)."""
    first, second = validate_ushape(base, spec)
    model = factorise(factorise(build_full_model(base, num_labels, seed, device), first), second)
    return EdgeHead(model, first), CloudMiddle(model, spec), EdgeTail(model, second)


def build_ushape_cloud(
    base: BaseModel, spec: UShapeSpec, device: str = "cpu", shared: Optional[SharedBase] = None
) -> Tuple[CloudMiddle, Optional[EdgeFactors]]:
    """The cloud's middle alone, plus what the edge needs of both cuts (None for SL), computed
    here from the pretrained weights each cut reads (materialised alone, factorised, dropped):
    the head's factor (u1, or A1ᵀ) and the tail's (Σ2 and v2, or B2ᵀ). No head: the cloud needs
    no label count. ``shared`` (LoRA sessions): the middle is built on the frozen base of the
    sessions of this model and split (``sft_common.models.shared``); the first one records it."""
    if shared is None:
        return _build_middle(base, spec, device)
    with shared.lock:
        if not shared.recorded:
            middle, factors = _build_middle(base, spec, device)
            record(shared, middle, part_factors(middle), factors)
            return middle, factors
        first, second = validate_ushape(base, spec)
        model = model_skeleton(base, num_labels=2)
        for cut in (first, second):  # both cuts' modules on meta: nothing read, no SVD
            cut.cut.skeleton(base.family, base.family.layers(model)[cut.split_layer], base.hidden_size)
        middle = CloudMiddle(model, spec)
        build_on(shared, middle, part_factors(middle), device)
        return middle, shared.sent


def _build_middle(
    base: BaseModel, spec: UShapeSpec, device: str
) -> Tuple[CloudMiddle, Optional[EdgeFactors]]:
    """The middle and the edge's factors, from the base model's tensors."""
    first, second = validate_ushape(base, spec)
    model = model_skeleton(base, num_labels=2)  # the head is never materialised on the cloud
    layers = base.family.layers(model)
    u = first.cut.load(base, model, layers[first.split_layer], device)
    second.cut.load(base, model, layers[second.split_layer], device)
    tail = second.cut.tail_factors(base.family, layers[second.split_layer])
    factors = None if u is None or tail is None else EdgeFactors(u, *tail)
    middle = CloudMiddle(model, spec)
    materialise(middle, base, model, 0, device, skip=("tail", "u", "a"))
    return middle, factors


def build_ushape_edge(
    base: BaseModel,
    spec: UShapeSpec,
    num_labels: int,
    seed: int,
    factors: Optional[EdgeFactors],
    device: str = "cpu",
) -> Tuple[EdgeHead, EdgeTail]:
    """The edge's head and tail, loading only their own weights; ``factors`` come from the cloud
    (``build_ushape_cloud``; None for SL). The tail's head is initialised from ``seed``."""
    first, second = validate_ushape(base, spec)
    model = model_skeleton(base, num_labels)
    head = build_edge_head(base, first, second, model, factors, device)
    tail = EdgeTail(model, second)
    materialise(tail, base, model, seed, device, skip=("tail",))
    init_head(model, seed)
    return head, tail


def build_edge_head(
    base: BaseModel,
    first: SplitSpec,
    second: SplitSpec,
    model: nn.Module,
    factors: Optional[EdgeFactors],
    device: str,
) -> EdgeHead:
    """The edge's head part, built; and the second cut's receiving side installed on ``model``, the
    meta-device skeleton the edge's tail is then taken from, with the cloud's ``factors`` (the
    classification tail's and the causal LM's)."""
    if second.cut.factor is not None and factors is None:
        raise ValueError("an SFT U-shape needs the cloud's factors (u1, Σ2, v2)")
    head = build_edge_half(base, first, None if factors is None else factors.u, device)
    if factors is not None and second.cut.factor is not None:
        layer = base.family.layers(model)[second.split_layer]
        second.cut.load_receiver(base, model, layer, (factors.sigma, factors.v), device)
    return head
