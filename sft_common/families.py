"""Model families: where each architecture keeps what the split needs, and how it runs it.

``split.py`` is written once over these adapters. A family names, on its Hugging Face
``*ForSequenceClassification`` model: the modules below layer 0 (``embeddings``), the layer list,
the cut layer's FFN output linear (``ffn_out``) and the modules before it (``cut_parts``:
attention, FFN input and activation), its norm placement (post-LN: the norm after the FFN
output belongs to the cut; pre-LN: none), the final norm, and the head. It runs the embeddings,
one layer, the cut layer up to the FFN activation, and the head's pooling as the HF class does
(encoders: their own heads; decoders: the last real token, found from the attention mask).

Adding a family: one subclass (a few attributes and the methods that differ) and its tests
(tests/sft_common/test_families.py). Layers are called as transformers 5.x calls them; BERT and
RoBERTa's also run under 4.40+ (tuples there), the others are refused before 5.0 (``since``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

Modules = Dict[str, nn.Module]


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
        for m in module.modules():
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "config"):
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

    def refusal(self, config) -> Optional[str]:
        """Why this config cannot be split here (None: it can)."""
        import transformers

        if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < self.since:
            need = ".".join(map(str, self.since))
            return f"{self.name} needs transformers >= {need} (installed: {transformers.__version__})"
        return None

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
        """Parameter-free modules both halves run (rotary embeddings)."""
        return {}

    def final(self, model: Any) -> Modules:
        """The norm after the last layer (pre-LN families)."""
        return {}

    def head(self, model: Any) -> Modules:
        return {"classifier": model.classifier}

    def head_linear(self, model: Any) -> Any:
        """The head's last linear, drawn afresh from the seed (``split.init_head``)."""
        return list(self.head(model).values())[-1]

    def cut_parts(self, layer: Any) -> Modules:
        """The cut layer's modules the edge runs before the FFN output linear."""
        return {"attention": layer.attention, "intermediate": layer.intermediate}

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
        attn = half.attention(h, ctx["mask"])[0]
        return half.intermediate(attn), attn

    def pool(self, half, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return half.classifier(h)

    def random_config(self, geometry: Tuple[int, ...], vocab: int) -> Any:
        """The config of a ``random:`` preset."""
        return self.model_class(2)(
            vocab_size=vocab, **dict(zip(self.random_names, geometry)), **self.random_extra
        )


class Bert(Family):
    """BERT and its distillations (MiniLM): pooler + dropout + classifier."""

    name, model_types, prefix = "BERT", ("bert",), "bert"
    classes = ("BertModel", "BertForSequenceClassification", "BertConfig")
    head_new = ("pooler.", "classifier.")

    def head(self, model):
        return {"pooler": model.bert.pooler, "dropout": model.dropout, "classifier": model.classifier}

    def pool(self, half, h, attention_mask):
        return half.classifier(half.dropout(half.pooler(h)))


class Roberta(Family):
    """RoBERTa: BERT's layers; positions count from pad + 1; head dense-tanh-out_proj on <s>."""

    name, model_types, prefix = "RoBERTa", ("roberta",), "roberta"
    classes = ("RobertaModel", "RobertaForSequenceClassification", "RobertaConfig")
    random_extra = dict(
        pad_token_id=0, bos_token_id=101, eos_token_id=102, max_position_embeddings=514, type_vocab_size=1
    )

    def max_positions(self, config):
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

    def head_linear(self, model):
        return model.classifier.out_proj

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        pad = half.embeddings.padding_idx  # positions from the mask: any id may pad the batch
        positions = torch.cumsum(attention_mask, dim=1) * attention_mask + pad
        if half.embeddings.token_type_embeddings.num_embeddings == 1:
            token_type_ids = None  # one segment type (RoBERTa's tokenizers send none)
        return half.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=positions.long()
        )


class XlmRoberta(Roberta):
    name, model_types = "XLM-R", ("xlm-roberta",)
    classes = ("XLMRobertaModel", "XLMRobertaForSequenceClassification", "XLMRobertaConfig")


class DistilBert(Family):
    """DistilBERT: post-LN blocks (attention, sa_layer_norm, ffn.lin1/lin2, output_layer_norm);
    no token types; head pre_classifier-ReLU-dropout-classifier on [CLS]."""

    name, model_types, prefix = "DistilBERT", ("distilbert",), "distilbert"
    classes = ("DistilBertModel", "DistilBertForSequenceClassification", "DistilBertConfig")
    ffn_out, ffn_block = "ffn.lin2", False
    head_new, since = ("pre_classifier.", "classifier."), (5, 0)  # 4.x: another attention API
    random_names, random_extra = ("dim", "n_layers", "n_heads", "hidden_dim"), dict(pad_token_id=0)

    def intermediate(self, config):
        return int(config.hidden_dim)

    def layers(self, model):
        return model.distilbert.transformer.layer

    def head(self, model):
        return {
            "pre_classifier": model.pre_classifier,
            "dropout": model.dropout,
            "classifier": model.classifier,
        }

    def cut_parts(self, layer):
        return {
            "attention": layer.attention, "sa_layer_norm": layer.sa_layer_norm,
            "lin1": layer.ffn.lin1, "activation": layer.ffn.activation,
        }  # fmt: skip

    def after_ffn(self, layer):
        return layer.ffn.dropout, layer.output_layer_norm

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        return half.embeddings(input_ids)

    def cut(self, half, h, ctx):
        attn = half.sa_layer_norm(half.attention(h, attention_mask=ctx["mask"])[0] + h)
        return half.activation(half.lin1(attn)), attn

    def pool(self, half, h, attention_mask):
        return half.classifier(half.dropout(torch.relu(half.pre_classifier(h[:, 0]))))


