"""KV-cached generation on the cloud: the U's middle with the key/value cache of its layers.

A label-private causal LM's finished session, reopened for inference (``inference_only``),
answers ``DecodeStep``s (the .proto says the contract): the rows of one sequence from a position
on, through the middle's layers with the keys and values of the earlier rows cached
(``sft_common.topology.kv_cache``), so a new token costs the middle one row, not the whole
sequence. ``CachedMiddle`` is made by the stream's protocol at its first ``DecodeStep``
(``cached_middle``, which refuses every other kind of session) and lives with the stream: at most
the session's ``max_seq_len`` tokens (the cap the session's training had), freed when the stream
ends or closes, or when it idles past the daemon's idle timeout (the registry's sweep).
A forward-only session with a side width (``--adapters parallel``) also answers each step with the
new rows' taps, its middle's layers' outputs projected by the session's P
(``sft_common.topology.side.tapped``), as its ``EvalReply.side``: the edge's side network reads them.
Every field is checked before anything changes: a refused step leaves the cache as it was.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import nullcontext
from typing import Any, ContextManager, List, Optional

import grpc
import torch

from sft_cloud.sessions.validation import invalid
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.kv_cache import KVCache, middle_step, placement_of
from sft_common.topology.side import tapped
from sft_common.wire.errors import ProtocolError

log = logging.getLogger("sft_cloud")


def refused(message: str) -> ProtocolError:
    """The request is well formed but this session or cache cannot serve it now."""
    return ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, message)


def cached_middle(session: Any) -> CachedMiddle:
    """A KV cache over ``session``'s middle; FAILED_PRECONDITION for a session that cannot
    decode: one still training, a two-part one (its net2 ends in a classifier), an encoder."""
    if not session.core.inference_only:
        raise refused(
            "decode is for a finished session reopened for inference: close the run's session first "
            "(training ends it), then generate"
        )
    if not session.config.label_private:
        raise refused("decode is for a label-private (U-shaped) causal LM: this session is a two-part split")
    try:
        placement_of(session.net2.family)
    except ValueError as exc:
        raise refused(str(exc)) from None
    return CachedMiddle(session)


class CachedMiddle:
    """One sequence's key/value cache over an inference session's middle (batch 1)."""

    def __init__(self, session: Any):
        self.session = session  # a MiddleSession, inference only, or a FrozenMiddleSession
        self.cache = KVCache(session.config.max_seq_len)
        # a forward-only session's side projection P (side_width > 0), else None: no taps
        self.projection: Optional[torch.Tensor] = session.projection
        self.last_active = time.monotonic()
        self.lock = threading.Lock()  # a step, or the sweep freeing the cache: one at a time

    def decode(self, msg: pb.DecodeStep) -> pb.DecodeReply:
        """The middle's output at the second cut for the rows of ``msg``, the cache extended; or,
        holding no cache for a later position (a new stream, a cache freed when idle), ``cached`` 0
        and no rows: the edge sends the sequence again from position 0."""
        with self.lock:
            self.last_active = time.monotonic()
            x = self._checked(msg)
            if x is None:
                return pb.DecodeReply(position=msg.position, cached=0)
            session = self.session
            if msg.position == 0:
                self.cache.clear()  # a new sequence
            with session.core.lock, torch.no_grad(), session.core.compute_lock, self._tapped() as taps:
                session.net2.eval()
                rows = middle_step(session.net2, self.cache, x[None], msg.position)[0].float()
            side = torch.cat(taps, dim=-1)[0].float() if self.projection is not None else None
            if not all(bool(torch.isfinite(t).all()) for t in (rows, side) if t is not None):
                self.cache.clear()
                raise invalid(
                    f"decode at position {msg.position}: the middle's output is not finite (activations too "
                    "large?); the cache is dropped: start again at position 0"
                )
            reply = pb.DecodeReply(
                position=msg.position,
                activations=session.inputs.encode_activations(rows),
                cached=self.cache.length,
            )
            if side is not None:
                reply.side.CopyFrom(session.inputs.encode_activations(side))
            return reply

    def _tapped(self) -> ContextManager[List[torch.Tensor]]:
        """While open, the middle's layers' outputs times P, (1, n, d) each, in layer order; no
        taps without a side width."""
        if self.projection is None:
            return nullcontext([])
        return tapped(self.session.net2.layers, self.projection)

    def _checked(self, msg: pb.DecodeStep) -> Optional[torch.Tensor]:
        """The rows of ``msg`` (n, width), every field checked before anything is allocated:
        INVALID_ARGUMENT for what no cache could take, FAILED_PRECONDITION for a later position
        than this cache holds (as out-of-order steps are refused); None when it holds nothing."""
        cap, position = self.cache.cap, msg.position
        if not msg.HasField("activations"):
            raise invalid("decode without activations: send the head's rows at the first cut")
        shape = list(msg.activations.shape)
        if position < 0:
            raise invalid(f"decode position must be >= 0, got {position}")
        if len(shape) != 2 or shape[0] < 1:
            raise invalid(f"decode activations must be (rows >= 1, {self.session.width}), got shape {shape}")
        if position + shape[0] > cap:
            raise invalid(
                f"decode of {shape[0]} rows at position {position} would cache {position + shape[0]} tokens; "
                f"this session caches at most {cap} (its max_seq_len)"
            )
        if position and not self.cache.length:
            return None  # nothing cached (a new stream, or freed when idle): the edge starts again
        if position not in (0, self.cache.length):
            raise refused(
                f"decode at position {position}, but the cache holds {self.cache.length} tokens of this "
                "sequence: send the next rows, or start again at position 0"
            )
        return self.session.inputs.decode(msg.activations, [shape[0]])  # (rows, width), within the caps

    def free(self) -> None:
        """Drop the cached keys and values (the stream ended, or the session closed)."""
        with self.lock:
            self.cache.clear()

    def free_if_idle(self, now: float, timeout: float) -> bool:
        """Free the cache if it holds tokens and was not used for ``timeout`` seconds."""
        with self.lock:
            if not self.cache.length or now - self.last_active <= timeout:
                return False
            self.cache.clear()
            return True

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


class IdleCaches:
    """The KV caches of the streams generating now (weakly: a stream's cache ends with it), for
    the registry's sweep to free those that idle."""

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[CachedMiddle] = weakref.WeakSet()
        self._lock = threading.Lock()

    def track(self, cache: CachedMiddle) -> None:
        with self._lock:
            self._caches.add(cache)

    def free_idle(self, now: float, timeout: float) -> int:
        """Free the caches not used for ``timeout`` seconds; returns how many."""
        with self._lock:
            caches = list(self._caches)
        freed = sum(cache.free_if_idle(now, timeout) for cache in caches)
        if freed:
            log.info("freed the KV cache of %d generation(s) idle for over %.0fs", freed, timeout)
        return freed


__all__ = ["CachedMiddle", "IdleCaches", "cached_middle", "refused"]
