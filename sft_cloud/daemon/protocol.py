"""The per-stream state machine: the first message opens a session, the rest drive it."""

from __future__ import annotations

import logging
from typing import Optional

import grpc

from sft_cloud.sessions import finished
from sft_cloud.sessions.middle import MiddleSession
from sft_cloud.sessions.registry import SessionRegistry
from sft_cloud.sessions.two_part import CloudSession
from sft_common.proto import sft_pb2 as pb
from sft_common.wire.errors import ProtocolError

log = logging.getLogger("sft_cloud")


class StreamProtocol:
    """Turns each EdgeMessage of one stream into exactly one CloudMessage (or a ProtocolError)."""

    def __init__(self, registry: SessionRegistry, owner: str):
        self.registry = registry
        self.owner = owner
        self.session: Optional[CloudSession] = None
        self.closed = False

    def handle(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        kind = msg.WhichOneof("kind")
        if self.closed:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "the session is closed")
        if kind == "open":
            if self.session is not None:
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "this stream already has a session")
            session = self.registry.open(msg.open, self.owner)
            step, restored = session.resume(msg.open.resume_steps) if msg.open.resume_steps else (None, False)
            session.attached += 1
            self.session = session
            opened = session.opened(at=step)
            opened.restored = restored
            self._log_open(msg.open, opened, restored)
            return pb.CloudMessage(opened=opened)
        if kind is None:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "empty message")
        if self.session is None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{kind} before open: open a session first"
            )
        self.session.touch()
        reply = self._handle(kind, msg)
        self.session.bytes_received += msg.ByteSize()
        self.session.bytes_sent += reply.ByteSize()
        if kind == "checkpoint":
            self._log("checkpointed at step %d", msg.checkpoint.step)
        elif kind == "close" and not self.session.inference_only:
            s = self.session
            self._log(
                "closed after %d steps (%d bytes received, %d sent)",
                s.next_step,
                s.bytes_received,
                s.bytes_sent,
            )
        return reply

    def _handle(self, kind: str, msg: pb.EdgeMessage) -> pb.CloudMessage:
        assert self.session is not None
        if kind == "train":
            return pb.CloudMessage(train=self.session.train(msg.train))
        if kind in ("forward_up", "gradient_up"):
            session = self.session
            if not isinstance(session, MiddleSession):
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{kind} is for label-private sessions (the U-shape); this one is a two-part split",
                )
            if kind == "forward_up":
                return pb.CloudMessage(forward_down=session.forward_up(msg.forward_up))
            return pb.CloudMessage(gradient_down=session.gradient_up(msg.gradient_up))
        if kind == "checkpoint":
            return pb.CloudMessage(checkpointed=self.session.checkpoint(msg.checkpoint))
        if kind == "eval":
            return pb.CloudMessage(eval=self.session.evaluate(msg.eval))
        if kind == "fetch":
            return pb.CloudMessage(weights=finished.weights_chunk(self.session, msg.fetch.chunk))
        if kind == "forget":
            self.registry.forget(self.session)
            self.closed = True
            return pb.CloudMessage(forgotten=pb.Forgotten(session_id=self.session.session_id))
        # close: keep net2's trained weights (with a checkpoint dir), then drop the session
        if not self.session.inference_only:
            with self.session.lock:
                self.session.save_final()
        self.registry.close(self.session.session_id)
        self.closed = True
        return pb.CloudMessage(closed=pb.SessionClosed(steps=self.session.next_step))

    def _log(self, what: str, *args) -> None:
        """One INFO line per session event, with the session id's prefix and the peer identity."""
        assert self.session is not None
        sid, peer = self.session.session_id[:8], self.owner[:24]
        log.info("session %s: " + what + " [peer %s]", sid, *args, peer, extra={"session": sid, "peer": peer})

    def _log_open(self, msg: pb.OpenSession, opened: pb.SessionOpened, restored: bool) -> None:
        c = self.session.config if self.session else msg.config
        if msg.inference_only:
            return  # the registry logs a reopening for inference
        if not msg.session_id:
            mode = ("sft" if c.mode == pb.SFT else "sl") + (
                f" label-private (U-shape, {c.tail_layers} tail layers)" if c.label_private else ""
            )
            self._log(
                "opened: %s, %s at layer %d, rank %d, %d labels",
                c.model,
                mode,
                c.split_layer,
                c.rank,
                c.num_labels,
            )
        else:
            how = " (restored from its checkpoint)" if restored else ""
            self._log("resumed at step %d%s", opened.next_step, how)

    def detach(self) -> None:
        """The stream ended (normally or not): the session may now be evicted when idle."""
        if self.session is not None and not self.closed:
            self.session.attached -= 1
            self.session.touch()
