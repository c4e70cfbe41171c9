"""A model to use once training ends: ``load_trained(DIR)`` and its ``predict(texts)``.

``DIR`` is a folder ``sft-edge export`` wrote (both halves of a split run, or the three parts
of a U-shaped one) or the ``--output-dir`` of a ``--local`` run (the whole model): each holds
``sft_edge.json`` (what was trained, the label names), ``config.json``, the tokenizer and
safetensors weights, and predicts with no daemon (a causal LM's generates: ``sft_edge.finished.generate``). A split run's own ``--output-dir`` holds only net1: it predicts through the
daemon that keeps net2 (``sft_edge.finished.predict``).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file
from torch import nn

from sft_common.storage.checkpoint import load_owned
from sft_common.topology.spec import FFN_OUTPUT, SplitSpec
from sft_edge.data.glue import DataError, Example, collate, encode

RUN_FILE = "sft_edge.json"
Text = Union[str, Sequence[str]]  # one text, or a sentence pair


def read_run(folder: str) -> Dict:
    """What ``sft_edge.json`` in ``folder`` says about the trained model."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{folder}: no {RUN_FILE}; give a training run's --output-dir or a folder `sft-edge export` wrote"
        )
    with open(path) as f:
        return json.load(f)


class TrainedModel(nn.Module):
    """Texts in, predictions out: the label name (or the value, for regression) and each
    class's probability. ``logits`` maps a batch to (batch, num_labels)."""

    def __init__(
        self, info: Dict, tokenizer, logits: Callable, module: Optional[nn.Module] = None, device: str = "cpu"
    ):
        super().__init__()
        self.info, self.tokenizer, self.logits, self.device = info, tokenizer, logits, device
        self.model = module  # registered, so .to() and .parameters() reach the weights
        self.labels: Optional[List[str]] = info.get("labels")
        self.columns: List[str] = list(info.get("text_columns") or ["text"])

    @torch.no_grad()
    def predict(self, texts: Sequence[Text], batch_size: int = 32) -> List[Dict]:
        """One ``{"prediction": ..., "probabilities": {label: p}}`` per text (or text pair)."""
        examples = [Example((t,) if isinstance(t, str) else tuple(t), 0) for t in texts]
        if not examples:
            return []
        data = encode(examples, self.tokenizer, int(self.info.get("max_seq_len", 128)))
        out: List[Dict] = []
        for k, start in enumerate(range(0, len(data), batch_size)):
            idx = list(range(start, min(start + batch_size, len(data))))
            logits = self.logits(collate(data, idx).to(self.device), k).float().cpu()
            out.extend(self._rows(logits))
        return out

    def _rows(self, logits: torch.Tensor) -> List[Dict]:
        if self.labels is None:
            return [{"prediction": float(v)} for v in logits[:, 0]]
        probs = torch.softmax(logits, dim=-1)
        return [
            {
                "prediction": self.labels[int(p.argmax())],
                "probabilities": {name: float(p[i]) for i, name in enumerate(self.labels)},
            }
            for p in probs
        ]


def load_trained(folder: str, device: str = "cpu") -> TrainedModel:
    """The model in ``folder`` (an export, or a ``--local`` run), ready to ``predict``."""
    from transformers import AutoConfig, AutoTokenizer

    from sft_common.topology.two_part import trained_skeleton

    info = read_run(folder)
    if info.get("part") == "edge":
        raise DataError(
            f"{folder} holds only the edge half of a split run: predict through the daemon "
            "(sft-edge predict --run DIR --cloud HOST:PORT), or `sft-edge export` it first"
        )
    if info.get("problem") == "causal-lm":
        raise DataError(f"{folder} holds a causal LM: it generates text (sft-edge generate --run DIR)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if info["part"] == "ushape":  # the U's three parts, run one after the other here
        head, middle, tail = load_ushape(folder, info, device)

        def through(batch, index):
            cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

        parts = nn.ModuleDict({"head": head, "middle": middle, "tail": tail})
        return TrainedModel(info, tokenizer, through, parts, device)
    config = AutoConfig.from_pretrained(folder)
    num_labels = int(info["num_labels"])
    spec = None
    if info["part"] != "full":
        factorise = info.get("factorise") or FFN_OUTPUT  # runs from before --factorise: the output
        spec = SplitSpec(int(info["split_layer"]), int(info["rank"] or 1), info["mode"], factorise=factorise)
    if info.get("lora"):  # the weights hold the adapters, factors and head: the base by name
        built = _with_lora(info, spec, num_labels, device)
    else:
        built = trained_skeleton(config, spec, num_labels, device)
    weights = [load_file(os.path.join(folder, name), device=device) for name in _weight_files(info)]
    for module, state in zip(built if isinstance(built, tuple) else (built,), weights):
        load_owned(module, state)
    if isinstance(built, nn.Module):
        model = built.eval()

        from sft_common.models.base_model import family_of
        from sft_common.models.families import Decoder

        types = not isinstance(family_of(config), Decoder)  # GPT-2 would add token-type embeddings

        def full(batch, index):
            extra = {"token_type_ids": batch.token_type_ids} if types else {}
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra).logits

        return TrainedModel(info, tokenizer, full, model, device)
    edge, cloud = built
    halves = nn.ModuleDict({"edge": edge, "cloud": cloud}).eval()

    def split(batch, index):
        cut, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return cloud(cut, batch.attention_mask)

    return TrainedModel(info, tokenizer, split, halves, device)


