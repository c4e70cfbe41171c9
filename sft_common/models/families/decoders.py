"""Pre-LN decoder families: GPT-2, Llama, Qwen2 (causal attention, the last real token pooled)."""

from __future__ import annotations

import torch

from sft_common.models.families.base import Family, causal_mask, layer_output


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

    def attend_parts(self, layer):
        return {"ln_1": layer.ln_1, "attn": layer.attn}

    def ffn_in_parts(self, layer):
        return {"ln_2": layer.ln_2, "c_fc": layer.mlp.c_fc, "act": layer.mlp.act}

    def ffn_in_weight(self, layer):
        return layer.mlp.c_fc.weight.t() * layer.ln_2.weight  # Conv1D keeps (in, out)

    def after_ffn(self, layer):
        return layer.mlp.dropout, None

    def ffn_weight(self, linear):
        return linear.weight.t()  # Conv1D keeps (in, out)

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        return half.drop(half.wte(input_ids) + half.wpe(positions))

    def run_layer(self, layer, h, ctx):
        return layer_output(layer(h, attention_mask=ctx["mask"]))

    def attend(self, half, h, ctx):
        return h + half.attn(half.ln_1(h), attention_mask=ctx["mask"])[0]

    def ffn_in(self, parts, r):
        return parts.act(parts.c_fc(parts.ln_2(r)))


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

    def attend_parts(self, layer):
        return {"input_layernorm": layer.input_layernorm, "self_attn": layer.self_attn}

    def ffn_in_parts(self, layer):
        return {
            "post_attention_layernorm": layer.post_attention_layernorm,
            "gate_proj": layer.mlp.gate_proj,
            "up_proj": layer.mlp.up_proj,
            "act_fn": layer.mlp.act_fn,
        }

    def ffn_in_weight(self, layer):
        mlp = layer.mlp  # gate and up both read the normed r: one (2 x intermediate, hidden) input
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * layer.post_attention_layernorm.weight

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

    def attend(self, half, h, ctx):
        attn = half.self_attn(
            hidden_states=half.input_layernorm(h),
            attention_mask=ctx["mask"],
            position_ids=ctx["positions"],
            position_embeddings=ctx["rotary"],
        )[0]
        return h + attn

    def ffn_in(self, parts, r):
        x = parts.post_attention_layernorm(r)
        return parts.act_fn(parts.gate_proj(x)) * parts.up_proj(x)


class Qwen2(Llama):
    """Qwen2: Llama's layout with biased q/k/v projections; sliding-window layers are refused."""

    name, model_types = "Qwen2", ("qwen2",)
    classes = ("Qwen2Model", "Qwen2ForSequenceClassification", "Qwen2Config")

    def refusal(self, config):
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        if sliding or getattr(config, "use_sliding_window", False):
            return "sliding-window attention layers are not supported (use_sliding_window false)"
        return super().refusal(config)
