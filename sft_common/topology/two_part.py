"""The two-part split: the edge's half and the cloud's half of a model cut at layer l.

Written once over the family adapters (``sft_common.models.families``) and the cuts
(``sft_common.cuts``: what layer l becomes, resolved once from the spec, ``SplitSpec.cut``):

- ``EdgeHalf`` (net1): embeddings, the layers the cut leaves whole below it, then the cut's sending
  modules (the paper's FFN-output cut: layer l's attention and FFN input and activation, then
  ``u``; output ``â = h · u``: (batch, seq, R)).
- ``CloudHalf`` (net2): the cut's receiving module (the FFN-output cut: ``Σ``, ``v`` (+ the original
  bias), layer l's dropout and, post-LN, its norm, without the residual add), layers l+1..L-1, the
  final norm (pre-LN), the head. Output: logits.

A cut installs its modules in the model in place (as PEFT swaps a target module): a factorised
model is still an ordinary Hugging Face model, and the halves hold references to its submodules.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from sft_common.cuts import input_cut
from sft_common.cuts.ffn_output import SVDOutput, SVDTail
from sft_common.models.base_model import BaseModel, family_of
from sft_common.models.families import Family, fill_buffers
from sft_common.models.loading import base_tensors, init_head, materialise, model_skeleton
from sft_common.models.shared import SharedBase, build_on, record
from sft_common.topology.spec import SplitSpec


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


def adopt(part: nn.Module, modules: Dict[str, nn.Module]) -> None:
    """Hold each of ``modules`` (a model's, by reference) as ``part``'s child of that name."""
    for name, module in modules.items():
        setattr(part, name, module)


class EdgeHalf(nn.Module):
    """net1: embeddings .. the cut's sending modules: layer l's FFN activation, then u (SFT);
    layer l's output (SL); at the FFN input, layer l's attention part, then A."""

    u: nn.Linear
    a: nn.Linear

    def __init__(self, model: nn.Module, spec: SplitSpec):
        super().__init__()
        self.family: Family = family_of(model.config)
        family, layers = self.family, self.family.layers(model)
        self.spec = spec
        self.cut = spec.cut
        adopt(self, family.embeddings(model))
        self.layers = nn.ModuleList(self.cut.layers_before(layers, spec.split_layer))
        adopt(self, self.cut.sender_modules(family, layers[spec.split_layer]))
        adopt(self, family.shared(model))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the cut activations (batch, seq, width) and, with keep_residual, the residual.
        Decoders ignore ``token_type_ids``."""
        return self.cut.send(self.family, self, *self._below_cut(input_ids, attention_mask, token_type_ids))

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
    """net2: the cut's receiving module (Σ, v, dropout, norm for SFT; B and the rest of layer l at
    the FFN input; none for SL), layers l+1.., final norm, head (pooling, classifier)."""

    tail: Optional[nn.Module]

    def __init__(self, model: nn.Module, spec: SplitSpec):
        super().__init__()
        self.family: Family = family_of(model.config)
        family, layers = self.family, self.family.layers(model)
        self.spec = spec
        self.tail = spec.cut.receiver(family, layers[spec.split_layer])
        self.layers = nn.ModuleList(layers[spec.split_layer + 1 :])
        self.head_names = tuple(family.head(model))  # what LoRA leaves trainable (lora.head_parameters)
        adopt(self, {**family.final(model), **family.shared(model), **family.head(model)})

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


def validate_split(base: BaseModel, spec: SplitSpec) -> None:
    """ValueError with a user-facing message when ``spec`` does not fit ``base``."""
    spec.validate(base.num_hidden_layers, base.hidden_size, base.intermediate_size)


def build_full_model(base: BaseModel, num_labels: int, seed: int, device: str = "cpu") -> nn.Module:
    """The whole unsplit model with pretrained weights and the seeded head (``--local``)."""
    model = model_skeleton(base, num_labels)
    materialise(model, base, model, seed, device)
    init_head(model, seed)
    return model


def factorise(model: nn.Module, spec: SplitSpec) -> nn.Module:
    """Install the spec's cut on layer l of a built model, in place (SL changes nothing)."""
    family = family_of(model.config)
    spec.cut.factorise(family, family.layers(model)[spec.split_layer])
    return model


def build_split_model(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str = "cpu"
) -> Tuple[EdgeHalf, CloudHalf]:
    """Both halves of one factorised model in one process (the reference for split training)."""
    validate_split(base, spec)
    model = factorise(build_full_model(base, num_labels, seed, device), spec)
    return base.family.untie(EdgeHalf(model, spec), CloudHalf(model, spec), model)


def build_edge_half(
    base: BaseModel, spec: SplitSpec, u: Optional[torch.Tensor], device: str = "cpu"
) -> EdgeHalf:
    """net1 alone, loading only its own weights; ``u`` (intermediate, R) comes from the cloud
    (the FFN-input cut: Aᵀ, (hidden, R); plain SL: none)."""
    validate_split(base, spec)
    cut = spec.cut
    model = model_skeleton(base, num_labels=2)  # the head is never materialised on the edge
    shape = cut.edge_factor_shape(base.hidden_size, base.intermediate_size)
    if shape is not None:
        if u is None or tuple(u.shape) != shape:
            raise ValueError(f"edge factor u must have shape {shape}")
        layer = base.family.layers(model)[spec.split_layer]
        down = cut.skeleton(base.family, layer, base.hidden_size)  # the rest of the cut: meta
        assert down is not None
        with torch.no_grad():  # (no random init: see ffn_output.factorise_layer)
            down.to_empty(device=device).weight.copy_(u.t())
    half = EdgeHalf(model, spec)
    materialise(half, base, model, 0, device, skip=("u", "a"))
    return half


def build_cloud_half(
    base: BaseModel,
    spec: SplitSpec,
    num_labels: int,
    seed: int,
    device: str = "cpu",
    shared: Optional[SharedBase] = None,
) -> Tuple[CloudHalf, Optional[torch.Tensor]]:
    """net2 alone, plus the edge's factor (u, or Aᵀ; None for SL) computed here from the
    pretrained weights the cut reads (materialised alone, factorised, dropped). ``shared`` (LoRA
    sessions): net2 is built on the frozen base of the sessions of this model and split
    (``sft_common.models.shared``), the first one records it; the head is always this session's
    own, built from ``seed`` for ``num_labels`` as without ``shared``."""
    if shared is None:
        return _build_half(base, spec, num_labels, seed, device)
    with shared.lock:
        if not shared.recorded:
            half, u = _build_half(base, spec, num_labels, seed, device)
            record(shared, half, factor_parameters(half), u, per_session=_head(half).parameters())
            model = model_skeleton(base, num_labels)
            shared.head = base_tensors(nn.ModuleDict(base.family.head(model)), base, model)
            return half, u
        validate_split(base, spec)
        model = model_skeleton(base, num_labels)
        # the cut's modules on meta: nothing read, no SVD
        spec.cut.skeleton(base.family, base.family.layers(model)[spec.split_layer], base.hidden_size)
        half = CloudHalf(model, spec)
        head = _head(half)
        build_on(shared, half, factor_parameters(half) + list(head.parameters()), device)
        # the head, left on meta: materialised alone, with the same draws as _build_half's
        materialise(head, base, model, seed, device, loaded=shared.head)
        init_head(model, seed)
        return half, shared.sent


def _head(half: CloudHalf) -> nn.ModuleDict:
    """net2's task head (``Family.head``), its modules by their names in net2, in its order."""
    return nn.ModuleDict({name: getattr(half, name) for name in half.head_names})


def _build_half(
    base: BaseModel, spec: SplitSpec, num_labels: int, seed: int, device: str
) -> Tuple[CloudHalf, Optional[torch.Tensor]]:
    """net2 and the edge's factor, from the base model's tensors."""
    validate_split(base, spec)
    model = model_skeleton(base, num_labels)
    u = spec.cut.load(base, model, base.family.layers(model)[spec.split_layer], device)
    half = CloudHalf(model, spec)
    materialise(half, base, model, seed, device, skip=("tail",))
    init_head(model, seed)
    return half, u


def trained_skeleton(
    config, spec: Optional[SplitSpec], num_labels: int, device: str = "cpu"
) -> Union[nn.Module, Tuple[EdgeHalf, CloudHalf]]:
    """A model of this geometry with uninitialised storage, to load trained weights into: the
    whole model (``spec`` None, a ``--local`` run) or both halves of a split one (an export)."""
    base = BaseModel(name="trained", config=config, fingerprint="", tokenizer_dir="")
    model = model_skeleton(base, num_labels)
    if spec is not None:
        spec.cut.skeleton(base.family, base.family.layers(model)[spec.split_layer], base.hidden_size)
    model.to_empty(device=device)
    fill_buffers(model)  # buffers that no state dict carries
    return model if spec is None else base.family.untie(EdgeHalf(model, spec), CloudHalf(model, spec), model)
