"""ModernBERT: a pre-LN encoder alternating global and sliding-window attention, with rotary positions."""

from __future__ import annotations

import torch

from sft_common.models.families.base import Family, additive_mask, layer_output


def window_mask(mask: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 0/1 padding mask -> (batch, 1, seq, seq) additive mask of a bidirectional
    sliding window: a query sees the real keys at most ``window`` positions away (itself included,
    so no real query row is all -inf)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    allowed = ((idx[:, None] - idx[None, :]).abs() <= window)[None, None] & mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class ModernBert(Family):
    """ModernBERT. Layers: attn_norm (Identity in layer 0), attn (fused Wqkv, rotary, Wo), mlp_norm,
    mlp (Wi -> input and gate halves, act(input) * gate, drop, Wo); every ``global_attn_every_n_layers``
    -th layer attends globally, the others within ``local_attention // 2`` positions either side,
    each type with its own rotary frequencies (``model.rotary_emb``, held by both halves). Run
    padded, with additive masks through the eager/SDPA attention (never the unpadded flash path:
    the cut needs (batch, seq) activations). final_norm, then the head pools per
    ``classifier_pooling`` ([CLS] or the mean over real tokens): head (dense, act, norm), drop,
    classifier. No token types. transformers 5.1+: in 4.48-5.0 these layers took other arguments
    (a separate sliding-window mask, the unpadded path's cu_seqlens)."""

    name, model_types, prefix = "ModernBERT", ("modernbert",), "model"
    classes = ("ModernBertModel", "ModernBertForSequenceClassification", "ModernBertConfig")
    ffn_out, ffn_block, since = "mlp.Wo", False, (5, 1)
    head_new = ("head.", "classifier.")
    # Alternating global and local (2 positions either side) layers; BERT's dropout of 0.1
    # everywhere (ModernBERT's default is none) so the equivalence tests see seeded masks.
    random_extra = dict(
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
        cls_token_id=101,
        sep_token_id=102,
        global_attn_every_n_layers=2,
        local_attention=4,
        embedding_dropout=0.1,
        attention_dropout=0.1,
        mlp_dropout=0.1,
        classifier_dropout=0.1,
    )
    shaping = (
        "layer_types",
        "local_attention",
        "norm_eps",
        "norm_bias",
        "hidden_activation",
        "classifier_pooling",
        "classifier_activation",
        "classifier_bias",
    )

    def layers(self, model):
        return model.model.layers

    def embeddings(self, model):
        return {"embeddings": model.model.embeddings}

    def shared(self, model):
        return {"rotary": model.model.rotary_emb}

    def final(self, model):
        return {"norm": model.model.final_norm}

    def head(self, model):
        return {"head": model.head, "drop": model.drop, "classifier": model.classifier}

    def attend_parts(self, layer):
        return {"attn_norm": layer.attn_norm, "attn": layer.attn}

    def ffn_in_parts(self, layer):
        mlp = layer.mlp
        return {"mlp_norm": layer.mlp_norm, "Wi": mlp.Wi, "act": mlp.act, "mlp_drop": mlp.drop}

    def ffn_in_weight(self, layer):
        return layer.mlp.Wi.weight * layer.mlp_norm.weight  # input and gate halves, both from r

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        return half.embeddings(input_ids=input_ids)

    def context(self, half, attention_mask, h):
        """Per layer type: its mask (global: padding only; sliding: padding and the window) and
        its rotary (cos, sin) for positions 0..seq-1."""
        config, positions = half.rotary.config, torch.arange(h.shape[1], device=h.device)[None, :]
        masks = {
            "full_attention": additive_mask(attention_mask, h.dtype),
            "sliding_attention": window_mask(attention_mask, config.local_attention // 2, h.dtype),
        }
        rotary = {kind: half.rotary(h, positions, kind) for kind in set(config.layer_types)}
        return {"masks": masks, "rotary": rotary}

    def run_layer(self, layer, h, ctx):
        kind = layer.attention_type
        out = layer(h, attention_mask=ctx["masks"][kind], position_embeddings=ctx["rotary"][kind])
        return layer_output(out)

    def attend(self, half, h, ctx):
        kind = half.attn.config.layer_types[half.attn.layer_idx]
        attn = half.attn(
            half.attn_norm(h), position_embeddings=ctx["rotary"][kind], attention_mask=ctx["masks"][kind]
        )[0]
        return h + attn

    def ffn_in(self, parts, r):
        x, gate = parts.Wi(parts.mlp_norm(r)).chunk(2, dim=-1)
        return parts.mlp_drop(parts.act(x) * gate)

    def pool(self, half, h, attention_mask):
        h = half.norm(h)
        if half.head.config.classifier_pooling == "mean":
            mask = attention_mask[..., None].to(h.dtype)
            pooled = (h * mask).sum(dim=1) / mask.sum(dim=1)
        else:
            pooled = h[:, 0]
        return half.classifier(half.drop(half.head(pooled)))
