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

from sft_common.cuts import input_cut
from sft_common.models.base_model import BaseModel, family_of
from sft_common.models.families import Family
from sft_common.models.lora import LoraSpec, apply_lora, head_parameters
from sft_common.topology.spec import FACTORISATIONS, FFN_INPUT, FFN_OUTPUT, MODES, SplitSpec
from sft_common.topology.two_part import (
    CloudHalf,
    EdgeHalf,
    _adopt,
    _ffn_out,
    _install,
    _materialise,
    _skeleton,
    _svd_of,
    _svd_skeleton,
    _tensors,
    build_edge_half,
    build_full_model,
    factor_parameters,
    factorise,
    factorise_layer,
    init_head,
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
        first, second = spec.split_layer, spec.second_layer(len(layers))
        self.a = None
        if spec.mode == "sft" and spec.factorise == FFN_INPUT:
            self.tail = input_cut.InputTail(family, layers[first])
            self.layers = nn.ModuleList(layers[first + 1 : second])
            _adopt(self, family.attend_parts(layers[second]))
            self.u, self.a = None, input_cut.input_cut_of(layers[second]).a
        elif spec.mode == "sft":
            self.tail = _svd_of(family, layers[first]).tail
            self.layers = nn.ModuleList(layers[first + 1 : second])
            _adopt(self, family.cut_parts(layers[second]))
            self.u = _svd_of(family, layers[second]).u
        else:
            self.tail, self.u = None, None
            self.layers = nn.ModuleList(layers[first + 1 : second + 1])
        _adopt(self, family.shared(model))

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
        if self.a is not None:  # the residual crosses inside the R values
            return self.a(family.attend(self, h, ctx)), None
        if self.u is None:
            return h, None
        x, second_residual = family.cut(self, h, ctx)
        return self.u(x), (second_residual if self.spec.keep_residual else None)


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


def _validate(base: BaseModel, spec: UShapeSpec) -> Tuple[SplitSpec, SplitSpec]:
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
    first, second = _validate(base, spec)
    model = factorise(factorise(build_full_model(base, num_labels, seed, device), first), second)
    return EdgeHead(model, first), CloudMiddle(model, spec), EdgeTail(model, second)


def build_ushape_cloud(
    base: BaseModel, spec: UShapeSpec, device: str = "cpu"
) -> Tuple[CloudMiddle, Optional[EdgeFactors]]:
    """The cloud's middle alone, plus what the edge needs of both SVDs (SFT), computed here from
    the pretrained weights of l1's and l2's FFN outputs. No head: the cloud needs no label count."""
    _validate(base, spec)
    model = _skeleton(base, num_labels=2)  # the head is never materialised on the cloud
    factors = None
    if spec.mode == "sft" and spec.factorise == FFN_INPUT:
        factors = _input_factors(base, model, spec, device)
    elif spec.mode == "sft":
        layers = base.family.layers(model)
        svds = []
        for index in (spec.split_layer, spec.second_layer(len(layers))):
            # The FFN output linear (and the norm after it) materialised alone, factorised, dropped.
            _, _, linear, _, norm = _ffn_out(base.family, layers[index])
            originals = nn.ModuleList([m for m in (linear, norm) if m is not None])
            _materialise(originals, base, model, 0, device)
            layer_svd = factorise_layer(base.family, layers[index], spec.rank, spec.keep_residual)
            svds.append(_install(base.family, layers[index], layer_svd))
        first, second = svds
        factors = EdgeFactors(
            u=first.u.weight.detach().t().contiguous(),
            sigma=second.tail.sigma.detach().clone(),
            v=second.tail.v.weight.detach().t().contiguous(),
        )
    middle = CloudMiddle(model, spec)
    _materialise(middle, base, model, 0, device, skip=("tail", "u", "a"))
    return middle, factors


def _input_factors(base: BaseModel, model: nn.Module, spec: UShapeSpec, device: str) -> EdgeFactors:
    """Both FFN-input cuts installed on the cloud's ``model`` (each layer's FFN materialised first:
    the SVD reads W·diag(γ)); returns what the edge is sent: A1ᵀ = V1 and B2ᵀ = V2ᵀ."""
    family, layers = base.family, base.family.layers(model)
    vs = []
    for index in (spec.split_layer, spec.second_layer(len(layers))):
        _materialise(nn.ModuleList(input_cut.tail_modules(family, layers[index])), base, model, 0, device)
        vs.append(input_cut.factorise_input(family, layers[index], spec.rank)[1])
    return EdgeFactors(u=vs[0], sigma=None, v=vs[1].t().contiguous())


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
    first, second = _validate(base, spec)
    if spec.mode == "sft" and factors is None:
        raise ValueError("an SFT U-shape needs the cloud's factors (u1, Σ2, v2)")
    head = build_edge_half(base, first, None if factors is None else factors.u, device)
    model = _skeleton(base, num_labels)
    if factors is not None and spec.mode == "sft":
        _load_second_tail(base, model, second, factors, device)
    tail = EdgeTail(model, second)
    _materialise(tail, base, model, seed, device, skip=("tail",))
    init_head(model, seed)
    return head, tail


def _load_second_tail(
    base: BaseModel, model: nn.Module, cut: SplitSpec, factors: EdgeFactors, device: str
) -> None:
    """Install l2's factorised FFN output in ``model`` with the tail built: Σ2 and v2 from the
    cloud, v2's bias and the post-LN norm read from the base weights (u2 stays on meta). At the
    FFN input: B2 from the cloud, l2's FFN (and a pre-LN norm) from the base weights (A2 on meta)."""
    hidden, rank = base.hidden_size, cut.rank
    if cut.factorise == FFN_INPUT:
        if factors.sigma is not None or tuple(factors.v.shape) != (rank, hidden):
            raise ValueError(f"edge factor B2ᵀ must have shape {(rank, hidden)}, with no Σ2")
        layer = base.family.layers(model)[cut.split_layer]
        _materialise(nn.ModuleList(input_cut.tail_modules(base.family, layer)), base, model, 0, device)
        b = input_cut.skeleton(layer, hidden, rank).b.to_empty(device=device)
        with torch.no_grad():
            b.weight.copy_(factors.v.t())
        return
    assert factors.sigma is not None
    if tuple(factors.sigma.shape) != (rank,) or tuple(factors.v.shape) != (rank, hidden):
        raise ValueError(f"edge factors Σ2, v2 must have shapes {(rank,)} and {(rank, hidden)}")
    family, layer = base.family, base.family.layers(model)[cut.split_layer]
    _, _, linear, _, norm = _ffn_out(family, layer)
    originals = ([("v.bias", linear.bias)] if linear.bias is not None else []) + [
        ("LayerNorm." + n, p) for n, p in (norm.named_parameters() if norm is not None else ())
    ]
    names = {id(t): family.base_name(n) for n, t in _tensors(model)}
    values = base.load(names[id(t)] for _, t in originals)
    svd = _install(family, layer, _svd_skeleton(family, layer, cut.rank, cut.keep_residual))
    tail = svd.tail.to_empty(device=device)
    with torch.no_grad():  # (no random init: every value is copied)
        tail.sigma.copy_(factors.sigma)
        tail.v.weight.copy_(factors.v.t())
        for name, tensor in originals:
            value = values[names[id(tensor)]]
            assert value.shape == tensor.shape, (
                f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}"
            )
            tail.get_parameter(name).copy_(value)
