"""The split model: SVD factorisation of layer l's FFN output, and the edge and cloud halves.

For split layer l of a BERT encoder, with the FFN output linear ``W`` (hidden x intermediate)
and ``W^T = u · diag(Σ) · v`` truncated to rank R (paper §III-B, Eq. 2-3):

- ``EdgeHalf`` (net1): embeddings, layers 0..l-1, layer l's attention and FFN intermediate, then
  ``u``. Output ``â = h · u``: (batch, seq, R).
- ``CloudHalf`` (net2): ``Σ``, ``v`` (+ the original bias), layer l's dropout and LayerNorm without
  the residual add, layers l+1..L-1, pooler, dropout, classifier. Output: logits.

Plain split learning (mode "sl") cuts after the whole of layer l: the edge sends the layer's
output hidden states (batch, seq, hidden) and nothing is factorised.

``SVDOutput`` replaces ``BertOutput`` in place, the way PEFT swaps a target module, so a
factorised model is still an ordinary Hugging Face model (used in one process by ``--local``
equivalence tests and the drop-in API); the halves hold references to its submodules.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import BertForSequenceClassification

from sft_common.models import BaseModel
from sft_common.spec import SplitSpec


def svd_factors(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a Linear weight W (out x in): returns u (in, R), Σ (R,), v (R, out).

    ``W^T ≈ u @ diag(Σ) @ v``; computed in float64 so the factors are exact to float32 precision.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double().t(), full_matrices=False)
    return u[:, :rank].float().contiguous(), s[:rank].float().contiguous(), vh[:rank].float().contiguous()


class SVDTail(nn.Module):
    """The cloud's side of the cut: ``Σ``, ``v`` with the original bias, dropout, LayerNorm.

    Input â: (batch, seq, R). Without ``keep_residual`` the LayerNorm sees ``â Σ v + b`` alone
    (the residual input stays on the edge, paper §III-A).
    """

    def __init__(self, rank: int, hidden: int, eps: float, dropout: float, keep_residual: bool = False):
        super().__init__()
        self.sigma = nn.Parameter(torch.ones(rank))  # (R,) singular values
        self.v = nn.Linear(rank, hidden)  # weight (hidden, R) = v^T; bias = the original bias
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.keep_residual = keep_residual

    def forward(self, a_hat: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.dropout(self.v(a_hat * self.sigma))
        if self.keep_residual:
            if residual is None:
                raise ValueError("keep_residual needs the residual input")
            x = x + residual
        return self.LayerNorm(x)


class SVDOutput(nn.Module):
    """Drop-in replacement for ``BertOutput``: ``u`` on the edge, then ``SVDTail`` on the cloud."""

    def __init__(self, u: nn.Linear, tail: SVDTail):
        super().__init__()
        self.u = u  # Linear(intermediate, R, bias=False); weight (R, intermediate) = u^T
        self.tail = tail

    @classmethod
    def from_output(cls, output: Any, rank: int, keep_residual: bool = False) -> SVDOutput:
        """Factorise a ``BertOutput`` (dense, dropout, LayerNorm) at rank R."""
        dense = output.dense
        hidden, inter = dense.weight.shape
        u, s, v = svd_factors(dense.weight, rank)
        # Built without initialisation (every value is copied below): random init would draw from
        # the process-wide RNG and shift the dropout masks of another session's step meanwhile.
        with torch.device("meta"):
            down = nn.Linear(inter, rank, bias=False)
            tail = SVDTail(rank, hidden, output.LayerNorm.eps, output.dropout.p, keep_residual)
        down.to_empty(device=dense.weight.device)
        tail.to_empty(device=dense.weight.device)
        with torch.no_grad():
            down.weight.copy_(u.t())
            tail.sigma.copy_(s)
            tail.v.weight.copy_(v.t())
            tail.v.bias.copy_(dense.bias)
            tail.LayerNorm.load_state_dict(output.LayerNorm.state_dict())
        return cls(down, tail)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.tail(self.u(hidden_states), input_tensor)


def factor_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The SVD factors in ``module`` (an edge half, a cloud half or a whole split model): u's
    weight, Σ and v's weight. Not v's bias (the original dense bias) nor the LayerNorm."""
    found: Dict[int, nn.Parameter] = {}
    for m in module.modules():
        params: List[Any] = []
        if isinstance(m, (SVDOutput, EdgeHalf)) and getattr(m, "u", None) is not None:
            params = [m.u.weight]
        elif isinstance(m, SVDTail):
            params = [m.sigma, m.v.weight]
        found.update((id(p), p) for p in params)
    return list(found.values())


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 0/1 mask -> (batch, 1, 1, seq) additive mask for eager and SDPA attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def lengths_to_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Right-padded sequence lengths (batch,) -> boolean mask (batch, seq_len)."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def _run_layer(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = layer(h, mask)
    return out[0] if isinstance(out, tuple) else out  # tuple in transformers 4.x, tensor in 5.x


