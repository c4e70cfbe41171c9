"""Tensors on the wire: raw bytes with dtype and shape, optional lz4 / zstd, validated before allocation.

``encode`` casts a float tensor to the wire dtype (fp32, fp16, bf16, int8, packed int4, or int4
in rotated groups: ``wire.hadamard``), scaling fp16 so that small gradients do not underflow and
int8 / int4 per row (rounded to nearest, or stochastically: unbiased, for gradients), and
optionally compresses the bytes where that shrinks them (``wire.compress``). ``decode`` checks the claimed dtype, rank,
shape, byte length and row scales against what the receiver expects *before* it allocates
anything, rejects NaN/Inf, and returns a float32 tensor. Every refusal raises
``ProtocolError`` with a gRPC status code and a message that says what was wrong.

The tensor path makes as few copies as protobuf allows: one cast into the wire dtype (fused
with the fp16 scaling), one ``tobytes`` (protobuf needs a ``bytes`` object) on the way out; on
the way in the tensor is built directly over the bytes protobuf hands out (a fresh object that
nothing else references) and the cast back to float32 is the only copy.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import torch

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import hadamard
from sft_common.wire.compress import COMPRESSIONS, compress, decompress
from sft_common.wire.compress import SUPPORTED as SUPPORTED_COMPRESSIONS
from sft_common.wire.errors import ProtocolError

__all__ = ["COMPRESSIONS", "SUPPORTED_WIRE_DTYPES", "WIRE_DTYPES", "decode", "encode"]

WIRE_DTYPES = {
    "fp32": pb.FLOAT32,
    "fp16": pb.FLOAT16,
    "bf16": pb.BFLOAT16,
    "int8": pb.INT8,
    "int4": pb.INT4,
    "int4-hadamard": pb.INT4_HADAMARD,
    "int6-hadamard": pb.INT6_HADAMARD,
    "int8-hadamard": pb.INT8_HADAMARD,
    "int2-hadamard": pb.INT2_HADAMARD,  # for delta mode's deltas (wire.delta)
    "int3-hadamard": pb.INT3_HADAMARD,
}
HADAMARD_BITS = {getattr(pb, f"INT{bits}_HADAMARD"): bits for bits in hadamard.BITS}  # wire.hadamard's codes
# Every dtype this codec encodes and decodes: what a session may ask for (sft_cloud checks it).
SUPPORTED_WIRE_DTYPES = frozenset(WIRE_DTYPES.values())
ROW_SCALED = (pb.INT8, pb.INT4)  # one float32 scale per row of dim 0 (``Tensor.scales``)
# The dtypes that are a torch element type on the wire (INT4 is packed: two values a byte).
TORCH_DTYPES: Dict[Any, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT8: torch.int8,
}
# fp16 payloads are scaled so their largest magnitude lands here: far from the fp16 maximum
# (65504) and far above its smallest normal (6.1e-5), where gradients would lose precision.
FP16_TARGET_AMAX = 2.0**12
INT8_MAX = 127  # symmetric: -127..127, so that q * scale is odd-symmetric around zero
INT4_MAX = 7  # symmetric: -7..7; nibble = q + 8, so a 0 nibble (-8) is never valid
INT4_ZERO = 8  # the nibble of q = 0, also the padding nibble of an odd-length row


def _rows(shape: Sequence[int]) -> int:
    """How many int8 scales a tensor of ``shape`` carries: one per row of dim 0 (rank >= 2)."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _int4_layout(shape: Sequence[int]) -> Tuple[int, int, int]:
    """(rows, values a row, bytes a row) of an INT4 tensor: each row padded to a whole byte."""
    rows = _rows(shape)
    row_len = math.prod(shape[1:] if len(shape) >= 2 else shape)  # 1 for a scalar
    return rows, row_len, (row_len + 1) // 2


