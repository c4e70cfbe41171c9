"""What a session accepts as activations: the batch's lengths checked, the payload decoded, padded back.

Activations cross the wire as the real tokens only, (tokens, width) rows in the batch's order;
net2 takes them as (batch, max_len, width) with a mask. Both the two-part and the U's middle
read their inputs through an ``ActivationInput``.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Tuple

import torch

from sft_cloud.sessions.validation import invalid
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.two_part import lengths_to_mask
from sft_common.wire import delta
from sft_common.wire.codecs import Wire
from sft_common.wire.delta import DeltaCaches


class ActivationInput:
    """Reads one session's activation messages: ``width`` values a token, within its config's caps."""

    def __init__(self, config: pb.SessionConfig, width: int, device: str):
        self.config = config
        self.wire = Wire.of(config)
        self.width = width  # values a token at the cut
        self.device = device
        # Delta mode: the caches of the cuts this session reads and writes (the U's middle: both).
        self.caches = DeltaCaches.of(config, width)

    def max_bytes(self) -> int:
        """The largest activation payload this session can legitimately send (fp32 bound)."""
        return self.config.max_batch_size * self.config.max_seq_len * self.width * 4

    def lengths(self, field: Iterable[int]) -> List[int]:
        """The batch's sequence lengths, each checked against the session's caps."""
        lengths = list(field)
        if not 1 <= len(lengths) <= self.config.max_batch_size:
            raise invalid(
                f"batch of {len(lengths)} examples; the session allows 1..{self.config.max_batch_size}"
            )
        bad = [n for n in lengths if not 1 <= n <= self.config.max_seq_len]
        if bad:
            raise invalid(f"sequence length {bad[0]} is outside 1..{self.config.max_seq_len}")
        return lengths

    def decode(self, tensor: pb.Tensor, lengths: List[int]) -> torch.Tensor:
        """(tokens, width) activations, checked against ``lengths`` before anything is allocated."""
        shape = (sum(lengths), self.width)
        return self.wire.decode_activations(
            tensor, "activations", shape, max_bytes=self.max_bytes(), device=self.device
        )

    def decode_step(self, msg: Any, lengths: List[int]) -> Tuple[torch.Tensor, List[bytes]]:
        """A training message's (``TrainStep``, ``ForwardUp``) activations, as ``decode``; in delta
        mode against the first cut's cache (unchanged: ``keep`` it once the step is applied), and
        its example keys (none when off)."""
        keys = list(msg.example_keys)
        if self.caches is None:
            if keys or msg.HasField("delta"):
                raise invalid(
                    "example_keys and delta are for delta mode; this session has none (delta_cache_bytes 0)"
                )
            return self.decode(msg.activations, lengths), []
        codecs = self.caches.mode.codecs(self.wire.activations)
        rows = delta.decode(
            codecs, self.caches["up"], keys, lengths, msg.activations, msg.delta, self.width, self.max_bytes()
        )
        return rows.to(self.device), keys

    def encode_down(
        self, rows: torch.Tensor, keys: List[bytes], lengths: List[int], down: pb.ForwardDown
    ) -> None:
        """The U's second cut of a training step into ``down``: as ``encode_activations``; in delta
        mode against the second cut's cache, which then keeps what the edge will decode."""
        if self.caches is None:
            down.activations.CopyFrom(self.encode_activations(rows))
            return
        cache = self.caches["down"]
        codecs = self.caches.mode.codecs(self.wire.down)
        base, deltas, decoded = delta.encode(codecs, cache, keys, lengths, rows, self.wire.compression)
        down.activations.CopyFrom(base)
        down.delta.CopyFrom(deltas)
        cache.update(keys, lengths, decoded)

    def keep(self, keys: List[bytes], lengths: List[int], rows: torch.Tensor) -> None:
        """Delta mode: the first cut's cache keeps an applied step's decoded rows (off: nothing)."""
        if self.caches is not None:
            self.caches["up"].update(keys, lengths, rows)

    def decode_gradient(self, tensor: pb.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        """A gradient of exactly ``shape``, within the activation cap."""
        return self.wire.decode_gradient(
            tensor, "gradient", shape, max_bytes=self.max_bytes(), device=self.device
        )

    def mask(self, lengths: List[int]) -> torch.Tensor:
        """(batch, max_len) bool: True at real tokens."""
        t = torch.tensor(lengths, device=self.device)
        return lengths_to_mask(t, max(lengths))

    def unpack(self, x: torch.Tensor, lengths: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens, width) -> (batch, max_len, width), zeros at padded positions; and the mask."""
        mask = self.mask(lengths)
        full = x.new_zeros(len(lengths), max(lengths), self.width)
        return full.index_put((mask,), x), mask

    def encode_activations(self, t: torch.Tensor) -> pb.Tensor:
        """Activations sent down (the U's middle: its second cut), in the session's wire."""
        return self.wire.encode_activations(t, down=True)

    def encode_gradient(self, t: torch.Tensor) -> pb.Tensor:
        """A gradient sent down, in the session's wire."""
        return self.wire.encode_gradient(t)
