"""Post-LN encoder families: BERT (MiniLM), RoBERTa, XLM-R, DistilBERT."""

from __future__ import annotations

import torch

from sft_common.models.families.base import Family


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

    def attend_parts(self, layer):
        return {"attention": layer.attention, "sa_layer_norm": layer.sa_layer_norm}

    def ffn_in_parts(self, layer):
        return {"lin1": layer.ffn.lin1, "activation": layer.ffn.activation}

    def ffn_in_weight(self, layer):
        return layer.ffn.lin1.weight

    def after_ffn(self, layer):
        return layer.ffn.dropout, layer.output_layer_norm

    def embed(self, half, input_ids, attention_mask, token_type_ids):
        return half.embeddings(input_ids)

    def attend(self, half, h, ctx):
        return half.sa_layer_norm(half.attention(h, attention_mask=ctx["mask"])[0] + h)

    def ffn_in(self, parts, r):
        return parts.activation(parts.lin1(r))

    def pool(self, half, h, attention_mask):
        return half.classifier(half.dropout(torch.relu(half.pre_classifier(h[:, 0]))))