def load_ushape(folder: str, info: Dict, device: str = "cpu") -> Tuple[nn.Module, nn.Module, nn.Module]:
    """The head, middle and tail of an exported U-shaped run (``part`` "ushape"), loaded and in
    eval mode: built from the config alone, or, under LoRA, from the base model by name with the
    run's adapters on each part the way training put them. A causal LM's tail ends in its LM head
    (``num_labels`` 0). The SFT cuts stay factorised (see ``sft_edge.finished.predict.export``)."""
    from transformers import AutoConfig

    from sft_common.topology.ushape import UShapeSpec, build_ushape_model, lora_part
    from sft_common.topology.ushape_lm import build_ushape_lm_model, trained_ushape

    spec = UShapeSpec(
        int(info["split_layer"]), int(info["rank"]), int(info["tail_layers"]), info["mode"],
        factorise=info.get("factorise") or FFN_OUTPUT,  # runs from before --factorise: the output
    )  # fmt: skip
    num_labels, seed = int(info["num_labels"]), int(info["seed"])
    parts: Tuple[nn.Module, nn.Module, nn.Module]
    if info.get("lora"):
        from sft_common.models.lora import LoraSpec

        base, lora = base_of(info), LoraSpec.from_dict(info["lora"])
        if num_labels:
            parts = build_ushape_model(base, spec, num_labels, seed, device)
        else:
            parts = build_ushape_lm_model(base, spec, seed, device)
        for which, part in zip(("head", "middle", "tail"), parts):
            lora_part(part, which, lora, seed)
    else:
        parts = trained_ushape(AutoConfig.from_pretrained(folder), spec, num_labels, device)
    head, middle, tail = parts
    edge, cloud = (load_file(os.path.join(folder, name), device=device) for name in _weight_files(info))
    load_owned(nn.ModuleDict({"head": head, "tail": tail}), edge)  # as the edge saved them
    load_owned(middle, cloud)  # as the daemon saved its middle
    for part in parts:
        part.eval()
    return head, middle, tail


def _weight_files(info: Dict) -> List[str]:
    return ["model.safetensors"] if info["part"] == "full" else ["edge.safetensors", "cloud.safetensors"]


def base_of(info: Dict):
    """The pretrained model a run names, checked to be the one it was trained from (its LoRA
    weights need that base)."""
    from sft_common.models.base_model import load_base_model

    base = load_base_model(info["model"])
    if info.get("base_fingerprint") not in (None, base.fingerprint):
        raise DataError(
            f"{info['model']} here is not the model this run was trained from (fingerprint "
            f"{base.fingerprint[:12]}, the run's {str(info['base_fingerprint'])[:12]}): its LoRA weights need that base"
        )
    return base


def _with_lora(info: Dict, spec: Optional[SplitSpec], num_labels: int, device: str):
    """The pretrained model by name (its fingerprint checked against the run's) with the run's
    adapters on it, the way training built it: the whole model, or both halves."""
    from sft_common.models.lora import LoraSpec, lora_on_halves, lora_on_model
    from sft_common.topology.two_part import build_full_model, build_split_model

    base = base_of(info)
    lora, seed = LoraSpec.from_dict(info["lora"]), int(info["seed"])
    if spec is None:
        model = build_full_model(base, num_labels, seed, device=device)
        lora_on_model(model, lora, seed)
        return model
    edge, cloud = build_split_model(base, spec, num_labels, seed, device=device)
    lora_on_halves(edge, cloud, lora, seed)
    return edge, cloud
