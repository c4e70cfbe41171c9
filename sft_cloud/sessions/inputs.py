"""What a session accepts as activations: the batch's lengths checked, the payload decoded, padded back.

Activations cross the wire as the real tokens only, (tokens, width) rows in the batch's order;
net2 takes them as (batch, max_len, width) with a mask. Both the two-part and the U's middle
read their inputs through an ``ActivationInput``.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import torch

from sft_cloud.sessions.validation import invalid
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.two_part import lengths_to_mask
from sft_common.wire.codecs import Wire


class ActivationInput:
    """Reads one session's activation messages: ``width`` values a token, within its config's caps."""

    def __init__(self, config: pb.SessionConfig, width: int, device: str):
        self.config = config
        self.wire = Wire.of(config)
        self.width = width  # values a token at the cut
        self.device = device

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