def _quantize_int8(t: torch.Tensor, stochastic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """float -> (int8 values, one float32 scale per row): rounded (``hadamard.rounded``), |q| <= 127."""
    rows = t.reshape(_rows(t.shape), -1).float()
    amax = rows.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, INT8_MAX / amax, torch.zeros_like(amax))  # all-zero rows stay zero
    q = hadamard.rounded(rows.mul(inv), stochastic).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(t.shape), (amax / INT8_MAX).reshape(-1)


def _quantize_int4(t: torch.Tensor, stochastic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """float -> (packed bytes, shape (rows, ceil(row_len / 2)), one float32 scale per row).

    Round to nearest, |q| <= 7, nibble q + 8, low nibble first. A row holding NaN or Inf gets a
    non-finite scale (as int8 does), which every decoder refuses; its nibbles are 8, so the
    message is well defined.
    """
    rows, row_len, row_bytes = _int4_layout(t.shape)
    x = t.reshape(rows, row_len).float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, INT4_MAX / amax, torch.zeros_like(amax))  # all-zero rows stay zero
    q = hadamard.rounded(x.mul(inv), stochastic).clamp_(-INT4_MAX, INT4_MAX).nan_to_num_(0.0).add_(INT4_ZERO)
    nibbles = torch.full((rows, 2 * row_bytes), INT4_ZERO, dtype=torch.uint8, device=t.device)
    nibbles[:, :row_len] = q  # 1..15, exact in float
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed, (amax / INT4_MAX).reshape(-1)


def encode(
    tensor: torch.Tensor,
    wire_dtype: Any = pb.FLOAT32,
    compression: Any = pb.COMPRESSION_NONE,
    stochastic: bool = False,
    whole_rows: bool = True,
) -> pb.Tensor:
    """A float tensor -> ``pb.Tensor`` in ``wire_dtype``; fp16 is scaled per tensor, int8 and
    int4 per row, INT4/6/8_HADAMARD per group of a row (``stochastic``: rounded stochastically;
    ``whole_rows``: the HADAMARD dtypes' massive rows sent whole in bf16, ``hadamard.quantise``).

    With a compression the payload is compressed only where that makes it smaller; a tensor that
    does not shrink (dense fp16, say) travels raw and says COMPRESSION_NONE.
    """
    if wire_dtype not in SUPPORTED_WIRE_DTYPES:
        raise ValueError(f"unsupported wire dtype {wire_dtype}")
    if compression not in SUPPORTED_COMPRESSIONS:
        raise ValueError(f"unsupported compression {compression}")
    t = tensor.detach()
    msg = pb.Tensor(dtype=wire_dtype, shape=list(t.shape))
    if wire_dtype in HADAMARD_BITS:
        data = _encode_hadamard(t, msg, stochastic, whole_rows)
    elif wire_dtype in ROW_SCALED:
        data = _encode_row_scaled(t, msg, stochastic)
    elif wire_dtype == pb.FLOAT16 and t.numel():
        data = _encode_fp16(t, msg)
    else:
        data = _bytes(t.to(device="cpu", dtype=TORCH_DTYPES[wire_dtype]))
    msg.data, msg.compression = compress(data, compression)
    return msg