class EdgeHalf(nn.Module):
    """net1: embeddings .. layer l's FFN intermediate, then u (SFT); or .. layer l's output (SL)."""

    def __init__(self, model: BertForSequenceClassification, spec: SplitSpec):
        super().__init__()
        layers = model.bert.encoder.layer
        self.spec = spec
        self.embeddings = model.bert.embeddings
        if spec.mode == "sft":
            cut = layers[spec.split_layer]
            self.layers = nn.ModuleList(layers[: spec.split_layer])
            self.attention = cut.attention
            self.intermediate = cut.intermediate
            self.u = cut.output.u
        else:
            self.layers = nn.ModuleList(layers[: spec.split_layer + 1])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the cut activations (batch, seq, width) and, with keep_residual, the residual."""
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = additive_mask(attention_mask, h.dtype)
        for layer in self.layers:
            h = _run_layer(layer, h, mask)
        if self.spec.mode == "sl":
            return h, None
        attn = self.attention(h, mask)[0]
        a_hat = self.u(self.intermediate(attn))
        return a_hat, (attn if self.spec.keep_residual else None)


class CloudHalf(nn.Module):
    """net2: (Σ, v, LayerNorm for SFT), layers l+1.., pooler, dropout, classifier."""

    def __init__(self, model: BertForSequenceClassification, spec: SplitSpec):
        super().__init__()
        layers = model.bert.encoder.layer
        self.spec = spec
        self.tail = layers[spec.split_layer].output.tail if spec.mode == "sft" else None
        self.layers = nn.ModuleList(layers[spec.split_layer + 1 :])
        self.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(
        self, cut: torch.Tensor, attention_mask: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """cut: (batch, seq, width) activations; attention_mask: (batch, seq). Returns logits."""
        h = cut if self.tail is None else self.tail(cut, residual)  # type: ignore[misc]
        mask = additive_mask(attention_mask, h.dtype)
        for layer in self.layers:
            h = _run_layer(layer, h, mask)
        return self.classifier(self.dropout(self.pooler(h)))  # type: ignore[misc]


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (one output)."""
    if logits.shape[-1] == 1:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


# ---------------------------------------------------------------------------------------------
# Building models from a BaseModel, loading only the tensors a half needs.


def init_head(model: BertForSequenceClassification, seed: int) -> None:
    """Initialise the task head from ``seed`` alone, so every builder gets the same head."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        w = torch.empty(model.classifier.weight.shape).normal_(0.0, std, generator=g)
        model.classifier.weight.copy_(w)
        model.classifier.bias.zero_()


def _skeleton(base: BaseModel, num_labels: int) -> BertForSequenceClassification:
    """The model's modules with no storage (meta device): cheap, however large the model."""
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    with torch.device("meta"):
        return BertForSequenceClassification(config)


def _materialise(
    module: nn.Module,
    base: BaseModel,
    prefix_map: Dict[str, str],
    seed: int,
    device: str,
    skip: Tuple[str, ...] = (),
) -> None:
    """Give ``module`` storage on ``device`` and fill it from the base model's tensors.

    ``prefix_map`` maps prefixes of the module's tensor names to the base model's names; the
    children named in ``skip`` are already built and left alone. Tensors the checkpoint lacks:
    the pooler and head come from ``seed``; position / token-type id buffers are recomputed;
    anything else is an error.
    """

    def base_name(name: str) -> Optional[str]:
        for ours, theirs in prefix_map.items():
            if name.startswith(ours):
                return theirs + name[len(ours) :]
        return None

    for child_name, child in module.named_children():
        if child_name not in skip:
            child.to_empty(device=device)
    own = [
        (n, t)
        for n, t in list(module.named_parameters()) + list(module.named_buffers())
        if n.split(".", 1)[0] not in skip
    ]
    sources = {n: base_name(n) for n, _ in own}
    tensors = base.load(src for src in sources.values() if src is not None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in own:
            src = sources[name]
            if src is not None and src in tensors:
                value = tensors[src]
                assert value.shape == tensor.shape, (
                    f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}"
                )
                tensor.copy_(value)
            elif name.endswith("position_ids"):
                tensor.copy_(torch.arange(tensor.shape[-1]).expand_as(tensor))
            elif name.endswith("token_type_ids"):
                tensor.zero_()
            elif src is not None and src.startswith(("pooler.", "classifier.")):
                if tensor.dim() > 1:
                    tensor.copy_(torch.empty(tensor.shape).normal_(0.0, 0.02, generator=gen))
                else:
                    tensor.zero_()
            else:
                raise KeyError(f"{name} ({src}) is missing from the checkpoint of {base.name!r}")


