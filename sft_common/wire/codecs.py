"""A session's wire: how activations and gradients cross the cut, one object both sides build.

The edge names it with ``--wire-dtype`` (``WIRES``: a name is a pair, activations' dtype and
gradients'), the session config carries it (``wire_dtype``, ``grad_wire_dtype``,
``stochastic_rounding``, ``compression``), and each side's session encodes and decodes through
``Wire`` without asking which it is. A new codec is one dtype in ``codec`` and one row here.

- ``fp32`` / ``fp16`` / ``bf16`` / ``int8`` / ``int4``: the same dtype both ways (int8 and int4
  with one scale per row: a token's values, as activations cross as (tokens, width) rows).
- ``int4-hadamard``, ``int6-hadamard``: activations as 4- or 6-bit codes in rotated groups of 64
  with massive tokens in bf16 (``wire.hadamard``: what a decoder's residual stream needs, issue
  34), gradients as int8 with stochastic rounding (unbiased).
- ``int4-6-hadamard``: 4 bits up the first cut, 6 down the second, in front of the last layers
  and the LM head, where 4 bits cost SmolLM2 2.3 % perplexity at step 0.
- ``int4-6-hadamard-grad4`` (a decoder's U by default): the same activations, the gradients as
  4-bit codes in rotated groups, rounded stochastically, no row sent whole: SmolLM2's second-cut gradient at 269 B a token with
  zstd against int8's 481, at 15 % error a step (int8: 1.6 %; 6 bits: 447 B, so no such wire;
  ``bench.decoder_codecs``, docs/accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec

# --wire-dtype -> (activations up: the first cut; down: the U's second cut; gradients; gradients
# rounded stochastically)
WIRES: Dict[str, Tuple[Any, Any, Any, bool]] = {
    "fp32": (pb.FLOAT32, pb.FLOAT32, pb.FLOAT32, False),
    "fp16": (pb.FLOAT16, pb.FLOAT16, pb.FLOAT16, False),
    "bf16": (pb.BFLOAT16, pb.BFLOAT16, pb.BFLOAT16, False),
    "int8": (pb.INT8, pb.INT8, pb.INT8, False),
    "int4": (pb.INT4, pb.INT4, pb.INT4, False),
    "int4-hadamard": (pb.INT4_HADAMARD, pb.INT4_HADAMARD, pb.INT8, True),
    "int6-hadamard": (pb.INT6_HADAMARD, pb.INT6_HADAMARD, pb.INT8, True),
    "int4-6-hadamard": (pb.INT4_HADAMARD, pb.INT6_HADAMARD, pb.INT8, True),
    # the same activations, the gradients in 4-bit rotated groups too (rounded stochastically)
    "int4-6-hadamard-grad4": (pb.INT4_HADAMARD, pb.INT6_HADAMARD, pb.INT4_HADAMARD, True),
    # 3 bits both ways: forward-only's cheapest (issue 32)
    "int3-hadamard": (pb.INT3_HADAMARD, pb.INT3_HADAMARD, pb.INT8, True),
}


# --compression: a tensor's payload alone (wire.compress), or the whole gRPC stream packed
# (wire.stream), its tensors then raw
STREAM_COMPRESSION = "zstd-stream"
COMPRESSION_NAMES = (*codec.COMPRESSIONS, STREAM_COMPRESSION)


@dataclass(frozen=True)
class Wire:
    """The dtypes of what crosses each way, the gradients' rounding, and the compression (of each
    tensor, or ``packed``: of the stream, ``wire.stream``)."""

    activations: Any = pb.FLOAT32  # a pb.DType value: what the edge sends up (the first cut)
    down: Any = pb.FLOAT32  # the activations the U's middle sends down (the second cut)
    gradients: Any = pb.FLOAT32
    stochastic: bool = False  # gradients in int8 / int4 rounded stochastically
    compression: Any = pb.COMPRESSION_NONE
    packed: bool = False  # the edge asks the cloud to pack the stream (OpenSession.pack_stream)

    @classmethod
    def named(cls, wire_dtype: str, compression: str = "none") -> Wire:
        """The edge's flags (``--wire-dtype``, ``--compression``); KeyError for an unknown name."""
        up, down, gradients, stochastic = WIRES[wire_dtype]
        if compression == STREAM_COMPRESSION:
            return cls(up, down, gradients, stochastic, pb.COMPRESSION_NONE, packed=True)
        return cls(up, down, gradients, stochastic, codec.COMPRESSIONS[compression])

    @classmethod
    def of(cls, config: pb.SessionConfig) -> Wire:
        """What a session config asks for (a config from before ``grad_wire_dtype`` and
        ``down_wire_dtype``: one dtype for everything)."""
        down = config.down_wire_dtype or config.wire_dtype
        gradients = config.grad_wire_dtype or config.wire_dtype
        return cls(config.wire_dtype, down, gradients, config.stochastic_rounding, config.compression)

    def configure(self, config: pb.SessionConfig) -> None:
        """Set this wire's fields on a session config (the edge, at open)."""
        config.wire_dtype, config.down_wire_dtype = self.activations, self.down
        config.grad_wire_dtype, config.stochastic_rounding = self.gradients, self.stochastic
        config.compression = self.compression

    def encode_activations(self, t: torch.Tensor, down: bool = False) -> pb.Tensor:
        """Activations sent up the first cut (``down``: down the U's second cut)."""
        return codec.encode(t, self.down if down else self.activations, self.compression)

    def encode_gradient(self, t: torch.Tensor) -> pb.Tensor:
        """A gradient: no row sent whole in the group codes (``hadamard.quantise``)."""
        return codec.encode(t, self.gradients, self.compression, stochastic=self.stochastic, whole_rows=False)

    def decode_activations(
        self, msg: pb.Tensor, name: str, shape: Sequence[Optional[int]], down: bool = False, **kw: Any
    ) -> torch.Tensor:
        """Activations in this wire's dtype (``down``: the second cut's) of ``shape``; ``kw``:
        ``codec.decode``'s caps and device."""
        dtype = self.down if down else self.activations
        return codec.decode(msg, name=name, dtype=dtype, shape=shape, compression=self.compression, **kw)

    def decode_gradient(
        self, msg: pb.Tensor, name: str, shape: Sequence[Optional[int]], **kw: Any
    ) -> torch.Tensor:
        """A gradient in this wire's dtype of ``shape``; ``kw`` as for ``decode_activations``."""
        return codec.decode(
            msg, name=name, dtype=self.gradients, shape=shape, compression=self.compression, **kw
        )
