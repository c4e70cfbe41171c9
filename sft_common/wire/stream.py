"""A packed gRPC stream: each message compressed against the ones before it, one zstd stream a direction.

Per-tensor zstd (``wire.compress``) sees one message at a time. What repeats *across* messages is
lost to it: a decoder's first cut at layer 0 is mostly its tokens' embeddings, and the same tokens
come back in every batch. With ``--compression zstd-stream`` the edge asks at open
(``OpenSession.pack_stream``), the cloud agrees (``SessionOpened.stream_packed``), and every later
message of that gRPC stream, each way, travels as ``packed``: the serialized message, compressed
as the next block of one zstd stream over the whole gRPC stream and flushed, so the receiver
decodes it at once (permessage-deflate with context takeover, RFC 7692, for zstd). The window
(``WINDOW_LOG``) bounds what a message can refer back to and what each side holds a stream.

The contexts live and die with the gRPC stream, not the session: a re-attachment after a broken
link opens a new stream with fresh contexts, and the edge re-sends its unanswered messages packed
anew (the session keeps them unpacked). Tensors inside a packed stream travel uncompressed
(``SessionConfig.compression`` NONE): compressed payloads would hide their repeats from the stream.

A receiver decompresses at most ``limit`` bytes a message, reading the packed bytes in small
pieces so that a hostile block cannot make it allocate much more, and refuses a window larger
than its own.
"""

from __future__ import annotations

from typing import Callable

import zstandard

LEVEL = 3  # as wire.compress (zstd's default)
WINDOW_LOG = 20  # 1 MiB of history a direction: as small as 2 MiB here, 3.7 MiB a stream a side
PIECE = 256  # bytes of packed input decompressed at a time: a block expands to at most 128 KiB

Refuse = Callable[[str], Exception]


class Packer:
    """One direction's sending side: ``pack`` compresses a serialized message as the stream's next block."""

    def __init__(self, level: int = LEVEL, window_log: int = WINDOW_LOG):
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log)
        self._stream = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def pack(self, data: bytes) -> bytes:
        return self._stream.compress(data) + self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class Unpacker:
    """One direction's receiving side: ``unpack`` decompresses the next block of the stream."""

    def __init__(self, window_log: int = WINDOW_LOG):
        self._stream = zstandard.ZstdDecompressor(max_window_size=1 << window_log).decompressobj()

    def unpack(self, data: bytes, limit: int, refuse: Refuse) -> bytes:
        """The message packed in ``data``: at most ``limit`` bytes, else ``refuse``; a ``data``
        that is not the stream's next block (corrupt, or from another stream) is refused too."""
        out, size = [], 0
        try:
            for start in range(0, len(data), PIECE):
                piece = self._stream.decompress(data[start : start + PIECE])
                size += len(piece)
                if size > limit:
                    raise refuse(f"a packed message decompresses to more than {limit} bytes")
                out.append(piece)
        except zstandard.ZstdError as exc:
            raise refuse(f"a packed message is not the stream's next zstd block ({exc})") from None
        if not size:
            raise refuse("a packed message holds no message")
        return b"".join(out)
