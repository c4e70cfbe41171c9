"""Tensors on the wire: raw bytes with dtype and shape, optional lz4, validated before allocation.

``encode`` casts a float tensor to the wire dtype (fp32, fp16 or bf16), scaling fp16 so that
small gradients do not underflow, and optionally lz4-compresses the bytes. ``decode`` checks
the claimed dtype, rank, shape and byte length against what the receiver expects *before* it
allocates anything, rejects NaN/Inf, and returns a float32 tensor. Every refusal raises
``ProtocolError`` with a gRPC status code and a message that says what was wrong.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import grpc
import lz4.block
import torch

from sft_common.errors import ProtocolError
from sft_common.proto import sft_pb2 as pb

WIRE_DTYPES = {
    "fp32": pb.FLOAT32,
    "fp16": pb.FLOAT16,
    "bf16": pb.BFLOAT16,
}
TORCH_DTYPES: Dict[Any, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
}
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "lz4": pb.LZ4}
# fp16 payloads are scaled so their largest magnitude lands here: far from the fp16 maximum
# (65504) and far above its smallest normal (6.1e-5), where gradients would lose precision.
FP16_TARGET_AMAX = 2.0**12


def encode(
    tensor: torch.Tensor, wire_dtype: Any = pb.FLOAT32, compression: Any = pb.COMPRESSION_NONE
) -> pb.Tensor:
    """A float tensor -> ``pb.Tensor`` in ``wire_dtype``; fp16 is scaled per tensor."""
    if wire_dtype not in TORCH_DTYPES:
        raise ValueError(f"unsupported wire dtype {wire_dtype}")
    t = tensor.detach()
    scale = 0.0
    if wire_dtype == pb.FLOAT16 and t.numel():
        amax = float(t.abs().max())
        if amax > 0 and math.isfinite(amax):
            scale = 2.0 ** math.floor(math.log2(FP16_TARGET_AMAX / amax))  # a power of two: exact
            t = t * scale
    t = t.to(device="cpu", dtype=TORCH_DTYPES[wire_dtype]).contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    if compression == pb.LZ4:
        data = lz4.block.compress(data, store_size=False)
    return pb.Tensor(dtype=wire_dtype, shape=list(t.shape), data=data, compression=compression, scale=scale)


def decode(
    msg: pb.Tensor,
    *,
    name: str,
    dtype: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    compression: Optional[int] = None,
    max_bytes: int = 1 << 30,
    device: str = "cpu",
) -> torch.Tensor:
    """``pb.Tensor`` -> float32 tensor, after checking it against what the receiver expects.

    ``shape`` gives the expected rank and, where not None, each dimension. ``max_bytes`` caps
    the decoded size; it is checked from the claimed shape before any allocation.
    """

    def refuse(what: str) -> ProtocolError:
        return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {what}")

    if msg.dtype not in TORCH_DTYPES:
        raise refuse(f"unknown dtype {msg.dtype}")
    if dtype is not None and msg.dtype != dtype:
        raise refuse(f"dtype {pb.DType.Name(msg.dtype)}, the session uses {pb.DType.Name(dtype)}")
    if msg.compression not in (pb.COMPRESSION_NONE, pb.LZ4):
        raise refuse(f"unknown compression {msg.compression}")
    if compression is not None and msg.compression != compression:
        raise refuse(
            f"compression {pb.Compression.Name(msg.compression)}, "
            f"the session uses {pb.Compression.Name(compression)}"
        )
    dims = list(msg.shape)
    if shape is not None:
        if len(dims) != len(shape):
            raise refuse(f"rank {len(dims)} (shape {dims}), expected rank {len(shape)}")
        for i, (got, want) in enumerate(zip(dims, shape)):
            if want is not None and got != want:
                raise refuse(f"shape {dims}: dimension {i} is {got}, expected {want}")
    if any(d < 0 for d in dims):
        raise refuse(f"negative dimension in shape {dims}")
    torch_dtype = TORCH_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    numel = math.prod(dims) if dims else 1
    nbytes = numel * itemsize
    if nbytes > max_bytes:
        raise refuse(f"shape {dims} is {nbytes} bytes, over the limit of {max_bytes}")
    data = msg.data
    if msg.compression == pb.LZ4:
        try:
            data = lz4.block.decompress(data, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError as exc:
            raise refuse(f"lz4 payload does not decompress to {nbytes} bytes ({exc})") from None
    if len(data) != nbytes:
        raise refuse(f"{len(data)} bytes of data, shape {dims} x {itemsize} bytes needs {nbytes}")
    if not math.isfinite(msg.scale) or msg.scale < 0:
        raise refuse(f"invalid scale {msg.scale}")
    if nbytes == 0:
        return torch.zeros(dims, dtype=torch.float32, device=device)
    raw = torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(dims)
    out = raw.to(device=device, dtype=torch.float32)
    if msg.scale:
        out = out / msg.scale
    if not bool(torch.isfinite(out).all()):
        raise refuse("contains NaN or Inf")
    return out
