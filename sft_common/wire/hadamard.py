"""Int4 in rotated groups (``INT4_HADAMARD``): a full-width hidden state at about 4.3 bits a value.

A pre-LN decoder's residual stream has a few dimensions far larger than the rest, so one scale
per row (``INT4``) spends its 15 levels on them and rounds everything else to zero (SmolLM2's
step-0 perplexity goes from 88 to 1,822, issue 34). This codec, after TAH-Quant and QuaRot:

1. **Rotate.** Each row of n values is multiplied by fixed random signs and by an orthonormal
   Hadamard matrix in blocks of ``group`` values (64, or the largest power of two dividing n).
   The rotation is orthogonal and known to both sides, so the receiver undoes it exactly; an
   outlier dimension is spread over its block instead of owning a scale.
2. **Quantise in groups.** Each block gets one fp16 scale (its largest magnitude / 7) and 4-bit
   codes -7..7, packed as ``INT4``'s nibbles.
3. **Outlier rows** (massive-activation tokens such as the first token: a row whose largest
   magnitude exceeds ``OUTLIER_FACTOR`` times the median row's) travel unrotated in bf16 beside the
   codes, at most one row in ``MAX_OUTLIER_SHARE``.

Bytes a row of n values: n / 2 codes + 2 n / group scales (n = 576, group 64: 306 B against fp32's
2,304, 7.5x fewer), outlier rows 2 n. ``decode`` checks every claimed size and value before it
allocates (the caller bounds the total), as ``codec.decode`` does for the other dtypes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, List, Tuple

import torch

GROUP = 64  # the rotation's block and the quantiser's group, where the row's length allows it
MAX_GROUP = 1024  # the largest block a receiver accepts
CODE_MAX = 7  # symmetric -7..7; nibble = code + 8, so a 0 nibble is never valid
NIBBLE_ZERO = 8
OUTLIER_FACTOR = 8.0  # a row this many times the median row's magnitude travels in bf16
MAX_OUTLIER_SHARE = 8  # at most one row in 8 is sent whole
FP16_MAX = 65504.0
TARGET_AMAX = 2.0**10  # values are scaled by a power of two so the largest lands near here

Refuse = Callable[[str], Exception]


def group_for(n: int) -> int:
    """The block for rows of ``n`` values: ``GROUP``, or the largest power of two dividing n."""
    return math.gcd(n, GROUP) if n else 1


@functools.lru_cache(maxsize=32)
def _hadamard(size: int) -> torch.Tensor:
    """The orthonormal (and symmetric) Hadamard matrix of a power-of-two ``size``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(size)).float()


@functools.lru_cache(maxsize=32)
def _signs(n: int) -> torch.Tensor:
    """Fixed random signs for rows of ``n`` values, from SHA-256 in counter mode: the same on every
    machine and torch version (both sides must agree bit for bit)."""
    bits: List[int] = []
    counter = 0
    while len(bits) < n:
        digest = hashlib.sha256(b"sft-hadamard-signs:%d" % counter).digest()
        bits.extend((byte >> k) & 1 for byte in digest for k in range(8))
        counter += 1
    return torch.tensor(bits[:n], dtype=torch.float32).mul_(2).sub_(1)


