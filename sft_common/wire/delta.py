"""Delta mode (AQ-SGD, issue 34): activations sent as low-bit differences from the last epoch's.

A full-width cut sends each training example's rows again every epoch, and they change little
between epochs. In delta mode each side of a cut keeps, per example (its key: a keyed hash of its
tokens, made by the edge and sent with the step), the rows that last crossed it *as the receiver
decoded them*. An example's first crossing travels in a base codec (by default the cut's own wire
dtype); later ones travel as the difference from the kept rows in a narrower codec (2 bits in
rotated groups by default), and both sides replace the kept rows with ``kept + decoded
difference``. The sender decodes its own
message to get that value, so both caches stay bitwise identical (the same CPU decode of the same
bytes), and the quantisation error of one epoch is carried into the next epoch's difference
instead of accumulating (Wang et al., NeurIPS 2022).

- ``DeltaMode``: the session's choice (budget, base and delta dtypes), from the edge's
  ``--delta-cache-mb`` or a session config; None is off.
- ``DeltaCache``: key -> (tokens, width) fp32 rows, bounded by bytes; an example past the budget
  is not kept (it travels in the base codec every epoch: more bytes, never a wrong value). Both
  sides make the same decisions from the same messages: no eviction, one rule in ``update``.
- ``DeltaCaches``: one side's caches, one a cut (``CUTS``), and the edge's salt of the keys.
- ``encode`` / ``decode``: one message's rows (``activations`` for the base rows, ``DeltaRows``
  for the others) through ``codec.encode`` / ``codec.decode``, which check sizes and values before
  they allocate; ``decode`` checks the flags and that every delta's example is held with exactly
  as many rows before it touches a payload. Neither changes a cache: the caller ``update``s it once
  the message is applied, so a refused message changes nothing.

The cache is part of each side's checkpoint (``state`` / ``load``, three tensors a cache).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import torch

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError

KEY_BYTES = 16  # an example key: blake2b-128 of its tokens, keyed by the run's salt
VALUE_BYTES = 4  # the rows are kept in fp32: exactly what the receiver decoded
# An example's first crossing in the cut's own wire dtype (0), the differences of later crossings
# in 2-bit rotated groups. SmolLM2's U, 3 epochs (bench/delta_codec.py, docs/accuracy.md "Delta
# mode"): the same dev loss as int8-hadamard then 4-bit deltas, and as no delta mode, at the
# fewest bytes (epochs 2-3: 163 B a token of activations up, 184 down, against 306 and 465).
BASE_DTYPE = pb.DTYPE_UNSPECIFIED
DELTA_DTYPE = pb.INT2_HADAMARD
# the largest budget a session may ask for, each cut (4 GiB); a daemon may allow less (--max-delta-cache-mb)
MAX_CACHE_BYTES = 1 << 32
CUTS = ("up", "down")  # the first cut (the edge sends), the U's second (the middle sends)
Codecs = Tuple[Any, Any]  # (base, delta): pb.DType values


def example_key(input_ids: torch.Tensor, salt: bytes) -> bytes:
    """One example's key: its real tokens hashed with the run's secret ``salt``, so the cloud can
    tell that an example repeats but cannot test a guess of its text against the key."""
    data = input_ids.to(torch.int64).cpu().numpy().tobytes()
    return hashlib.blake2b(data, key=salt, digest_size=KEY_BYTES).digest()


def new_salt() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


@dataclass(frozen=True)
class DeltaMode:
    """Delta mode as a session uses it: the cache's budget and the two codecs."""

    budget: int  # bytes of kept rows, each side, each cut
    base: Any = BASE_DTYPE  # pb.DType of an example's first crossing; 0: the cut's wire dtype
    delta: Any = DELTA_DTYPE  # pb.DType of the differences

    def codecs(self, cut_dtype: Any) -> Codecs:
        """(base, delta) dtypes at a cut whose session wire dtype is ``cut_dtype``."""
        return (self.base or cut_dtype, self.delta)

    @classmethod
    def named(cls, cache_mb: float) -> Optional[DeltaMode]:
        """The edge's ``--delta-cache-mb`` (0: off, None), with this module's codecs."""
        return cls(int(cache_mb * 2**20), BASE_DTYPE, DELTA_DTYPE) if cache_mb > 0 else None

    @classmethod
    def of(cls, config: pb.SessionConfig) -> Optional[DeltaMode]:
        """What a session config asks for (checked by ``check_config`` first); None: off."""
        if not config.delta_cache_bytes:
            return None
        return cls(config.delta_cache_bytes, config.delta_base_dtype, config.delta_dtype)

    def configure(self, config: pb.SessionConfig) -> None:
        """Set this mode's fields on a session config (the edge, at open)."""
        config.delta_cache_bytes = self.budget
        config.delta_base_dtype, config.delta_dtype = self.base, self.delta


