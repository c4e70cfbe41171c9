"""The cut and the wire a run gets when it does not name them: per run kind and model, measured.

``--mode`` and ``--wire-dtype`` default to None, resolved here once the model is known:

- **The U on a decoder** (``--label-private`` with GPT-2, Llama, Qwen2): full-width cuts
  (``--mode sl``) with ``--wire-dtype int4-6-hadamard-grad4``. A rank-R cut drops a pre-LN decoder's
  residual stream: SmolLM2's step-0 dev perplexity is 3.1e10 at R=8 against the unsplit 8.35,
  while the full width in rotated groups, 4 bits up the first cut and 6 down the second, starts
  within 1 % of it at 5-7.5x fewer activation bytes than fp32; the gradients in 4-bit rotated
  groups (stochastic) end 80 steps at 4.794 against int8 gradients' 4.791 (``--local`` 4.833) for
  a quarter fewer bytes up and a fifth fewer down: the cheapest point of the decoder frontier
  within 2 % of ``--local`` (docs/accuracy.md, "A codec for decoders").
- **Forward-only** (``--forward-only``): full width always (its head is frozen, so a rank-R cut
  would lose what the head computes for good). On a decoder ``int4-hadamard``, 4 bits both ways:
  the middle's answer is computed once and cached, and the tail trains on what it decodes, so the
  second cut's 4-bit rounding (+2.0 % at step 0, where the U needs 6 bits down) costs SmolLM2 with 8
  LoRA tail layers 4.99 against int4-6-hadamard's 4.95 after 80 steps (+0.8 %, one seed) for 36 %
  fewer bytes down and 25 % fewer in all (README, "Forward-only"). On an encoder int8 (MiniLM on
  SST-2, two tail layers, 200 steps: 73.62 against fp32's 73.39, a quarter of the bytes;
  docs/accuracy.md, "Forward-only on SST-2").
- **Everything else** (encoders; the two-part split, where SmolLM2 at R=8 classified as
  ``--local`` did in docs/accuracy.md's tables): the paper's rank-R cut (``--mode sft``) in fp32.

``--compression`` defaults to zstd-stream with a rotated-group wire (``*-hadamard*``: the decoder
U's and a decoder's forward-only defaults): its codes are not uniform, and zstd takes a third off
them (SmolLM2's first cut at 4 bits: 306 B a token raw, 269 with lz4, 206 with zstd; docs/accuracy.md,
"A codec for decoders"), and packing the stream (``sft_common.wire.stream``) takes another 7 % off
the U's bytes and 11 % off forward-only's, losslessly (SmolLM2, 64 rows x 3 epochs:
bench/results/forward_only_smollm2_packed*.json), for 3.7 MiB a stream on each side. Elsewhere none.

A flag given is kept; asking for a factorisation (``--factorise ffn-input``, ``--factor-lr``)
implies ``--mode sft``. The resolved values are what the report, the record and the session say.
"""

from __future__ import annotations

import dataclasses

from sft_common.models.base_model import BaseModel
from sft_common.topology.spec import FFN_INPUT
from sft_edge.runs.config import TrainConfig

DECODER_U_MODE, DECODER_U_WIRE = "sl", "int4-6-hadamard-grad4"
GROUP_CODES_COMPRESSION, PLAIN_COMPRESSION = "zstd-stream", "none"
PAPER_MODE, PLAIN_WIRE = "sft", "fp32"
FORWARD_ENCODER_WIRE, FORWARD_DECODER_WIRE = "int8", "int4-hadamard"


def asks_for_factors(cfg: TrainConfig) -> bool:
    """Flags that only a factorised cut takes."""
    return cfg.factorise == FFN_INPUT or cfg.factor_lr is not None


def resolved(cfg: TrainConfig, base: BaseModel) -> TrainConfig:
    """``cfg`` with ``mode``, ``wire_dtype`` and ``compression`` set (module docstring); unchanged
    if all three are set."""
    if cfg.mode is not None and cfg.wire_dtype is not None and cfg.compression is not None:
        return cfg
    u_shaped = cfg.label_private or cfg.forward_only
    decoder_u = u_shaped and base.family.decoder and not asks_for_factors(cfg)
    mode = cfg.mode or (DECODER_U_MODE if decoder_u or cfg.forward_only else PAPER_MODE)
    wire = cfg.wire_dtype or (DECODER_U_WIRE if decoder_u and mode == DECODER_U_MODE else PLAIN_WIRE)
    if cfg.forward_only and cfg.wire_dtype is None:
        wire = FORWARD_DECODER_WIRE if decoder_u else FORWARD_ENCODER_WIRE
    grouped = "-hadamard" in wire  # codes in rotated groups: zstd takes a third off, packing more
    compression = cfg.compression or (GROUP_CODES_COMPRESSION if grouped else PLAIN_COMPRESSION)
    return dataclasses.replace(cfg, mode=mode, wire_dtype=wire, compression=compression)
