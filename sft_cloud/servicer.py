"""The gRPC servicer: moves messages between the stream and a StreamProtocol, nothing more."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import grpc

from sft_cloud.protocol import StreamProtocol
from sft_cloud.registry import SessionRegistry
from sft_common.errors import ProtocolError
from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc

log = logging.getLogger("sft_cloud")


def anonymous(context: grpc.ServicerContext) -> str:
    """The identity of an unauthenticated caller (``--insecure`` without tokens)."""
    return "anonymous"


class SplitTrainerServicer(pb_grpc.SplitTrainerServicer):
    def __init__(
        self, registry: SessionRegistry, identity: Callable[[grpc.ServicerContext], str] = anonymous
    ):
        self.registry = registry
        self.identity = identity

    def Train(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        protocol = StreamProtocol(self.registry, self.identity(context))
        try:
            for msg in request_iterator:
                try:
                    reply = protocol.handle(msg)
                except ProtocolError as exc:
                    sid = protocol.session.session_id[:8] if protocol.session else "-"
                    log.warning("session %s: refused %s: %s", sid, msg.WhichOneof("kind"), exc)
                    context.abort(exc.code, exc.message)
                yield reply
        finally:
            protocol.detach()