def _bytes(t: torch.Tensor) -> bytes:
    """A CPU tensor's raw bytes (one copy: protobuf needs a ``bytes`` object)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _encode_row_scaled(t: torch.Tensor, msg: pb.Tensor, stochastic: bool) -> bytes:
    """INT8 / INT4: the codes, their row scales set on ``msg``."""
    if not t.numel():
        msg.scales.extend([0.0] * _rows(t.shape))
        return b""
    quantize = _quantize_int4 if msg.dtype == pb.INT4 else _quantize_int8
    codes, row_scales = quantize(t, stochastic)
    msg.scales.extend(row_scales.tolist())
    return _bytes(codes.cpu())


def _encode_fp16(t: torch.Tensor, msg: pb.Tensor) -> bytes:
    """FLOAT16 scaled by a power of two so its largest magnitude lands at ``FP16_TARGET_AMAX``."""
    lo, hi = torch.aminmax(t)  # no |t| temporary
    amax = max(-float(lo), float(hi))
    out = torch.empty(t.shape, dtype=torch.float16, device=t.device)
    if amax > 0 and math.isfinite(amax):
        msg.scale = 2.0 ** math.floor(math.log2(FP16_TARGET_AMAX / amax))  # a power of two: exact
        torch.mul(t, msg.scale, out=out)  # scale and cast in one pass, no float32 temporary
    else:
        out.copy_(t)
    return _bytes(out.cpu())


def _encode_hadamard(t: torch.Tensor, msg: pb.Tensor, stochastic: bool, whole_rows: bool) -> bytes:
    """INT4/6/8_HADAMARD (``wire.hadamard``): the packed codes; group, scales and outliers on ``msg``."""
    rows, row_len, _ = _int4_layout(t.shape)
    if not t.numel():
        msg.group = hadamard.group_for(row_len)
        return b""
    group, scale, codes, scales, outliers, whole = hadamard.quantise(
        t.reshape(rows, row_len), HADAMARD_BITS[msg.dtype], stochastic, whole_rows
    )
    msg.group, msg.scale, msg.group_scales, msg.outliers = group, scale, scales, whole
    msg.outlier_rows.extend(outliers)
    return codes


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
    the payload's size in the wire dtype (INT4: the packed bytes); it is checked from the
    claimed shape before any allocation, as are INT8 / INT4's row scales. A session
    that compresses also accepts uncompressed tensors (the sender skips it where it does not help).
    """
    refuse = _Refusal(name)
    _check_encoding(msg, dtype, compression, refuse)
    dims = _checked_dims(msg, shape, refuse)
    if msg.dtype in HADAMARD_BITS:
        return _hadamard_values(msg, dims, max_bytes, refuse).to(device)
    nbytes, need = _payload_size(msg.dtype, dims, max_bytes, refuse)
    row_scales = _checked_scales(msg, dims, refuse)  # as many as rows: bounded by the size check
    data = _payload(msg, nbytes, need, refuse)
    if nbytes == 0:
        return torch.zeros(dims, dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        # ``bytes`` is read-only to the buffer protocol. This one is ours alone (see _payload), and
        # every path below either copies it (cast, device move) or only reads it, so no copy here.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=TORCH_DTYPES.get(msg.dtype, torch.uint8))  # INT4: packed
    if msg.dtype == pb.INT4:
        assert row_scales is not None
        return _int4_values(raw, dims, row_scales, refuse).to(device)
    if msg.dtype == pb.INT8:
        assert row_scales is not None
        out = raw.reshape(dims).to(dtype=torch.float32).reshape(_rows(dims), -1).mul_(row_scales[:, None])
        return out.reshape(dims).to(device)  # |code| <= 127 times scales bounded above: finite
    return _float_values(raw.reshape(dims), msg, refuse).to(device)


# ---------------------------------------------------------------------------------------------
# decode's checks, in the order it makes them: everything the claimed header says is checked
# before a byte of the payload is touched or anything of its size allocated.


class _Refusal:
    """Builds ``decode``'s errors: INVALID_ARGUMENT naming the tensor."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, what: str) -> ProtocolError:
        return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {what}")


def _check_encoding(
    msg: pb.Tensor, dtype: Optional[int], compression: Optional[int], refuse: _Refusal
) -> None:
    """The wire dtype and compression: known, and the session's."""
    if msg.dtype not in SUPPORTED_WIRE_DTYPES:
        raise refuse(f"unknown dtype {msg.dtype}")
    if dtype is not None and msg.dtype != dtype:
        raise refuse(f"dtype {pb.DType.Name(msg.dtype)}, the session uses {pb.DType.Name(dtype)}")
    if msg.compression not in SUPPORTED_COMPRESSIONS:
        raise refuse(f"unknown compression {msg.compression}")
    if compression is not None and msg.compression not in (compression, pb.COMPRESSION_NONE):
        raise refuse(
            f"compression {pb.Compression.Name(msg.compression)}, "
            f"the session uses {pb.Compression.Name(compression)}"
        )


def _checked_dims(msg: pb.Tensor, shape: Optional[Sequence[Optional[int]]], refuse: _Refusal) -> List[int]:
    """The claimed shape: the expected rank and dimensions, none negative."""
    dims = list(msg.shape)
    if shape is not None:
        if len(dims) != len(shape):
            raise refuse(f"rank {len(dims)} (shape {dims}), expected rank {len(shape)}")
        for i, (got, want) in enumerate(zip(dims, shape)):
            if want is not None and got != want:
                raise refuse(f"shape {dims}: dimension {i} is {got}, expected {want}")
    if any(d < 0 for d in dims):
        raise refuse(f"negative dimension in shape {dims}")
    return dims


def _payload_size(wire_dtype: int, dims: List[int], max_bytes: int, refuse: _Refusal) -> Tuple[int, str]:
    """The payload's size in bytes for ``dims`` (INT4: packed rows) and how it was counted, refused
    over ``max_bytes``."""
    # A 0 in the shape makes it empty, but torch still multiplies the other dimensions (strides):
    # measured with each 0 counted as 1, so [0, 2^32, 2^32] is refused here, not by torch.
    spanned = [max(d, 1) for d in dims]
    if wire_dtype == pb.INT4:
        rows, _, row_bytes = _int4_layout(dims)
        nbytes = rows * row_bytes
        span_rows, _, span_row_bytes = _int4_layout(spanned)
        span = span_rows * span_row_bytes
        need = f"shape {dims} in int4 needs {rows} rows x {row_bytes} bytes = {nbytes}"
    else:
        itemsize = torch.empty((), dtype=TORCH_DTYPES[wire_dtype]).element_size()
        nbytes = math.prod(dims) * itemsize  # 1 element for a scalar
        span = math.prod(spanned) * itemsize
        need = f"shape {dims} x {itemsize} bytes needs {nbytes}"
    if span > max_bytes:
        counted = f" (its dimensions span {span})" if span != nbytes else ""
        raise refuse(f"shape {dims} is {nbytes} bytes{counted}, over the limit of {max_bytes}")
    return nbytes, need


def _checked_scales(msg: pb.Tensor, dims: List[int], refuse: _Refusal) -> Optional[torch.Tensor]:
    """The tensor's scale, and INT8 / INT4's row scales (None for the other dtypes): finite, >= 0."""
    if not math.isfinite(msg.scale) or msg.scale < 0:
        raise refuse(f"invalid scale {msg.scale}")
    if msg.dtype not in HADAMARD_BITS and (msg.group or msg.group_scales or msg.outlier_rows or msg.outliers):
        raise refuse(
            f"group, group scales and outliers are for the HADAMARD dtypes only, the tensor is {pb.DType.Name(msg.dtype)}"
        )
    if msg.dtype not in ROW_SCALED:
        if len(msg.scales):
            raise refuse(f"row scales are for INT8 and INT4 only, the tensor is {pb.DType.Name(msg.dtype)}")
        return None
    if len(msg.scales) != _rows(dims):
        raise refuse(f"{len(msg.scales)} row scales for shape {dims}, expected {_rows(dims)}")
    # Bounded: as many as rows, and rows <= span <= max_bytes.
    row_scales = torch.tensor(list(msg.scales), dtype=torch.float32)
    if not bool(torch.isfinite(row_scales).all()) or bool((row_scales < 0).any()):
        raise refuse("row scales must be finite and non-negative")
    # The largest code times the scale must stay a float32 (127 * 3e38 would decode to inf);
    # checked in float32, as the decoder multiplies.
    largest = 127 if msg.dtype == pb.INT8 else 7  # int8 codes -127..127, int4's -7..7
    if not bool(torch.isfinite(row_scales * largest).all()):
        raise refuse(f"row scales that overflow float32 once multiplied by the codes (up to {largest})")
    return row_scales


def _payload(msg: pb.Tensor, nbytes: int, need: str, refuse: _Refusal) -> bytes:
    """The payload's bytes, decompressed to at most ``nbytes``, of exactly that length."""
    data = decompress(msg.data, msg.compression, nbytes, refuse)  # msg.data: a fresh bytes object
    if len(data) != nbytes:
        raise refuse(f"{len(data)} bytes of data, {need}")
    return data


# ---------------------------------------------------------------------------------------------
# decode's dtype decoding: checked bytes -> float32 values.


def _int4_values(
    raw: torch.Tensor, dims: List[int], row_scales: torch.Tensor, refuse: _Refusal
) -> torch.Tensor:
    """Packed nibbles (rows x row_bytes, uint8) -> float32 of ``dims``: code - 8, times the row's
    scale; a 0 nibble (-8) and a padding nibble other than 8 are refused."""
    rows, row_len, row_bytes = _int4_layout(dims)
    packed = raw.reshape(rows, row_bytes)
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(rows, 2 * row_bytes)
    if int(nibbles.min()) == 0:
        raise refuse("a 0 nibble (-8): int4 values are -7..7, nibbles 1..15")
    if row_len % 2 and bool((nibbles[:, -1] != INT4_ZERO).any()):
        raise refuse(f"a row's padding nibble is not {INT4_ZERO}")
    out = nibbles[:, :row_len].to(torch.float32).sub_(INT4_ZERO).mul_(row_scales[:, None])
    return out.reshape(dims)  # |code| <= 7 times scales bounded above (_checked_scales): finite


def _hadamard_values(msg: pb.Tensor, dims: List[int], max_bytes: int, refuse: _Refusal) -> torch.Tensor:
    """INT4/6/8_HADAMARD -> float32 of ``dims``: the header and every part's size checked first."""
    rows, row_len, _ = _int4_layout(dims)
    bits = HADAMARD_BITS[msg.dtype]
    outliers = list(msg.outlier_rows)
    _payload_size(pb.INT4, dims, max_bytes, refuse)  # the codes of every row fit (and the span)
    _checked_scales(msg, dims, refuse)  # the tensor's scale; no row scales
    hadamard.check_header(rows, row_len, msg.group, outliers, refuse)
    if not math.prod(dims):
        return torch.zeros(dims, dtype=torch.float32)
    codes, scales, whole = hadamard.sizes(rows, row_len, msg.group, len(outliers), bits)
    if codes + scales + whole > max_bytes:
        raise refuse(
            f"shape {dims} with {len(outliers)} outlier rows is {codes + scales + whole} bytes, over the limit of {max_bytes}"
        )
    if len(msg.group_scales) != scales or len(msg.outliers) != whole:
        raise refuse(
            f"{len(msg.group_scales)} bytes of group scales and {len(msg.outliers)} of outliers; shape {dims} "
            f"in groups of {msg.group} with {len(outliers)} outlier rows needs {scales} and {whole}"
        )
    data = _payload(msg, codes, f"shape {dims} needs {codes} bytes of codes", refuse)
    shape = (rows, row_len, msg.group, bits)
    out = hadamard.dequantise(shape, data, msg.group_scales, outliers, msg.outliers, refuse)
    if msg.scale:
        out.div_(msg.scale)
    lo, hi = torch.aminmax(out)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise refuse("decodes to NaN or Inf (scale too small)")
    return out.reshape(dims)


def _float_values(raw: torch.Tensor, msg: pb.Tensor, refuse: _Refusal) -> torch.Tensor:
    """fp32 / fp16 / bf16 values -> float32, divided by the tensor's scale; NaN and Inf refused."""
    out = raw.to(dtype=torch.float32)  # a copy for fp16/bf16; for fp32 the view itself
    if msg.scale:
        out = out / msg.scale if msg.dtype == pb.FLOAT32 else out.div_(msg.scale)
    # min and max propagate NaN and show +-Inf: one pass with no temporary, ~15x faster on CPU
    # than isfinite().all(), which materialises a bool tensor (docs/benchmarks.md).
    lo, hi = torch.aminmax(out)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise refuse("contains NaN or Inf")
    return out
