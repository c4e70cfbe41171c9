"""Codes in rotated groups (``INT4/6/8_HADAMARD``): a full-width hidden state at 4.3, 6.3 or 8.3 bits a value.

A pre-LN decoder's residual stream has a few dimensions far larger than the rest, so one scale
per row (``INT4``) spends its 15 levels on them and rounds everything else to zero (SmolLM2's
step-0 perplexity goes from 88 to 1,822, issue 34). This codec, after TAH-Quant and QuaRot:

1. **Rotate.** Each row of n values is multiplied by fixed random signs and by an orthonormal
   Hadamard matrix in blocks of ``group`` values (64, or the largest power of two dividing n).
   The rotation is orthogonal and known to both sides, so the receiver undoes it exactly; an
   outlier dimension is spread over its block instead of owning a scale.
2. **Quantise in groups.** Each block gets one fp16 scale (its largest magnitude / L) and codes
   -L..L (L = 2^(bits-1) - 1: 7, 31 or 127), stored + L + 1 and packed bit by bit, little-endian
   (4 bits: exactly ``INT4``'s nibbles, low first).
3. **Outlier rows** (massive-activation tokens such as the first token: a row whose largest
   magnitude exceeds ``OUTLIER_FACTOR`` times the median row's) travel unrotated in bf16 beside the
   codes, at most one row in ``MAX_OUTLIER_SHARE``.

Bytes a row of n values: n x bits / 8 codes + 2 n / group scales (n = 576, group 64: 306 B at 4 bits,
450 at 6, 594 at 8, against fp32's 2,304), outlier rows 2 n. SmolLM2's U (issue 34) shows where
each width is needed: 4 bits at the first cut cost nothing at step 0, 4 bits at the second cut (in
front of the last layer and the LM head) +2.3 % perplexity, 6 bits there nothing measurable. ``decode`` checks every claimed size and value before it
allocates (the caller bounds the total), as ``codec.decode`` does for the other dtypes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, List, Tuple

import numpy as np
import torch

GROUP = 64  # the rotation's block and the quantiser's group, where the row's length allows it
MAX_GROUP = 1024  # the largest block a receiver accepts
BITS = (2, 3, 4, 6, 8)  # the code widths: INT2/3/4/6/8_HADAMARD (2 and 3: delta mode's deltas)
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


def code_max(bits: int) -> int:
    """The largest code magnitude of ``bits``-bit symmetric codes: 7, 31, 127."""
    return (1 << (bits - 1)) - 1


def rounded(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """``x`` rounded in place: to nearest, or stochastically (floor(x + u), u ~ U[0, 1): unbiased,
    for gradients) with a generator seeded from the values' bytes, so the same tensor always
    encodes the same (a resent step sends the same bytes)."""
    if not stochastic:
        return x.round_()
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    return x.add_(noise).floor_()


def quantise(
    x: torch.Tensor, bits: int, stochastic: bool = False, whole_rows: bool = True
) -> Tuple[int, float, bytes, bytes, List[int], bytes]:
    """(rows, n) float -> (group, scale, packed codes, fp16 group scales, outlier rows, bf16 outliers);
    the codes rounded to nearest or stochastically (``rounded``). ``whole_rows=False`` sends no
    row whole: for gradients, whose rows differ in size by token (one scale a group already
    follows that) without an activation's massive dimensions, and where bf16 rows cost SmolLM2's
    second-cut gradient 411 B a token at 4 bits instead of 306.

    ``scale`` is the power of two the values were multiplied by so that fp16 scales neither
    overflow nor underflow (tiny gradients); the decoder divides by it.
    """
    x = x.detach().float()
    rows, n = x.shape
    group, top = group_for(n), code_max(bits)
    amax = float(x.abs().amax()) if x.numel() else 0.0
    scale = 2.0 ** math.floor(math.log2(TARGET_AMAX / amax)) if amax > 0 and math.isfinite(amax) else 1.0
    x = x * scale
    outliers = outlier_rows(x) if whole_rows else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(rows, dtype=torch.bool)
    keep[outliers] = False
    blocks = rotate(x[keep.to(x.device)], group).reshape(-1, n // group, group)
    block_scale = (blocks.abs().amax(dim=2, keepdim=True) / top).to(torch.float16)
    inv = torch.where(
        block_scale > 0, 1.0 / block_scale.float(), torch.zeros_like(block_scale, dtype=torch.float32)
    )
    codes = rounded(blocks.mul(inv), stochastic).clamp_(-top, top).nan_to_num_(0.0).add_(top + 1)
    whole = x[outliers.to(x.device)].to(torch.bfloat16).cpu()
    return (
        group,
        scale,
        pack(codes.reshape(-1, n).to(torch.uint8).cpu(), bits),
        block_scale.cpu().numpy().tobytes(),
        outliers.tolist(),
        whole.view(torch.int16).numpy().tobytes(),
    )


def pack(codes: torch.Tensor, bits: int) -> bytes:
    """(rows, n) codes < 2^bits -> each row's low ``bits`` bits, little-endian, ceil(n bits / 8)
    bytes a row (the last byte's spare bits 0)."""
    rows, n = codes.shape
    if bits == 8:
        return codes.numpy().tobytes()
    planes = np.unpackbits(codes.numpy()[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(planes.reshape(rows, n * bits), axis=-1, bitorder="little").tobytes()


def unpack(data: bytes, rows: int, n: int, bits: int) -> torch.Tensor:
    """``pack``'s inverse: (rows, n) uint8 codes; spare bits must be 0 (else ValueError)."""
    packed = np.frombuffer(data, dtype=np.uint8).reshape(rows, -1)
    if bits == 8:
        return torch.from_numpy(packed.copy())
    planes = np.unpackbits(packed, axis=-1, bitorder="little")
    if planes[:, n * bits :].any():
        raise ValueError("spare bits after a row's last code are not 0")
    codes = np.packbits(planes[:, : n * bits].reshape(rows, n, bits), axis=-1, bitorder="little")
    return torch.from_numpy(codes.reshape(rows, n))


def sizes(rows: int, n: int, group: int, outliers: int, bits: int) -> Tuple[int, int, int]:
    """Bytes of (codes, group scales, outlier values) for ``rows`` rows of ``n`` with ``outliers``
    of them sent whole."""
    body = rows - outliers
    return body * ((n * bits + 7) // 8), body * (n // group) * 2, outliers * n * 2


def check_header(rows: int, n: int, group: int, outliers: List[int], refuse: Refuse) -> None:
    """The claimed group and outlier rows, before anything of their size is read."""
    if group < 1 or group > MAX_GROUP or group & (group - 1) or (n and n % group):
        raise refuse(f"group {group} is not a power of two up to {MAX_GROUP} dividing the row's {n} values")
    if len(outliers) > rows:
        raise refuse(f"{len(outliers)} outlier rows in a tensor of {rows} rows")
    if any(not 0 <= r < rows for r in outliers) or any(a >= b for a, b in zip(outliers, outliers[1:])):
        raise refuse(f"outlier rows must be increasing row indices below {rows}")


def dequantise(
    shape: Tuple[int, int, int, int],
    codes: bytes,
    scales: bytes,
    outliers: List[int],
    whole: bytes,
    refuse: Refuse,
) -> torch.Tensor:
    """The float32 (rows, n) tensor from checked sizes (``sizes``); bad values are refused.
    ``shape``: (rows, n, group, bits)."""
    rows, n, group, bits = shape
    body, top = rows - len(outliers), code_max(bits)
    block_scale = _frombuffer(scales, torch.float16).float().reshape(body, n // group, 1)
    if not bool(torch.isfinite(block_scale).all()) or bool((block_scale < 0).any()):
        raise refuse("group scales must be finite and non-negative")
    try:
        stored = unpack(codes, body, n, bits) if body else torch.empty(0, n, dtype=torch.uint8)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if body and int(stored.min()) == 0:
        raise refuse(f"a stored code of 0 (-{top + 1}): codes are -{top}..{top}, stored 1..{2 * top + 1}")
    values = stored.float().sub_(top + 1).reshape(body, n // group, group).mul_(block_scale)
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
