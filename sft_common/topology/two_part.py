"""The split model: SVD factorisation of layer l's FFN output, and the edge and cloud halves.

Written once over the family adapters (``sft_common.models.families``). For split layer l, with the FFN output
linear ``W`` (hidden x intermediate) and ``W^T = u · diag(Σ) · v`` truncated to rank R (paper §III-B, Eq. 2-3):

- ``EdgeHalf`` (net1): embeddings, layers 0..l-1, layer l's attention and FFN input and
  activation, then ``u``. Output ``â = h · u``: (batch, seq, R).
- ``CloudHalf`` (net2): ``Σ``, ``v`` (+ the original bias), layer l's dropout and, post-LN, its
  norm, without the residual add; layers l+1..L-1, the final norm (pre-LN), the head. Output: logits.

Plain split learning (mode "sl") cuts after layer l: its hidden states cross, nothing is factorised.
``--factorise ffn-input`` cuts at layer l's FFN input instead (``sft_common.cuts.input_cut``).

``SVDOutput`` replaces the FFN output in place (as PEFT swaps a target module): a factorised model
is still an ordinary Hugging Face model, and the halves hold references to its submodules.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from sft_common.cuts import input_cut
from sft_common.models.base_model import BaseModel, family_of
from sft_common.models.families import Family, fill_buffers
from sft_common.models.loading import _materialise, _skeleton, init_head
from sft_common.models.loading import _tensors as _tensors  # re-exported (the U-shape's builders)
from sft_common.topology.spec import FFN_INPUT, RESIDUAL_AWARE, SplitSpec


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


def _ffn_out(family: Family, layer: Any) -> Tuple[nn.Module, str, Any, Any, Any]:
    return family.ffn_output(layer)


def _svd_skeleton(family: Family, layer: nn.Module, rank: int, keep_residual: bool = False) -> SVDOutput:
    """u and the tail for this layer's FFN output, on the meta device (no storage, no draws)."""
    _, _, linear, dropout, norm = _ffn_out(family, layer)
    hidden, inter = family.ffn_weight(linear).shape
    p = None if dropout is None else dropout.p
    with torch.device("meta"):
        down = nn.Linear(inter, rank, bias=False)
        tail = SVDTail(rank, hidden, norm, p, keep_residual, bias=linear.bias is not None)
    return SVDOutput(down, tail.to("meta"))


def _install(family: Family, layer: nn.Module, svd: SVDOutput) -> SVDOutput:
    parent, attr, *_ = _ffn_out(family, layer)
    setattr(parent, attr, svd)
    return svd


def _svd_of(family: Family, layer: nn.Module) -> SVDOutput:
    svd = layer.get_submodule(family.ffn_out)
    assert isinstance(svd, SVDOutput), f"{family.ffn_out} of the cut layer is not factorised"
    return svd


def factorise_layer(family: Family, layer: nn.Module, rank: int, keep_residual: bool = False) -> SVDOutput:
    """Factorise a layer's FFN output linear (weights in place) at rank R: its SVDOutput."""
    _, _, linear, dropout, norm = _ffn_out(family, layer)
    weight = family.ffn_weight(linear)
    u, s, v = svd_factors(weight, rank)
    # Built without initialisation (every value is copied below): random init would draw from
    # the process-wide RNG and shift the dropout masks of another session's step meanwhile.
    svd = _svd_skeleton(family, layer, rank, keep_residual).to_empty(device=weight.device)
    with torch.no_grad():
        svd.u.weight.copy_(u.t())
        svd.tail.sigma.copy_(s)
        svd.tail.v.weight.copy_(v.t())
        if linear.bias is not None:
            svd.tail.v.bias.copy_(linear.bias)
        if norm is not None:
            svd.tail.LayerNorm.load_state_dict(norm.state_dict())
    return svd


