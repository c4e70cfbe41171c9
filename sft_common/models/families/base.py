"""The family base class and what every family shares: masks, layer outputs, recomputed buffers.

A family names, on its Hugging Face ``*ForSequenceClassification`` model: the modules below layer
0 (``embeddings``), the layer list, the cut layer's FFN output linear (``ffn_out``) and the modules
before it (``cut_parts``: the attention part, ``attend_parts``, then the FFN input and activation,
``ffn_in_parts``), its norm placement (post-LN: the norm after the FFN output belongs to the cut;
pre-LN: none), the final norm, and the head. It runs the embeddings, one layer, the cut layer's
attention part (``attend``: the post-attention residual stream) and FFN input (``ffn_in``), and
the head's pooling as the HF class does (encoders: their own heads; decoders: the last real
token, from the attention mask).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple, TypeVar

import torch
from torch import nn

Modules = Dict[str, nn.Module]
E = TypeVar("E", bound=nn.Module)
C = TypeVar("C", bound=nn.Module)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 0/1 mask -> (batch, 1, 1, seq) additive mask for eager and SDPA attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 0/1 padding mask -> (batch, 1, seq, seq) additive causal-and-padding mask
    (right padding: every query row sees position 0, so no row is all -inf)."""
    seq = mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # tuple in transformers 4.x, tensor in 5.x


