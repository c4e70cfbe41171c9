"""A finished causal LM's next-token logits with a KV cache: each token runs through the model once.

``open_cached(folder, record)`` picks by what the folder holds (``record.part``), from one mapping
as ``parts.open_model`` does, a ``CachedLM``: the logits after a sequence, feeding the model only
the tokens it has not seen yet (the prompt at once, then one token a step), the keys and values
of the earlier ones kept where their layers run:

- a ``--local`` run (``full``): Hugging Face's causal LM with its own cache (``DynamicCache``);
- an export of a U (``ushape``): the head, the middle and the tail here, each with the
  ``KVCache`` of its layers (``sft_common.topology.kv_cache``); with a forward-only run's side
  network (``ushape-side``), the middle's step also taps its layers for the side network
  (``side_parts.SideMiddle``);
- a U run's ``--output-dir`` (``edge``): the head and the tail here with their caches, the middle
  on the daemon that trained it, whose cache the daemon keeps for this stream (``DecodeStep``):
  one row of the first cut up and one of the second down a token, instead of the whole sequence.
  If the daemon has dropped its cache (it idled, or the link broke and the session was reopened),
  the rows sent so far are sent again from position 0 once, and decoding goes on. The session
  says what the tail reads of each answer (``decoded``): a forward-only ``--adapters parallel``
  run's adds its side network's output on the answer's taps (``DecodeReply.side``).

Greedy tokens are those of the recomputing path (``generate.recompute``): the same parts, the same
function; the tests compare them.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import grpc
import torch
from torch import nn

from sft_common.proto import sft_pb2 as pb
from sft_common.topology.kv_cache import (
    CACHE_KWARGS,
    KVCache,
    cache_keyword,
    head_step,
    middle_step,
    tail_step,
)
from sft_edge.data.glue import DataError
from sft_edge.finished.parts import load_ushape, open_finished, open_model
from sft_edge.finished.record import EDGE, FULL, RUN_FILE, USHAPE, USHAPE_SIDE, RunRecord
from sft_edge.link.transport import CloudError

log = logging.getLogger("sft_edge")
Middle = Callable[[torch.Tensor, int], torch.Tensor]  # (1, q, width) rows at a position -> (1, q, width)


class CachedLM:
    """The logits after a growing sequence, each token fed once (batch 1, up to ``cap`` tokens)."""

    def __init__(self, cap: int, device: str = "cpu"):
        self.cap = cap  # the most tokens the model takes (the run's --max-seq-len)
        self.device = device
        self.seen = 0  # tokens fed so far: the caches hold their keys and values

    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """The logits (vocab,) of the token after ``ids``, which extend the tokens fed so far."""
        if not self.seen < len(ids) <= self.cap:
            raise ValueError(
                f"{len(ids)} tokens after {self.seen} fed: the model takes 1 .. {self.cap} new ones"
            )
        new = torch.tensor([list(ids[self.seen :])], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = self.step(new, self.seen)
        self.seen = len(ids)
        return logits[0, -1].float().cpu()

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (1, q, vocab) of tokens ``input_ids`` (1, q) at positions ``start ..``."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the caches (and, through a daemon, close the session)."""


class WholeLM(CachedLM):
    """A ``--local`` run's causal LM, with Hugging Face's own cache."""

    def __init__(self, model: nn.Module, cap: int, device: str):
        from transformers import DynamicCache

        super().__init__(cap, device)
        self.model = model
        self.keyword = cache_keyword(model) or CACHE_KWARGS[-1]
        self.cache: Optional[DynamicCache] = DynamicCache()

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        kwargs = {self.keyword: self.cache, "use_cache": True}
        return self.model(input_ids=input_ids, **kwargs).logits

    def close(self) -> None:
        self.cache = None


class UShapeLM(CachedLM):
    """The U's head and tail here with their caches; ``middle`` wherever it runs."""

    def __init__(
        self,
        head: nn.Module,
        middle: Middle,
        tail: nn.Module,
        cap: int,
        device: str,
        on_close: Callable[[], object] = lambda: None,
    ):
        super().__init__(cap, device)
        self.head, self.middle, self.tail = head, middle, tail
        self.caches = (KVCache(cap), KVCache(cap))  # the head's layers', the tail's
        self.on_close = on_close  # through a daemon: close the session

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        first = head_step(self.head, self.caches[0], input_ids, start)
        return tail_step(self.tail, self.caches[1], self.middle(first, start), start)

    def close(self) -> None:
        for cache in self.caches:
            cache.clear()
        self.on_close()


