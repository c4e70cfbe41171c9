"""Lossless compression of a tensor's payload: lz4 (fast) or zstd (smaller), only where it shrinks.

A payload that does not shrink (dense fp16, say) travels raw and says COMPRESSION_NONE, so a
receiver that asked for a compression also accepts raw payloads. Decompression is bounded by the
size the tensor's dtype and shape give, checked before this is called: a hostile frame cannot
make the receiver allocate more.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import lz4.block
import zstandard

from sft_common.proto import sft_pb2 as pb

COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "lz4": pb.LZ4, "zstd": pb.ZSTD}
SUPPORTED = frozenset(COMPRESSIONS.values())
ZSTD_LEVEL = 3  # zstd's default: within a few % of level 9's size here at a fraction of the time


def compress(data: bytes, compression: Any) -> Tuple[bytes, Any]:
    """(payload, the compression it carries): compressed where that makes it smaller."""
    if compression == pb.COMPRESSION_NONE or not data:  # lz4 cannot encode 0 bytes
        return data, pb.COMPRESSION_NONE
    if compression == pb.LZ4:
        packed = lz4.block.compress(data, store_size=False)
    else:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return (packed, compression) if len(packed) < len(data) else (data, pb.COMPRESSION_NONE)


def decompress(data: bytes, compression: Any, nbytes: int, refuse: Callable[[str], Exception]) -> bytes:
    """The payload decompressed to at most ``nbytes`` (its length is the caller's to check)."""
    if compression == pb.LZ4:
        try:
            return lz4.block.decompress(data, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError as exc:
            raise refuse(f"lz4 payload does not decompress to {nbytes} bytes ({exc})") from None
    if compression == pb.ZSTD:
        try:
            # A frame that states its size is decompressed to that size whatever max_output_size
            # says: the stated size is checked first.
            stated = zstandard.frame_content_size(data)
            if stated != -1 and stated != nbytes:
                raise refuse(f"zstd frame states {stated} bytes, the tensor has {nbytes}")
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=nbytes)
        except zstandard.ZstdError as exc:
            raise refuse(f"zstd payload does not decompress to {nbytes} bytes ({exc})") from None
    return data