def _layer_map(first: int, last: int, ours: str = "layers.") -> Dict[str, str]:
    return {f"{ours}{i - first}.": f"encoder.layer.{i}." for i in range(first, last)}


def build_full_model(
    base: BaseModel, num_labels: int, seed: int, device: str = "cpu"
) -> BertForSequenceClassification:
    """The whole unsplit model with pretrained weights and the seeded head (``--local``)."""
    model = _skeleton(base, num_labels)
    _materialise(model, base, {"bert.": "", "classifier.": "classifier."}, seed, device)
    init_head(model, seed)
    return model


def factorise(model: BertForSequenceClassification, spec: SplitSpec) -> BertForSequenceClassification:
    """Replace layer l's ``BertOutput`` with ``SVDOutput`` in place (SFT); SL changes nothing."""
    if spec.mode == "sft":
        layer = model.bert.encoder.layer[spec.split_layer]
        layer.output = SVDOutput.from_output(layer.output, spec.rank, spec.keep_residual)
    return model


def build_split_model(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[EdgeHalf, CloudHalf]:
    """Both halves of one factorised model in one process (the reference for split training)."""
    cfg = base.config
    spec.validate(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    model = factorise(build_full_model(base, num_labels, seed, device), spec)
    return EdgeHalf(model, spec), CloudHalf(model, spec)


def build_edge_half(
    base: BaseModel, spec: SplitSpec, u: Optional[torch.Tensor], device: str = "cpu"
) -> EdgeHalf:
    """net1 alone, loading only its own weights; ``u`` (intermediate, R) comes from the cloud."""
    cfg = base.config
    spec.validate(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    model = _skeleton(base, num_labels=2)  # the head is never materialised on the edge
    if spec.mode == "sft":
        if u is None or tuple(u.shape) != (cfg.intermediate_size, spec.rank):
            raise ValueError(f"edge factor u must have shape {(cfg.intermediate_size, spec.rank)}")
        down = nn.Linear(cfg.intermediate_size, spec.rank, bias=False, device="meta").to_empty(device=device)
        with torch.no_grad():  # (no random init: see SVDOutput.from_output)
            down.weight.copy_(u.t())
        with torch.device("meta"):
            tail = SVDTail(spec.rank, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)
        model.bert.encoder.layer[spec.split_layer].output = SVDOutput(down, tail)
    half = EdgeHalf(model, spec)
    l = spec.split_layer
    prefixes = {
        "embeddings.": "embeddings.",
        **_layer_map(0, l + (spec.mode == "sl")),
        "attention.": f"encoder.layer.{l}.attention.",
        "intermediate.": f"encoder.layer.{l}.intermediate.",
    }
    _materialise(half, base, prefixes, 0, device, skip=("u",))
    return half


def build_cloud_half(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[CloudHalf, Optional[torch.Tensor]]:
    """net2 alone, plus the edge's factor u (SFT) computed here from the pretrained W."""
    cfg = base.config
    spec.validate(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    model = _skeleton(base, num_labels)
    l = spec.split_layer
    layer = model.bert.encoder.layer[l]
    prefixes = {
        **_layer_map(l + 1, cfg.num_hidden_layers),
        "pooler.": "pooler.",
        "classifier.": "classifier.",
    }
    u = None
    if spec.mode == "sft":
        # The cut layer's BertOutput is materialised alone, factorised, then dropped.
        _materialise(layer.output, base, {"": f"encoder.layer.{l}.output."}, seed, device)
        layer.output = SVDOutput.from_output(layer.output, spec.rank)
        u = layer.output.u.weight.detach().t().contiguous()
    half = CloudHalf(model, spec)
    _materialise(half, base, prefixes, seed, device, skip=("tail",))
    init_head(model, seed)
    return half, u


def trained_skeleton(
    config, spec: Optional[SplitSpec], num_labels: int, device: str = "cpu"
) -> Union[BertForSequenceClassification, Tuple[EdgeHalf, CloudHalf]]:
    """A model of this geometry with uninitialised storage, to load trained weights into: the
    whole model (``spec`` None, a ``--local`` run) or both halves of a split one (an export)."""
    base = BaseModel(name="trained", config=config, fingerprint="", tokenizer_dir="")
    model = _skeleton(base, num_labels)
    if spec is not None and spec.mode == "sft":
        cfg = base.config
        with torch.device("meta"):
            down = nn.Linear(cfg.intermediate_size, spec.rank, bias=False)
            tail = SVDTail(spec.rank, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob)
        model.bert.encoder.layer[spec.split_layer].output = SVDOutput(down, tail)
    model.to_empty(device=device)
    with torch.no_grad():  # buffers that no state dict carries
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            elif name.endswith("token_type_ids"):
                buffer.zero_()
    return model if spec is None else (EdgeHalf(model, spec), CloudHalf(model, spec))
