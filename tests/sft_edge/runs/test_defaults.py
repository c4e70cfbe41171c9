"""The cut and wire a run gets when it names none: full width through int4-6-hadamard-grad4 for a decoder's U,
int4-hadamard for a decoder's forward-only run."""

from __future__ import annotations

import pytest

from sft_common.models.base_model import load_base_model
from sft_edge.runs.config import TrainConfig
from sft_edge.runs.defaults import resolved


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(train_file="x.jsonl", **kw)


@pytest.mark.parametrize(
    "model, flags, want",
    [
        ("random:tiny-llama", {"label_private": True}, ("sl", "int4-6-hadamard-grad4")),
        ("random:tiny-gpt2", {"label_private": True}, ("sl", "int4-6-hadamard-grad4")),
        ("random:tiny", {"label_private": True}, ("sft", "fp32")),  # an encoder: the paper's cut
        ("random:tiny-llama", {}, ("sft", "fp32")),  # the two-part split of a decoder
        ("random:tiny-llama", {"label_private": True, "mode": "sft"}, ("sft", "fp32")),
        ("random:tiny-llama", {"label_private": True, "wire_dtype": "int8"}, ("sl", "int8")),
        ("random:tiny-llama", {"label_private": True, "factorise": "ffn-input"}, ("sft", "fp32")),
        ("random:tiny-llama", {"label_private": True, "factor_lr": 1e-3}, ("sft", "fp32")),
        ("random:tiny", {"mode": "sl"}, ("sl", "fp32")),
        (
            "random:tiny-llama",
            {"forward_only": True},
            ("sl", "int4-hadamard"),
        ),  # 4 bits down: cached, trained on
        ("random:tiny-gpt2", {"forward_only": True}, ("sl", "int4-hadamard")),
        (
            "random:tiny-llama",
            {"forward_only": True, "wire_dtype": "int4-6-hadamard"},
            ("sl", "int4-6-hadamard"),
        ),
        ("random:tiny", {"forward_only": True}, ("sl", "int8")),  # full width, a quarter of fp32
        ("random:tiny", {"forward_only": True, "wire_dtype": "fp32"}, ("sl", "fp32")),
    ],
)
def test_defaults_per_kind_and_model(model, flags, want):
    cfg = _cfg(**flags)
    got = resolved(cfg, load_base_model(model))
    assert (got.mode, got.wire_dtype) == want
    assert cfg.mode == flags.get("mode") and cfg.wire_dtype == flags.get("wire_dtype")  # not changed


@pytest.mark.parametrize(
    "model, flags, want",
    [
        (
            "random:tiny-llama",
            {"label_private": True},
            "zstd-stream",
        ),  # a rotated-group wire: zstd takes a third off, packing the stream more
        ("random:tiny-llama", {"forward_only": True}, "zstd-stream"),
        ("random:tiny-llama", {"label_private": True, "wire_dtype": "int4-hadamard"}, "zstd-stream"),
        ("random:tiny-llama", {"label_private": True, "wire_dtype": "int4-6-hadamard-grad4"}, "zstd-stream"),
        ("random:tiny-llama", {"forward_only": True, "compression": "zstd"}, "zstd"),
        ("random:tiny-llama", {"label_private": True, "compression": "lz4"}, "lz4"),  # a flag is kept
        ("random:tiny-llama", {"label_private": True, "compression": "none"}, "none"),
        ("random:tiny-llama", {"label_private": True, "wire_dtype": "int8"}, "none"),
        ("random:tiny", {}, "none"),  # the paper's cut in fp32
        ("random:tiny", {"forward_only": True}, "none"),  # int8
    ],
)
def test_compression_follows_the_wire(model, flags, want):
    cfg = _cfg(**flags)
    assert resolved(cfg, load_base_model(model)).compression == want
    assert cfg.compression == flags.get("compression")  # not changed


def test_a_factor_flag_with_the_full_width_is_refused():
    with pytest.raises(ValueError, match="--factorise ffn-input needs --mode sft"):
        _cfg(label_private=True, mode="sl", factorise="ffn-input", problem="causal-lm").validate()
