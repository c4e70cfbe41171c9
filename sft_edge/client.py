"""Transports from the edge to a cloud session: a gRPC stream, or a session in this process.

Both take an ``EdgeMessage`` and return the ``CloudMessage`` that answers it, and both count
the serialized bytes of every message each way: that is the traffic the reports quote.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import grpc

from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc

_END = object()


class CloudError(RuntimeError):
    """The cloud refused a message or the link failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"cloud said {code.name}: {details}")
        self.code = code
        self.details = details


class Transport:
    """One session's message exchange; subclasses implement ``_exchange``."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    def call(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        self.bytes_sent += msg.ByteSize()
        reply = self._exchange(msg)
        self.bytes_received += reply.ByteSize()
        return reply

    def _exchange(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        raise NotImplementedError

    def close(self) -> None:
        pass


def channel_options() -> List[Tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        # Ping every 30 s so a silently dead link is noticed; the daemon permits this rate.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(
    target: str, credentials: Optional[grpc.ChannelCredentials] = None, connect_timeout: float = 30.0
) -> grpc.Channel:
    """A channel to the daemon, ready, or CloudError(UNAVAILABLE) after ``connect_timeout``."""
    options = channel_options()
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=connect_timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise CloudError(
            grpc.StatusCode.UNAVAILABLE,
            f"no sft-cloud daemon answered at {target} within {connect_timeout:.0f}s",
        ) from None
    return channel


class GrpcTransport(Transport):
    """One bidirectional ``Train`` stream: each message sent is answered by the next one read."""

    def __init__(self, channel: grpc.Channel, metadata: Sequence[Tuple[str, str]] = ()):
        super().__init__()
        self._requests: queue.Queue = queue.Queue()
        stub = pb_grpc.SplitTrainerStub(channel)
        self._responses = stub.Train(self._request_iter(), metadata=tuple(metadata))
        self._lock = threading.Lock()

    def _request_iter(self) -> Iterator[pb.EdgeMessage]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _exchange(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        with self._lock:
            self._requests.put(msg)
            try:
                return next(self._responses)
            except grpc.RpcError as exc:
                raise CloudError(exc.code(), exc.details() or "") from None
            except StopIteration:
                raise CloudError(grpc.StatusCode.UNAVAILABLE, "the cloud ended the stream") from None

    def close(self) -> None:
        self._requests.put(_END)
        self._responses.cancel()


class InProcessTransport(Transport):
    """A cloud session in this process, reached through the same messages, serialized and
    parsed each way as on the wire: the split without a network (tests, benchmarks)."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol  # sft_cloud.protocol.StreamProtocol

    def _exchange(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        from sft_common.errors import ProtocolError

        wire = pb.EdgeMessage.FromString(msg.SerializeToString())
        try:
            reply = self.protocol.handle(wire)
        except ProtocolError as exc:
            raise CloudError(exc.code, exc.message) from None
        return pb.CloudMessage.FromString(reply.SerializeToString())