def check_config(config: pb.SessionConfig) -> Optional[str]:
    """Why a session config's delta fields are not acceptable (None: they are)."""
    budget, base, delta = config.delta_cache_bytes, config.delta_base_dtype, config.delta_dtype
    if not budget:
        return (
            "delta_base_dtype and delta_dtype are for delta mode (delta_cache_bytes > 0)"
            if base or delta
            else None
        )
    if not 0 < budget <= MAX_CACHE_BYTES:
        return f"delta_cache_bytes must be in 0..{MAX_CACHE_BYTES}, got {budget}"
    if config.mode != pb.SL or config.forward_only:
        return "delta mode is for the full-width cuts of a trained split (mode SL, not forward_only)"
    for what, dtype in (("delta_base_dtype", base or pb.FLOAT32), ("delta_dtype", delta)):
        if dtype not in codec.SUPPORTED_WIRE_DTYPES:
            return f"{what} {dtype} is not a supported wire dtype"
    return None


def config_cuts(config: pb.SessionConfig) -> Tuple[str, ...]:
    """The cuts a cloud session of ``config`` keeps a cache at: the first, and the U's second."""
    return CUTS if config.tail_layers else CUTS[:1]  # tail layers: the U, whose middle sends too


def granted_bytes(config: pb.SessionConfig) -> int:
    """What a cloud session of ``config`` may hold in delta mode's caches, every cut (0: off)."""
    return config.delta_cache_bytes * len(config_cuts(config))


class DeltaCache:
    """Example key -> the (tokens, width) fp32 rows both sides hold for it, at most ``budget`` bytes."""

    def __init__(self, budget: int, width: int):
        self.budget, self.width = budget, width
        self.rows: Dict[bytes, torch.Tensor] = {}
        self.used = 0  # bytes held

    def held(self, key: bytes, tokens: int) -> Optional[torch.Tensor]:
        """The rows kept for ``key`` if they are ``tokens`` rows, else None."""
        kept = self.rows.get(key)
        return kept if kept is not None and kept.shape[0] == tokens else None

    def update(self, keys: Sequence[bytes], lengths: Sequence[int], rows: torch.Tensor) -> None:
        """Keep each example's decoded rows (``rows``: the message's, in order): a held key is
        replaced, a new one kept while the budget allows, in the message's order."""
        for key, part in zip(keys, rows.detach().float().cpu().split(list(lengths))):
            size = part.numel() * VALUE_BYTES
            old = self.rows.get(key)
            freed = 0 if old is None else old.numel() * VALUE_BYTES
            if old is None and self.used + size > self.budget:
                continue
            self.rows[key] = part.clone()
            self.used += size - freed

    def state(self, prefix: str) -> Dict[str, torch.Tensor]:
        """Checkpoint tensors: the keys (n, 16) uint8, the row counts (n,), the rows concatenated."""
        keys = list(self.rows)
        return {
            f"{prefix}/keys": torch.tensor(list(b"".join(keys)), dtype=torch.uint8).reshape(-1, KEY_BYTES),
            f"{prefix}/lengths": torch.tensor([self.rows[k].shape[0] for k in keys], dtype=torch.int64),
            f"{prefix}/rows": torch.cat([self.rows[k] for k in keys]) if keys else torch.zeros(0, self.width),
        }

    def load(self, tensors: Dict[str, torch.Tensor], prefix: str) -> None:
        """What ``state`` saved (an absent prefix: an empty cache)."""
        self.rows, self.used = {}, 0
        if f"{prefix}/keys" not in tensors:
            return
        keys = [bytes(k.tolist()) for k in tensors[f"{prefix}/keys"]]
        lengths = tensors[f"{prefix}/lengths"].tolist()
        for key, part in zip(keys, tensors[f"{prefix}/rows"].float().cpu().split(lengths)):
            self.rows[key] = part.clone()
            self.used += part.numel() * VALUE_BYTES