def factor_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The SVD factors in ``module`` (a half or a whole split model): u's weight, Σ, v's weight
    (not v's bias, the original one, nor the norm); the FFN-input cut's A and B."""
    found: Dict[int, nn.Parameter] = {}
    for m in module.modules():
        params: List[Any] = []
        if isinstance(m, (SVDOutput, EdgeHalf)) and getattr(m, "u", None) is not None:
            params = [m.u.weight]
        elif isinstance(m, SVDTail):
            params = [m.sigma, m.v.weight]
        elif isinstance(m, input_cut.Factor):
            params = [m.weight]
        found.update((id(p), p) for p in params)
    return list(found.values())


def lengths_to_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Right-padded sequence lengths (batch,) -> boolean mask (batch, seq_len)."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def _adopt(half: nn.Module, modules: Dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        setattr(half, name, module)


class EdgeHalf(nn.Module):
    """net1: embeddings .. layer l's FFN activation, then u (SFT); or .. layer l's output (SL);
    or, cut at the FFN input, .. layer l's attention part, then A."""

    u: nn.Linear
    a: nn.Linear

    def __init__(self, model: nn.Module, spec: SplitSpec):
        super().__init__()
        self.family: Family = family_of(model.config)
        family, layers = self.family, self.family.layers(model)
        self.spec = spec
        _adopt(self, family.embeddings(model))
        if spec.mode == "sft":
            cut = layers[spec.split_layer]
            self.layers = nn.ModuleList(layers[: spec.split_layer])
            if spec.factorise == FFN_INPUT:
                _adopt(self, {**family.attend_parts(cut), "a": input_cut.input_cut_of(cut).a})
            else:
                _adopt(self, family.cut_parts(cut))
                self.u = _svd_of(family, cut).u
        else:
            self.layers = nn.ModuleList(layers[: spec.split_layer + 1])
        _adopt(self, family.shared(model))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the cut activations (batch, seq, width) and, with keep_residual, the residual.
        Decoders ignore ``token_type_ids``."""
        h, ctx = self._below_cut(input_ids, attention_mask, token_type_ids)
        if self.spec.mode == "sl":
            return h, None
        if self.spec.factorise == FFN_INPUT:  # the residual crosses inside the R values
            return self.a(self.family.attend(self, h, ctx)), None
        x, residual = self.family.cut(self, h, ctx)
        return self.u(x), (residual if self.spec.keep_residual else None)

    def cut_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The FFN-output cut's two inputs: the FFN activation g (what ``u`` reads) and the residual
        r the layer adds its FFN output to (what the cut drops), each (batch, seq, width)."""
        if self.spec.mode != "sft" or self.spec.factorise == FFN_INPUT:
            raise ValueError("cut_inputs: an SFT cut at the FFN output only")
        return self.family.cut(self, *self._below_cut(input_ids, attention_mask, token_type_ids))

    def _below_cut(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Embeddings and the whole layers below the cut: the hidden states and the layers' context."""
        family = self.family
        h = family.embed(self, input_ids, attention_mask, token_type_ids)
        ctx = family.context(self, attention_mask, h)
        for layer in self.layers:
            h = family.run_layer(layer, h, ctx)
        return h, ctx


class CloudHalf(nn.Module):
    """net2: (Σ, v, dropout, norm for SFT; B and the rest of layer l at the FFN input), layers
    l+1.., final norm, head (pooling, classifier)."""

    tail: Optional[Union[SVDTail, input_cut.InputTail]]

    def __init__(self, model: nn.Module, spec: SplitSpec):
        super().__init__()
        self.family: Family = family_of(model.config)
        family, layers = self.family, self.family.layers(model)
        self.spec = spec
        self.tail = None
        if spec.mode == "sft":
            cut = layers[spec.split_layer]
            inputs = spec.factorise == FFN_INPUT
            self.tail = input_cut.InputTail(family, cut) if inputs else _svd_of(family, cut).tail
            if spec.init == RESIDUAL_AWARE and isinstance(self.tail, SVDTail):
                # â Σ v stands for the residual as well, which the unsplit layer never drops out
                self.tail.dropout = nn.Identity()
        self.layers = nn.ModuleList(layers[spec.split_layer + 1 :])
        self.head_names = tuple(family.head(model))  # what LoRA leaves trainable (lora.head_parameters)
        _adopt(self, {**family.final(model), **family.shared(model), **family.head(model)})

    def forward(
        self, cut: torch.Tensor, attention_mask: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """cut: (batch, seq, width) activations; attention_mask: (batch, seq). Returns logits."""
        return self.family.pool(self, self.hidden(cut, attention_mask, residual), attention_mask)

    def hidden(
        self, cut: torch.Tensor, attention_mask: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The last layer's hidden states (batch, seq, hidden), before the final norm and head."""
        h = cut if self.tail is None else self.tail(cut, residual)
        ctx = self.family.context(self, attention_mask, h)
        for layer in self.layers:
            h = self.family.run_layer(layer, h, ctx)
        return h


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (one output)."""
    if logits.shape[-1] == 1:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


# ---------------------------------------------------------------------------------------------
# Building models from a BaseModel, loading only the tensors a half needs.


def _validate(base: BaseModel, spec: SplitSpec) -> None:
    spec.validate(base.num_hidden_layers, base.hidden_size, base.intermediate_size)


def build_full_model(base: BaseModel, num_labels: int, seed: int, device: str = "cpu") -> nn.Module:
    """The whole unsplit model with pretrained weights and the seeded head (``--local``)."""
    model = _skeleton(base, num_labels)
    _materialise(model, base, model, seed, device)
    init_head(model, seed)
    return model


def factorise(model: nn.Module, spec: SplitSpec) -> nn.Module:
    """Replace layer l's FFN output with ``SVDOutput`` in place (SFT), or install the FFN-input
    cut's A and B on it; SL changes nothing."""
    if spec.mode == "sft":
        family = family_of(model.config)
        layer = family.layers(model)[spec.split_layer]
        if spec.factorise == FFN_INPUT:
            input_cut.factorise_input(family, layer, spec.rank)
        else:
            _install(family, layer, factorise_layer(family, layer, spec.rank, spec.keep_residual))
    return model


def _cut_skeleton(base: BaseModel, layer: nn.Module, spec: SplitSpec) -> nn.Linear:
    """The cut's factors installed on ``layer`` on the meta device; returns the edge's (u or A)."""
    if spec.factorise == FFN_INPUT:
        return input_cut.skeleton(layer, base.hidden_size, spec.rank).a
    return _install(base.family, layer, _svd_skeleton(base.family, layer, spec.rank)).u


def build_split_model(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[EdgeHalf, CloudHalf]:
    """Both halves of one factorised model in one process (the reference for split training)."""
    _validate(base, spec)
    model = factorise(build_full_model(base, num_labels, seed, device), spec)
    return base.family.untie(EdgeHalf(model, spec), CloudHalf(model, spec), model)


def build_edge_half(
    base: BaseModel, spec: SplitSpec, u: Optional[torch.Tensor], device: str = "cpu"
) -> EdgeHalf:
    """net1 alone, loading only its own weights; ``u`` (intermediate, R) comes from the cloud
    (the FFN-input cut: Aᵀ, (hidden, R))."""
    _validate(base, spec)
    model = _skeleton(base, num_labels=2)  # the head is never materialised on the edge
    if spec.mode == "sft":
        shape = spec.edge_factor_shape(base.hidden_size, base.intermediate_size)
        if u is None or tuple(u.shape) != shape:
            raise ValueError(f"edge factor u must have shape {shape}")
        down = _cut_skeleton(base, base.family.layers(model)[spec.split_layer], spec)  # the rest: meta
        with torch.no_grad():  # (no random init: see factorise_layer)
            down.to_empty(device=device).weight.copy_(u.t())
    half = EdgeHalf(model, spec)
    _materialise(half, base, model, 0, device, skip=("u", "a"))
    return half


def build_cloud_half(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[CloudHalf, Optional[torch.Tensor]]:
    """net2 alone, plus the edge's factor u (SFT) computed here from the pretrained W."""
    _validate(base, spec)
    model = _skeleton(base, num_labels)
    u = None
    if spec.mode == "sft" and spec.factorise == FFN_INPUT:  # the layer's FFN first: the SVD reads it
        layer = base.family.layers(model)[spec.split_layer]
        _materialise(nn.ModuleList(input_cut.tail_modules(base.family, layer)), base, model, seed, device)
        u = input_cut.factorise_input(base.family, layer, spec.rank)[1]
    elif spec.mode == "sft":
        # The cut layer's FFN output linear (and norm after it) is materialised alone, factorised, dropped.
        layer = base.family.layers(model)[spec.split_layer]
        _, _, linear, _, norm = _ffn_out(base.family, layer)
        _materialise(nn.ModuleList([m for m in (linear, norm) if m is not None]), base, model, seed, device)
        svd = _install(base.family, layer, factorise_layer(base.family, layer, spec.rank))
        u = svd.u.weight.detach().t().contiguous()
    half = CloudHalf(model, spec)
    _materialise(half, base, model, seed, device, skip=("tail",))
    init_head(model, seed)
    return half, u


def trained_skeleton(
    config, spec: Optional[SplitSpec], num_labels: int, device: str = "cpu"
) -> Union[nn.Module, Tuple[EdgeHalf, CloudHalf]]:
    """A model of this geometry with uninitialised storage, to load trained weights into: the
    whole model (``spec`` None, a ``--local`` run) or both halves of a split one (an export)."""
    base = BaseModel(name="trained", config=config, fingerprint="", tokenizer_dir="")
    model = _skeleton(base, num_labels)
    if spec is not None and spec.mode == "sft":
        _cut_skeleton(base, base.family.layers(model)[spec.split_layer], spec)
    model.to_empty(device=device)
    fill_buffers(model)  # buffers that no state dict carries
    return model if spec is None else base.family.untie(EdgeHalf(model, spec), CloudHalf(model, spec), model)