def fill_buffers(module: nn.Module, names: Optional[List[str]] = None) -> None:
    """Recompute the buffers no checkpoint carries (all of them, or those in ``names``):
    position / token-type ids, and rotary frequencies (rebuilt from the rotary module's config)."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if names is not None and name not in names:
                continue
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            elif name.endswith("token_type_ids"):
                buffer.zero_()
        for m in module.modules():  # "inv_freq", or ModernBERT's "<layer type>_inv_freq"
            rotary = any(key.endswith("inv_freq") for key, _ in m.named_buffers(recurse=False))
            if rotary and hasattr(m, "config"):
                fresh = type(m)(m.config)  # deterministic: no random draws
                for key, value in fresh.named_buffers(recurse=False):
                    getattr(m, key).copy_(value)


class Family:
    """An encoder family (post-LN, BERT's layout); subclasses override what differs."""

    name = ""  # as refusals list it
    model_types: Tuple[str, ...] = ()  # config.model_type values it covers
    prefix = ""  # the classifier's backbone attribute, also the checkpoint key prefix it strips
    classes: Tuple[str, ...] = ()  # transformers classes: backbone, sequence classifier, config
    # A random: preset's config: its geometry (hidden, layers, heads, intermediate) under these
    # names, the packaged MiniLM tokenizer's vocabulary, and these further values.
    random_names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    random_extra: Dict[str, Any] = {}
    ffn_out = "output"  # path in a layer of the FFN output linear, or of a BertOutput-like block
    ffn_block = True  # ffn_out is a block (dense, dropout, LayerNorm) called with the residual
    head_new: Tuple[str, ...] = ("classifier.",)  # head tensors a base checkpoint may lack (seeded)
    decoder = False  # causal attention, no token types, pools the last real token
    since = (4, 40)  # the oldest transformers whose layers this family calls as written here
    shaping: Tuple[str, ...] = ()  # config entries that shape its function, fingerprinted

    def too_old(self) -> Optional[str]:
        """Why the installed transformers cannot run this family (None: it can): older than
        ``since``, or without its classes. Asked before any of them is touched."""
        import transformers

        installed = transformers.__version__
        old = tuple(int(x) for x in installed.split(".")[:2]) < self.since
        if old or not all(hasattr(transformers, c) for c in self.classes):
            return (
                f"{self.name} needs transformers >= {'.'.join(map(str, self.since))} (installed: {installed})"
            )
        return None

    def refusal(self, config) -> Optional[str]:
        """Why this config cannot be split here (None: it can)."""
        return self.too_old()

    def num_layers(self, config) -> int:
        return int(config.num_hidden_layers)

    def hidden(self, config) -> int:
        return int(config.hidden_size)

    def intermediate(self, config) -> int:
        return int(config.intermediate_size)

    def max_positions(self, config) -> int:
        """The longest sequence the model embeds."""
        return int(config.max_position_embeddings)

    def model_class(self, which: int = 1) -> Any:
        import transformers

        return getattr(transformers, self.classes[which])

    def base_name(self, name: str) -> str:
        """A tensor's name in the classifier -> its name in a base checkpoint (prefix stripped)."""
        return name[len(self.prefix) + 1 :] if name.startswith(self.prefix + ".") else name

    def layers(self, model: Any) -> nn.ModuleList:
        return getattr(model, self.prefix).encoder.layer

    def embeddings(self, model: Any) -> Modules:
        return {"embeddings": getattr(model, self.prefix).embeddings}

    def shared(self, model: Any) -> Modules:
        """Modules both halves run: rotary embeddings (no parameters), DeBERTa's relative-position
        embeddings (parameters: each half trains its own copy, see ``untie``)."""
        return {}

    def untie(self, edge: E, cloud: C, model: Any) -> Tuple[E, C]:
        """Two halves built in one process from the same ``model``: the cloud's half gets its own
        copy of the shared modules with parameters, as a separately built cloud half has. One
        process then trains what the two sides train, and each half's state dict loads into its own."""
        for name, module in self.shared(model).items():
            if next(module.parameters(), None) is not None:
                setattr(cloud, name, copy.deepcopy(module))
        return edge, cloud

    def final(self, model: Any) -> Modules:
        """The norm after the last layer (pre-LN families)."""
        return {}

    def head(self, model: Any) -> Modules:
        return {"classifier": model.classifier}

    def head_linear(self, model: Any) -> Any:
        """The head's last linear, drawn afresh from the seed (``split.init_head``)."""
        return list(self.head(model).values())[-1]

    def cut_parts(self, layer: Any) -> Modules:
        """The cut layer's modules the edge runs before the FFN output linear (the FFN-output cut)."""
        return {**self.attend_parts(layer), **self.ffn_in_parts(layer)}

    def attend_parts(self, layer: Any) -> Modules:
        """The cut layer's attention part, up to the post-attention residual stream r."""
        return {"attention": layer.attention}

    def ffn_in_parts(self, layer: Any) -> Modules:
        """The cut layer's FFN input from r: a pre-LN layer's norm, the input linear(s), the activation."""
        return {"intermediate": layer.intermediate}

    def ffn_in_weight(self, layer: Any) -> torch.Tensor:
        """The FFN input linear's weight as the layer applies it to r, (out, hidden): gate and up
        stacked, a Conv1D's transposed, a pre-LN norm's scale multiplied in (``W · diag(γ)``)."""
        return layer.intermediate.dense.weight

    def ffn_output(self, layer: Any) -> Tuple[nn.Module, str, Any, Any, Any]:
        """(parent, attribute, the FFN output linear, its dropout, the norm after it) in a layer."""
        path, _, attr = self.ffn_out.rpartition(".")
        parent = layer.get_submodule(path) if path else layer
        out = getattr(parent, attr)
        if not self.ffn_block:
            return (parent, attr, out, *self.after_ffn(layer))
        return parent, attr, out.dense, out.dropout, out.LayerNorm

    def after_ffn(self, layer: Any) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        """(dropout, norm) after a bare FFN output linear (``ffn_block`` False); None: absent."""
        return None, None

    def ffn_weight(self, linear: Any) -> torch.Tensor:
        """The FFN output linear's weight as (hidden, intermediate)."""
        return linear.weight

    def embed(self, half, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return half.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def context(self, half, attention_mask: torch.Tensor, h: torch.Tensor) -> Dict[str, Any]:
        """What every layer needs besides the hidden states: the masks, positions."""
        return {"mask": additive_mask(attention_mask, h.dtype)}

    def run_layer(self, layer: Any, h: torch.Tensor, ctx: Dict[str, Any]) -> torch.Tensor:
        return layer_output(layer(h, ctx["mask"]))

    def cut(self, half, h, ctx) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cut layer up to the FFN activation: (activations, the residual of the FFN)."""
        r = self.attend(half, h, ctx)
        return self.ffn_in(half, r), r

    def attend(self, half, h: torch.Tensor, ctx: Dict[str, Any]) -> torch.Tensor:
        """The cut layer's attention part (``attend_parts``, held by ``half``): the residual stream
        r the FFN reads and adds to (post-LN: after the attention block's norm)."""
        return half.attention(h, ctx["mask"])[0]

    def ffn_in(self, parts, r: torch.Tensor) -> torch.Tensor:
        """The FFN input and activation (``ffn_in_parts``, held by ``parts``) applied to r."""
        return parts.intermediate(r)

    def pool(self, half, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return half.classifier(h)

    def random_config(self, geometry: Tuple[int, ...], vocab: int) -> Any:
        """The config of a ``random:`` preset."""
        return self.model_class(2)(
            vocab_size=vocab, **dict(zip(self.random_names, geometry)), **self.random_extra
        )
