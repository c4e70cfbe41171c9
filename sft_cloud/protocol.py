"""The per-stream state machine: the first message opens a session, the rest drive it."""

from __future__ import annotations

from typing import Optional

import grpc

from sft_cloud.registry import SessionRegistry
from sft_cloud.session import CloudSession
from sft_common.errors import ProtocolError
from sft_common.proto import sft_pb2 as pb


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
            self.session = self.registry.open(msg.open, self.owner)
            return pb.CloudMessage(opened=self.session.opened())
        if kind is None:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "empty message")
        if self.session is None:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{kind} before open: open a session first"
            )
        if kind == "train":
            return pb.CloudMessage(train=self.session.train(msg.train))
        if kind == "eval":
            return pb.CloudMessage(eval=self.session.evaluate(msg.eval))
        # close
        self.registry.close(self.session.session_id)
        self.closed = True
        return pb.CloudMessage(closed=pb.SessionClosed(steps=self.session.next_step))
