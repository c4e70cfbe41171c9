"""The gRPC servicer: moves messages between the stream and a StreamProtocol, nothing more;
and the interceptor that refuses undecodable stream messages in the handler, not in grpcio."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional

import grpc

from sft_cloud.daemon.metrics import DaemonMetrics, Timer
from sft_cloud.daemon.protocol import MAX_MESSAGE_BYTES, StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc
from sft_common.wire.errors import ProtocolError

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
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.registry = registry
        self.max_message_bytes = max_message_bytes  # what a packed message may decompress to
        self.identity = identity
        self.metrics = metrics or DaemonMetrics(sessions=registry.__len__)

    def Train(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext):
        protocol = StreamProtocol(self.registry, self.identity(context), self.max_message_bytes)
        self.metrics.streams.inc()
        try:
            for msg in request_iterator:
                kind = msg.WhichOneof("kind") or "empty"
                try:
                    with Timer() as timer:
                        reply = protocol.handle(msg)
                except ProtocolError as exc:
                    sid = protocol.session.core.session_id[:8] if protocol.session else "-"
                    log.warning("session %s: refused %s: %s", sid, kind, exc)
                    self.metrics.refuse(exc.code.name, msg.ByteSize())
                    context.abort(exc.code, exc.message)
                if kind == "packed":
                    kind = protocol.packed_kind
                self.metrics.observe(kind, msg.ByteSize(), reply.ByteSize(), timer.seconds)
                yield reply
        finally:
            self.metrics.streams.dec()
            protocol.detach()


class _Undecodable:
    """Stands in for a request whose bytes are not the method's message."""

    def __init__(self, error: Exception, nbytes: int):
        self.error = error
        self.nbytes = nbytes


class StreamDecodingInterceptor(grpc.ServerInterceptor):
    """A message of a request stream that does not decode reaches the handler as a marker, and
    the handler ends the stream with one status, as it does for any other refusal.

    Why: when grpcio's own deserializer fails on a message of a request *stream*, grpcio sends
    INTERNAL "Exception deserializing request!" and then ends the request iterator as if the
    client had half-closed. The handler returns normally and grpcio sends a second status, which
    gRPC core refuses; that batch never completes, so the call never leaves the server's books
    and ``server.stop(grace)`` never finishes (issue 19). Here the deserializer never raises, and
    the handler aborts with the status and details gRPC sends (what edges and tests expect).
    Unary requests are left to grpcio: that path sends one status.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _decoding_in_handler(handler, handler_call_details.method)


def _decoding_in_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` (a request-streaming one) with its requests decoded as the handler reads them."""
    decode = handler.request_deserializer

    def lenient(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a deserializer raises
            return _Undecodable(exc, len(data))

    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Undecodable):
                log.warning(
                    "%s: refused %d bytes that do not decode: %s", method, request.nbytes, request.error
                )
                context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            yield request

    if handler.response_streaming:
        behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    else:
        behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler

    def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behaviour(checked(requests, context), context)

    return make(run, request_deserializer=lenient, response_serializer=handler.response_serializer)