class DeltaCaches:
    """One side's caches, one a cut it sends or receives (``CUTS``), and, on the edge, the salt of
    its example keys: what its checkpoint holds of delta mode."""

    def __init__(self, mode: DeltaMode, width: int, cuts: Sequence[str], salt: bytes = b""):
        self.mode = mode
        self.cuts = {cut: DeltaCache(mode.budget, width) for cut in cuts}
        self.salt = salt

    @classmethod
    def of(cls, config: pb.SessionConfig, width: int) -> Optional[DeltaCaches]:
        """A cloud session's caches (None: delta mode off): the first cut's, and the U's second."""
        chosen = DeltaMode.of(config)
        if chosen is None:
            return None
        return cls(chosen, width, config_cuts(config))

    def __getitem__(self, cut: str) -> DeltaCache:
        return self.cuts[cut]

    @property
    def used(self) -> int:
        """Bytes held, every cut."""
        return sum(c.used for c in self.cuts.values())

    def keys(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> List[bytes]:
        """Each example's key: (batch, seq) right-padded token ids and their lengths."""
        return [example_key(ids[:n], self.salt) for ids, n in zip(input_ids, lengths)]

    def state(self) -> Dict[str, torch.Tensor]:
        """Checkpoint tensors under ``delta/``."""
        out = {"delta/salt": torch.tensor(list(self.salt), dtype=torch.uint8)}
        for cut, cache in self.cuts.items():
            out.update(cache.state(f"delta/{cut}"))
        return out

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """What ``state`` saved; a checkpoint from before delta mode leaves the caches empty."""
        if "delta/salt" in tensors and tensors["delta/salt"].numel():
            self.salt = bytes(tensors["delta/salt"].tolist())
        for cut, cache in self.cuts.items():
            cache.load(tensors, f"delta/{cut}")


def encode(
    codecs: Codecs,
    cache: DeltaCache,
    keys: Sequence[bytes],
    lengths: Sequence[int],
    rows: torch.Tensor,
    compression: Any = pb.COMPRESSION_NONE,
) -> Tuple[pb.Tensor, pb.DeltaRows, torch.Tensor]:
    """One message's (tokens, width) rows -> (its ``activations``, its ``DeltaRows``, the rows as
    the receiver will decode them: what the caller ``update``s the cache with)."""
    rows = rows.detach().float()
    parts = rows.split(list(lengths))
    kept = [cache.held(k, n) for k, n in zip(keys, lengths)]
    flags = [k is not None for k in kept]
    base_rows = _cat([p for p, f in zip(parts, flags) if not f], rows)
    diffs = _cat([p - k.to(p.device) for p, k in zip(parts, kept) if k is not None], rows)
    base = codec.encode(base_rows, codecs[0], compression)
    delta = pb.DeltaRows(delta=flags, rows=codec.encode(diffs, codecs[1], compression))
    decoded = _decoded(codecs, cache, keys, lengths, base, delta, rows.shape[1])
    return base, delta, decoded


def decode(
    codecs: Codecs,
    cache: DeltaCache,
    keys: Sequence[bytes],
    lengths: Sequence[int],
    base: pb.Tensor,
    delta: pb.DeltaRows,
    width: int,
    max_bytes: int = 1 << 30,
    name: str = "activations",
) -> torch.Tensor:
    """A received message's (tokens, width) fp32 rows: ``base`` rows as they are, ``delta`` rows
    added to the kept ones; everything checked before a payload is read. The cache is unchanged."""
    check_keys(keys, len(lengths), name)
    if len(delta.delta) != len(lengths):
        raise _invalid(f"{name}: {len(delta.delta)} delta flags for {len(lengths)} examples")
    for i, (key, n, flag) in enumerate(zip(keys, lengths, delta.delta)):
        if flag and cache.held(key, n) is None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}: example {i} is sent as a delta, but this side holds no {n} rows for its key "
                f"{key.hex()} ({len(cache.rows)} examples held): the two sides' delta caches disagree",
            )
    return _decoded(codecs, cache, keys, lengths, base, delta, width, max_bytes, name)


def check_keys(keys: Sequence[bytes], examples: int, name: str = "activations") -> None:
    """One key of ``KEY_BYTES`` an example."""
    if len(keys) != examples:
        raise _invalid(
            f"{name}: {len(keys)} example keys for {examples} examples (delta mode needs one each)"
        )
    if any(len(k) != KEY_BYTES for k in keys):
        raise _invalid(f"{name}: example keys must be {KEY_BYTES} bytes each")


def _decoded(
    codecs: Codecs,
    cache: DeltaCache,
    keys: Sequence[bytes],
    lengths: Sequence[int],
    base: pb.Tensor,
    delta: pb.DeltaRows,
    width: int,
    max_bytes: int = 1 << 30,
    name: str = "activations",
) -> torch.Tensor:
    """Both tensors decoded (their shapes follow from the flags) and put back in the batch's order."""
    flags = list(delta.delta)
    base_tokens = sum(n for n, f in zip(lengths, flags) if not f)
    delta_tokens = sum(lengths) - base_tokens
    kw: Dict[str, Any] = dict(max_bytes=max_bytes)
    base_rows = codec.decode(base, name=name, dtype=codecs[0], shape=(base_tokens, width), **kw)
    diffs = codec.decode(
        delta.rows, name=f"{name} (deltas)", dtype=codecs[1], shape=(delta_tokens, width), **kw
    )
    out: List[torch.Tensor] = []
    b = d = 0
    for key, n, flag in zip(keys, lengths, flags):
        if flag:
            kept = cache.held(key, n)
            assert kept is not None  # checked by decode; encode made it so
            out.append(kept + diffs[d : d + n])
            d += n
        else:
            out.append(base_rows[b : b + n])
            b += n
    return torch.cat(out) if out else torch.zeros(0, width)


def _cat(parts: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else like.new_zeros(0, like.shape[1])


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, message)
