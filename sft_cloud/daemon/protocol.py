"""The per-stream state machine: the first message opens a session, the rest drive it (packed, where
the edge asked: ``sft_common.wire.stream``)."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import grpc

from sft_cloud.daemon.config import ServeConfig
from sft_cloud.sessions import finished
from sft_cloud.sessions.core import Session
from sft_cloud.sessions.inference import CachedMiddle, cached_middle
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.wire.errors import ProtocolError
from sft_common.wire.stream import Packer, Unpacker

log = logging.getLogger("sft_cloud")


TRAINING = ("train", "forward_up", "gradient_up")  # what each session kind answers with step()
MAX_MESSAGE_BYTES = ServeConfig().max_message_bytes  # the daemon's default gRPC cap (--max-message-mb)


class StreamProtocol:
    """Turns each EdgeMessage of one stream into exactly one CloudMessage (or a ProtocolError)."""

    def __init__(self, registry: SessionRegistry, owner: str, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.registry = registry
        self.owner = owner
        self.session: Optional[Session] = None
        self.closed = False
        self.decoding: Optional[CachedMiddle] = None  # the KV cache of this stream's generation
        self.max_message_bytes = max_message_bytes
        self.packing: Optional[Tuple[Unpacker, Packer]] = None  # once the open asked for it
        self.packed_kind = ""  # the kind of the last packed message (the daemon's metrics label it so)

    def handle(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        """The answer to ``msg``; a packed message is answered packed. The session counts the
        bytes as they crossed (packed, where they were)."""
        kind = msg.WhichOneof("kind")
        reply = self._answer(msg) if kind != "packed" else self._packed(msg)
        if self.session is not None and kind != "open":
            self.session.core.bytes_received += msg.ByteSize()
            self.session.core.bytes_sent += reply.ByteSize()
        return reply

    def _packed(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        if self.packing is None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "a packed message on a stream whose open did not ask for packing",
            )
        unpacker, packer = self.packing
        inner = unpacker.unpack(msg.packed, self.max_message_bytes, self._refuse_packed)
        try:
            inner_msg = pb.EdgeMessage.FromString(inner)
        except Exception as exc:  # protobuf's DecodeError
            raise self._refuse_packed(f"it does not hold an EdgeMessage ({exc})") from None
        self.packed_kind = inner_msg.WhichOneof("kind") or "empty"
        if self.packed_kind in ("packed", "open"):
            raise self._refuse_packed(f"it holds a {self.packed_kind} message")
        reply = self._answer(inner_msg)
        return pb.CloudMessage(packed=packer.pack(reply.SerializeToString()))

    @staticmethod
    def _refuse_packed(why: str) -> ProtocolError:
        return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"packed message refused: {why}")

    def _answer(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        kind = msg.WhichOneof("kind")
        if self.closed:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "the session is closed")
        if kind == "open":
            return self._open(msg.open)
        if kind is None:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "empty message")
        if self.session is None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{kind} before open: open a session first"
            )
        core = self.session.core
        core.touch()
        reply = self._handle(kind, msg)
        if kind == "checkpoint":
            self._log("checkpointed at step %d", msg.checkpoint.step)
        elif kind == "close" and not core.inference_only:
            self._log(
                "closed after %d steps (%d bytes received, %d sent)",
                core.next_step,
                core.bytes_received,
                core.bytes_sent,
            )
        return reply

    def _open(self, msg: pb.OpenSession) -> pb.CloudMessage:
        if self.session is not None:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already has a session")
        session = self.registry.open(msg, self.owner)
        step, restored = session.core.resume(msg.resume_steps) if msg.resume_steps else (None, False)
        session.core.attached += 1
        self.session = session
        opened = session.opened(at=step)
        opened.restored = restored
        if msg.pack_stream:  # every later message of this stream may come packed
            self.packing = (Unpacker(), Packer())
            opened.stream_packed = True
        self._log_open(msg, opened, restored)
        return pb.CloudMessage(opened=opened)

    def _handle(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        session = self.session
        assert session is not None
        core = session.core
        if kind in TRAINING:  # the session says which of them are its steps
            return session.step(kind, msg)
        if kind == "checkpoint":
            return pb.CloudMessage(checkpointed=session.checkpoint(msg.checkpoint))
        if kind == "eval":
            return pb.CloudMessage(eval=session.evaluate(msg.eval))
        if kind == "decode":
            return pb.CloudMessage(decoded=self._decoding(session).decode(msg.decode))
        if kind == "fetch":
            return pb.CloudMessage(weights=finished.weights_chunk(core, msg.fetch.chunk))
        if kind == "forget":
            self._free_cache()
            self.registry.forget(session)
            self.closed = True
            return pb.CloudMessage(forgotten=pb.Forgotten(session_id=core.session_id))
        self._free_cache()  # close: the stream's KV cache first
        # keep net2's trained weights (with a checkpoint dir), then drop the session
        if not core.inference_only:
            with core.lock:
                core.save_final()
        self.registry.close(core.session_id)
        self.closed = True
        return pb.CloudMessage(closed=pb.SessionClosed(steps=core.next_step))

    def _decoding(self, session: Session) -> CachedMiddle:
        """The stream's KV-cached generation, made at its first DecodeStep (refused for a session
        that cannot decode); the registry frees its cache when it idles."""
        if self.decoding is None:
            self.decoding = cached_middle(session)
            self.registry.caches.track(self.decoding)
        return self.decoding

    def _free_cache(self) -> None:
        if self.decoding is not None:
            self.decoding.free()
            self.decoding = None

    def _log(self, what: str, *args) -> None:
        """One INFO line per session event, with the session id's prefix and the peer identity."""
        assert self.session is not None
        sid, peer = self.session.core.session_id[:8], self.owner[:24]
        log.info("session %s: " + what + " [peer %s]", sid, *args, peer, extra={"session": sid, "peer": peer})

    def _log_open(self, msg: pb.OpenSession, opened: pb.SessionOpened, restored: bool) -> None:
        if msg.inference_only or self.session is None:
            return  # the registry logs a reopening for inference
        if not msg.session_id:
            self._log("opened: %s, %s", self.session.config.model, self.session.describe())
        else:
            how = " (restored from its checkpoint)" if restored else ""
            self._log("resumed at step %d%s", opened.next_step, how)

    def detach(self) -> None:
        """The stream ended (normally or not): the session may now be evicted when idle; its
        KV cache (generation) is freed now."""
        self._free_cache()
        if self.session is not None and not self.closed:
            self.session.core.attached -= 1
            self.session.core.touch()