class Decoder(Family):
    """A pre-LN decoder: causal attention, no token types, a final norm, ``score`` on the last real
    token (its HF class finds it from the pad token id; here from the attention mask)."""

    decoder, since = True, (5, 0)  # 4.x: rotary inside attention, GPT-2's mask buffers
    head_new = ("score.",)

    def head(self, model):
        return {"score": model.score}

    def context(self, half, attention_mask, h):
        positions = torch.arange(h.shape[1], device=h.device)[None, :]
        return {"mask": causal_mask(attention_mask, h.dtype), "positions": positions}

    def pool(self, half, h, attention_mask):
        last = attention_mask.long().sum(dim=1) - 1
        return half.score(half.norm(h[torch.arange(h.shape[0], device=h.device), last]))


class Gpt2(Decoder):
    """GPT-2: wte + wpe; blocks ln_1, attn, ln_2, mlp (c_fc, act, c_proj: Conv1D, weight (in, out))."""

    name, model_types, prefix = "GPT-2", ("gpt2",), "transformer"
    classes = ("GPT2Model", "GPT2ForSequenceClassification", "GPT2Config")
    ffn_out, ffn_block = "mlp.c_proj", False
    random_names = ("n_embd", "n_layer", "n_head", "n_inner")
    random_extra = dict(n_positions=512, pad_token_id=0, bos_token_id=101, eos_token_id=102)

    def intermediate(self, config):
        return int(config.n_inner or 4 * config.n_embd)

    def layers(self, model):
        return model.transformer.h

    def embeddings(self, model):
        return {"wte": model.transformer.wte, "wpe": model.transformer.wpe, "drop": model.transformer.drop}

    def final(self, model):
        return {"norm": model.transformer.ln_f}

    def cut_parts(self, layer):
        return {
            "ln_1": layer.ln_1,
            "attn": layer.attn,
            "ln_2": layer.ln_2,
            "c_fc": layer.mlp.c_fc,
            "act": layer.mlp.act,
        }

    def after_ffn(self, layer):
        return layer.mlp.dropout, None

    def ffn_weight(self, linear):
        return linear.weight.t()  # Conv1D keeps (in, out)

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        return half.drop(half.wte(input_ids) + half.wpe(positions))

    def run_layer(self, layer, h, ctx):
        return layer_output(layer(h, attention_mask=ctx["mask"]))

    def cut(self, half, h, ctx):
        residual = h + half.attn(half.ln_1(h), attention_mask=ctx["mask"])[0]
        return half.act(half.c_fc(half.ln_2(residual))), residual


class Llama(Decoder):
    """Llama: RMSNorm pre-LN, rotary positions (model.rotary_emb), gated MLP (down_proj), GQA."""

    name, model_types, prefix = "Llama", ("llama",), "model"
    classes = ("LlamaModel", "LlamaForSequenceClassification", "LlamaConfig")
    ffn_out, ffn_block = "mlp.down_proj", False
    random_extra = dict(
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=101, eos_token_id=102
    )

    def layers(self, model):
        return model.model.layers

    def embeddings(self, model):
        return {"embed_tokens": model.model.embed_tokens}

    def shared(self, model):
        return {"rotary": model.model.rotary_emb}

    def final(self, model):
        return {"norm": model.model.norm}

    def cut_parts(self, layer):
        return {
            "input_layernorm": layer.input_layernorm, "self_attn": layer.self_attn,
            "post_attention_layernorm": layer.post_attention_layernorm,
            "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj, "act_fn": layer.mlp.act_fn,
        }  # fmt: skip

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        return half.embed_tokens(input_ids)

    def context(self, half, attention_mask, h):
        ctx = super().context(half, attention_mask, h)
        ctx["rotary"] = half.rotary(h, ctx["positions"])
        return ctx

    def run_layer(self, layer, h, ctx):
        out = layer(
            h, attention_mask=ctx["mask"], position_ids=ctx["positions"], position_embeddings=ctx["rotary"]
        )
        return layer_output(out)

    def cut(self, half, h, ctx):
        attn = half.self_attn(
            hidden_states=half.input_layernorm(h), attention_mask=ctx["mask"],
            position_ids=ctx["positions"], position_embeddings=ctx["rotary"],
        )[0]  # fmt: skip
        residual = h + attn
        x = half.post_attention_layernorm(residual)
        return half.act_fn(half.gate_proj(x)) * half.up_proj(x), residual


class Qwen2(Llama):
    """Qwen2: Llama's layout with biased q/k/v projections; sliding-window layers are refused."""

    name, model_types = "Qwen2", ("qwen2",)
    classes = ("Qwen2Model", "Qwen2ForSequenceClassification", "Qwen2Config")

    def refusal(self, config):
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        if sliding or getattr(config, "use_sliding_window", False):
            return "sliding-window attention layers are not supported (use_sliding_window false)"
        return super().refusal(config)


FAMILIES: Tuple[Family, ...] = (Bert(), Roberta(), XlmRoberta(), DistilBert(), Gpt2(), Llama(), Qwen2())


def find_family(model_type: Optional[str]) -> Optional[Family]:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported() -> str:
    """The families and their model types, for refusals: "BERT (bert), RoBERTa (roberta), ..."."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
