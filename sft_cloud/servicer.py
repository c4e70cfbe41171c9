"""The gRPC servicer: moves messages between the stream and a StreamProtocol, nothing more."""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import grpc

from sft_cloud.metrics import DaemonMetrics, Timer
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
        self,
        registry: SessionRegistry,
        identity: Callable[[grpc.ServicerContext], str] = anonymous,
        metrics: Optional[DaemonMetrics] = None,
    ):
        self.registry = registry
        self.identity = identity
        self.metrics = metrics or DaemonMetrics(sessions=registry.__len__)

    def Train(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        protocol = StreamProtocol(self.registry, self.identity(context))
        self.metrics.streams.inc()
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind") or "empty"
                try:
                    with Timer() as timer:
                        reply = protocol.handle(msg)
                except ProtocolError as exc:
                    sid = protocol.session.session_id[:8] if protocol.session else "-"
                    log.warning("session %s: refused %s: %s", sid, kind, exc)
                    self.metrics.refuse(exc.code.name, msg.ByteSize())
                    context.abort(exc.code, exc.message)
                self.metrics.observe(kind, msg.ByteSize(), reply.ByteSize(), timer.seconds)
                yield reply
        finally:
            self.metrics.streams.dec()
            protocol.detach()