class LocalMiddle:
    """An exported middle, here, with the cache of its layers."""

    def __init__(self, middle: nn.Module, cap: int):
        self.middle, self.cache = middle, KVCache(cap)

    def __call__(self, cut: torch.Tensor, start: int) -> torch.Tensor:
        return middle_step(self.middle, self.cache, cut, start)


class DaemonMiddle:
    """The middle on the daemon, through a U session reopened for inference: each step's rows
    cross as one ``DecodeStep``; the daemon keeps the middle's cache for this stream."""

    def __init__(self, session):
        self.session = session  # a UShapeSession or ForwardOnlySession, inference only
        self.sent: List[torch.Tensor] = []  # the first cut's rows so far, to rebuild a dropped cache

    def __call__(self, cut: torch.Tensor, start: int) -> torch.Tensor:
        rows = cut[0].float()
        out = self._decode(rows, start)
        if out is None:  # the daemon holds no cache for this sequence (it idled; a new stream)
            log.info("the daemon holds no KV cache for this sequence: sending its %d rows again", start)
            out = self._decode(torch.cat(self.sent + [rows]), 0)
            assert out is not None
            out = out[start:]
        self.sent.append(rows)
        return out[None]

    def _decode(self, rows: torch.Tensor, position: int) -> Optional[torch.Tensor]:
        """What the tail reads (the middle's output, (n, width)) for ``rows`` (n, width) at
        ``position``; None when the daemon holds no cache to continue from."""
        wire = self.session.wire
        msg = pb.DecodeStep(position=position, activations=wire.encode_activations(rows))
        try:
            reply = self.session.request(pb.EdgeMessage(decode=msg))
        except CloudError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT and "empty message" in exc.details:
                raise CloudError(
                    exc.code,
                    "the daemon predates KV-cached generation (DecodeStep): update it, or generate with "
                    "--no-kv-cache (each token recomputes the whole sequence)",
                    local=True,
                ) from None
            raise
        decoded = reply.decoded
        if reply.WhichOneof("kind") == "decoded" and position and decoded.cached == 0:
            return None
        if reply.WhichOneof("kind") != "decoded" or decoded.cached != position + rows.shape[0]:
            raise CloudError(
                grpc.StatusCode.INTERNAL, f"expected the decoded rows from {position}, got {reply}"
            )
        return self.session.decoded(rows, decoded)


def _through_daemon(folder: str, record: RunRecord, device: str, connection) -> CachedLM:
    if connection is None:
        raise DataError(
            f"{folder} holds only the edge's parts of a U: generate through the daemon "
            "(sft-edge generate --run DIR --cloud HOST:PORT), or `sft-edge export` it first"
        )
    session = open_finished(folder, record, connection, device)
    session.module.eval()
    middle = DaemonMiddle(session)
    return UShapeLM(session.head, middle, session.tail, record.max_seq_len, device, session.close)


def _whole(folder: str, record: RunRecord, device: str, connection) -> CachedLM:
    model = open_model(folder, record, device).module
    return WholeLM(model.eval(), record.max_seq_len, device)


def _exported(folder: str, record: RunRecord, device: str, connection) -> CachedLM:
    head, middle, tail = load_ushape(folder, record, device)
    cap = record.max_seq_len
    return UShapeLM(head, LocalMiddle(middle, cap), tail, cap, device)


def _exported_side(folder: str, record: RunRecord, device: str, connection) -> CachedLM:
    """An exported ``--adapters parallel`` run: its middle here with its taps and the side network."""
    from sft_edge.finished.side_parts import SideMiddle, load_sided

    sided, cap = load_sided(folder, record, device), record.max_seq_len
    middle = SideMiddle(sided, cap)
    return UShapeLM(sided.head, middle, sided.tail, cap, device, middle.clear)


OPENERS: Dict[str, Callable[..., CachedLM]] = {
    EDGE: _through_daemon,
    FULL: _whole,
    USHAPE: _exported,
    USHAPE_SIDE: _exported_side,
}


def open_cached(folder: str, record: RunRecord, device: str = "cpu", connection=None) -> CachedLM:
    """The causal LM of the run in ``folder`` with KV caches; ``connection`` reaches the daemon
    that keeps a U run's middle."""
    try:
        opener = OPENERS[record.part]
    except KeyError:
        raise DataError(
            f"{folder}: {RUN_FILE} names a part ({record.part!r}) that does not generate"
        ) from None
    return opener(folder, record, device, connection)