def rotate(x: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, n) -> its rotation: signs, then the block Hadamard (orthogonal)."""
    rows, n = x.shape
    signed = x * _signs(n).to(x.device)
    h = _hadamard(group).to(x.device)
    return (signed.reshape(rows, n // group, group) @ h).reshape(rows, n)


def unrotate(y: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of ``rotate`` (the Hadamard is symmetric and orthonormal, the signs ±1)."""
    rows, n = y.shape
    h = _hadamard(group).to(y.device)
    return (y.reshape(rows, n // group, group) @ h).reshape(rows, n) * _signs(n).to(y.device)


def outlier_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of (rows, n) ``x`` sent whole: largest magnitude over ``OUTLIER_FACTOR`` times the
    median row's, the largest first, at most one row in ``MAX_OUTLIER_SHARE``; increasing indices."""
    rows = x.shape[0]
    if rows < 2:
        return torch.empty(0, dtype=torch.long)
    amax = x.abs().amax(dim=1)
    limit = OUTLIER_FACTOR * amax.median()
    over = torch.nonzero(amax > limit).flatten()
    cap = rows // MAX_OUTLIER_SHARE
    if over.numel() > cap:
        over = over[amax[over].argsort(descending=True)[:cap]]
    return over.sort().values.cpu()


def quantise(x: torch.Tensor) -> Tuple[int, float, bytes, bytes, List[int], bytes]:
    """(rows, n) float -> (group, scale, packed codes, fp16 group scales, outlier rows, bf16 outliers).

    ``scale`` is the power of two the values were multiplied by so that fp16 scales neither
    overflow nor underflow (tiny gradients); the decoder divides by it.
    """
    x = x.detach().float()
    rows, n = x.shape
    group = group_for(n)
    amax = float(x.abs().amax()) if x.numel() else 0.0
    scale = 2.0 ** math.floor(math.log2(TARGET_AMAX / amax)) if amax > 0 and math.isfinite(amax) else 1.0
    x = x * scale
    outliers = outlier_rows(x)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[outliers] = False
    body = rotate(x[keep.to(x.device)], group)
    blocks = body.reshape(-1, n // group, group)
    block_scale = (blocks.abs().amax(dim=2, keepdim=True) / CODE_MAX).to(torch.float16)
    inv = torch.where(
        block_scale > 0, 1.0 / block_scale.float(), torch.zeros_like(block_scale, dtype=torch.float32)
    )
    codes = blocks.mul(inv).round_().clamp_(-CODE_MAX, CODE_MAX).nan_to_num_(0.0).add_(NIBBLE_ZERO)
    packed = _pack(codes.reshape(-1, n).to(torch.uint8))
    whole = x[outliers.to(x.device)].to(torch.bfloat16).cpu()
    return (
        group,
        scale,
        packed.cpu().numpy().tobytes(),
        block_scale.cpu().numpy().tobytes(),
        outliers.tolist(),
        whole.view(torch.int16).numpy().tobytes(),
    )


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    """(rows, n) nibbles -> (rows, ceil(n / 2)) bytes, low nibble first, odd rows padded with 8."""
    rows, n = nibbles.shape
    if n % 2:
        nibbles = torch.cat(
            (nibbles, torch.full((rows, 1), NIBBLE_ZERO, dtype=torch.uint8, device=nibbles.device)), 1
        )
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def sizes(rows: int, n: int, group: int, outliers: int) -> Tuple[int, int, int]:
    """Bytes of (codes, group scales, outlier values) for ``rows`` rows of ``n`` with ``outliers``
    of them sent whole."""
    body = rows - outliers
    return body * ((n + 1) // 2), body * (n // group) * 2, outliers * n * 2


def check_header(rows: int, n: int, group: int, outliers: List[int], refuse: Refuse) -> None:
    """The claimed group and outlier rows, before anything of their size is read."""
    if group < 1 or group > MAX_GROUP or group & (group - 1) or (n and n % group):
        raise refuse(f"group {group} is not a power of two up to {MAX_GROUP} dividing the row's {n} values")
    if len(outliers) > rows:
        raise refuse(f"{len(outliers)} outlier rows in a tensor of {rows} rows")
    if any(not 0 <= r < rows for r in outliers) or any(a >= b for a, b in zip(outliers, outliers[1:])):
        raise refuse(f"outlier rows must be increasing row indices below {rows}")


def dequantise(
    rows: int,
    n: int,
    group: int,
    codes: bytes,
    scales: bytes,
    outliers: List[int],
    whole: bytes,
    refuse: Refuse,
) -> torch.Tensor:
    """The float32 (rows, n) tensor from checked sizes (``sizes``); bad values are refused."""
    body = rows - len(outliers)
    block_scale = _frombuffer(scales, torch.float16).float().reshape(body, n // group, 1)
    if not bool(torch.isfinite(block_scale).all()) or bool((block_scale < 0).any()):
        raise refuse("group scales must be finite and non-negative")
    packed = _frombuffer(codes, torch.uint8).reshape(body, (n + 1) // 2)
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(body, -1)
    if body and int(nibbles.min()) == 0:
        raise refuse("a 0 nibble (-8): codes are -7..7, nibbles 1..15")
    if n % 2 and body and bool((nibbles[:, -1] != NIBBLE_ZERO).any()):
        raise refuse(f"a row's padding nibble is not {NIBBLE_ZERO}")
    values = nibbles[:, :n].float().sub_(NIBBLE_ZERO).reshape(body, n // group, group).mul_(block_scale)
    out = torch.empty(rows, n, dtype=torch.float32)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[outliers] = False
    out[keep] = unrotate(values.reshape(body, n), group)
    if outliers:
        exact = _frombuffer(whole, torch.int16).view(torch.bfloat16).float().reshape(len(outliers), n)
        if not bool(torch.isfinite(exact).all()):
            raise refuse("outlier rows contain NaN or Inf")
        out[outliers] = exact
    return out


def _frombuffer(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a copy of ``data`` (empty allowed)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)
