"""DeBERTa-v2 and v3: BERT's post-LN layout with disentangled relative-position attention."""

from __future__ import annotations

import torch

from sft_common.models.families.base import Family, layer_output


class DebertaV2(Family):
    """DeBERTa-v2/v3. Every layer's attention reads the encoder's relative-position embeddings
    (``rel_embeddings``, normed by the encoder's LayerNorm where ``norm_rel_ebd`` says so), which
    both halves hold: each trains its own copy (tying them would put their gradient on the
    wire). Relative positions depend on the sequence length alone, so each layer builds them as
    the encoder would; the embeddings zero padded positions; head ContextPooler (dropout, dense,
    act on [CLS]), dropout, classifier. The convolution of xlarge/xxlarge after layer 0 is
    refused. transformers 4.47+ (run on 4.47.0 and 5.24); older releases are refused by name."""

    name, model_types, prefix = "DeBERTa-v2", ("deberta-v2",), "deberta"
    classes = ("DebertaV2Model", "DebertaV2ForSequenceClassification", "DebertaV2Config")
    head_new, since = ("pooler.", "classifier."), (4, 47)  # before: StableDropout, XSoftmax
    # As DeBERTa-v3 (no absolute positions, no token types, shared attention keys, normed relative
    # embeddings), with 8 position buckets so that a 16-token test reaches the log buckets.
    random_extra = dict(
        relative_attention=True,
        position_buckets=8,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
    )
    shaping = (
        "relative_attention",
        "position_buckets",
        "max_relative_positions",
        "pos_att_type",
        "share_att_key",
        "norm_rel_ebd",
        "position_biased_input",
        "embedding_size",
        "attention_head_size",
        "pooler_hidden_size",
        "pooler_hidden_act",
        "conv_kernel_size",
    )

    def refusal(self, config):
        if getattr(config, "conv_kernel_size", 0) > 0:
            return (
                "the convolution after layer 0 (conv_kernel_size > 0, as in DeBERTa-v2 xlarge and "
                "xxlarge) is not supported"
            )
        return super().refusal(config)

    def shared(self, model):
        encoder, out = model.deberta.encoder, {}
        if encoder.relative_attention:
            out["rel_embeddings"] = encoder.rel_embeddings
            if "layer_norm" in encoder.norm_rel_ebd:
                out["rel_norm"] = encoder.LayerNorm
        return out

    def head(self, model):
        return {"pooler": model.pooler, "dropout": model.dropout, "classifier": model.classifier}

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        return half.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)

    def context(self, half, attention_mask, h):
        """The encoder's (batch, 1, seq, seq) mask (1 where query and key are both real tokens)
        and its relative-position embeddings (``DebertaV2Encoder.get_rel_embedding``)."""
        mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
        rel = getattr(half, "rel_embeddings", None)
        if rel is not None:
            rel = rel.weight
            norm = getattr(half, "rel_norm", None)
            rel = rel if norm is None else norm(rel)
        return {"mask": mask, "rel": rel}

    def run_layer(self, layer, h, ctx):
        return layer_output(layer(h, ctx["mask"], rel_embeddings=ctx["rel"]))

    def attend(self, half, h, ctx):
        return layer_output(half.attention(h, ctx["mask"], rel_embeddings=ctx["rel"]))

    def pool(self, half, h: torch.Tensor, attention_mask):
        return half.classifier(half.dropout(half.pooler(h)))
