"""Moving messages between the edge and a cloud session: a gRPC stream, or a session in this process.

A transport takes an ``EdgeMessage`` and returns the ``CloudMessage`` that answers it, and the
base class counts the serialized bytes of every message each way: that is the traffic the
reports quote. ``call(msg)`` is ``submit(msg)`` then ``result()``; a pipelined caller submits
several messages before it reads their answers, which come back in order. A transport knows
no message kind but the open (which may ask to pack the stream): re-attaching and re-sending
after a broken link is the session's job (``sft_edge.sessions.client``), and a new stream packs
anew.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
from google.protobuf.message import Message

from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc
from sft_common.wire.stream import Packer, Unpacker

_END = object()
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # gRPC's cap each way, and what a packed answer may unpack to
# Failures of the link rather than refusals of a message: worth reconnecting for.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,  # e.g. RST_STREAM from a connection torn down mid-frame
    grpc.StatusCode.ABORTED,
}


class CloudError(RuntimeError):
    """The cloud refused a message or the link failed; ``code`` is the gRPC status code.
    ``local``: this edge concluded it (no daemon reached), so the message does not say the
    cloud said anything."""

    def __init__(self, code: grpc.StatusCode, details: str, local: bool = False):
        super().__init__(details if local else f"cloud said {code.name}: {details}")
        self.code = code
        self.details = details


# A listener sees every message that crosses, as ("sent" | "received", message, monotonic time):
# benchmarks time the link and the cloud with it, tests record what crosses.
Listener = Callable[[str, Message, float], None]


class Transport:
    """One stream's message exchange; subclasses implement ``_submit`` and ``_result``.

    An open that asks to pack the stream (``OpenSession.pack_stream``, ``sft_common.wire.stream``)
    and a cloud that agrees make every later message each way travel packed: the transport packs
    and unpacks, counts the bytes as they crossed and shows its listeners the messages themselves.
    """

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.listeners: List[Listener] = []
        self._asked_to_pack = False
        self._packing: Optional[Tuple[Packer, Unpacker]] = None

    def call(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        self.submit(msg)
        return self.result()

    def submit(self, msg: pb.EdgeMessage) -> None:
        """Send a message without waiting for its answer."""
        wire = msg
        if msg.WhichOneof("kind") == "open":
            self._asked_to_pack = msg.open.pack_stream
        elif self._packing is not None:
            wire = pb.EdgeMessage(packed=self._packing[0].pack(msg.SerializeToString()))
        self.bytes_sent += wire.ByteSize()
        for listener in self.listeners:
            listener("sent", msg, time.monotonic())
        self._submit(wire)

    def result(self) -> pb.CloudMessage:
        """The answer to the oldest message submitted and not yet answered."""
        reply = self._result()
        self.bytes_received += reply.ByteSize()
        kind = reply.WhichOneof("kind")
        if kind == "packed":
            reply = self._unpacked(reply.packed)
        elif kind == "opened" and self._asked_to_pack and reply.opened.stream_packed:
            self._packing = (Packer(), Unpacker())
        for listener in self.listeners:
            listener("received", reply, time.monotonic())
        return reply

    def _unpacked(self, data: bytes) -> pb.CloudMessage:
        def refuse(why: str) -> CloudError:
            return CloudError(
                grpc.StatusCode.DATA_LOSS, f"refused the cloud's packed answer: {why}", local=True
            )

        if self._packing is None:
            raise refuse("this stream is not packed")
        inner = self._packing[1].unpack(data, MAX_MESSAGE_BYTES, refuse)
        try:
            reply = pb.CloudMessage.FromString(inner)
        except Exception as exc:  # protobuf's DecodeError
            raise refuse(f"it does not hold a CloudMessage ({exc})") from None
        if reply.WhichOneof("kind") in (None, "packed"):
            raise refuse("it holds no answer")
        return reply

    def _submit(self, msg: pb.EdgeMessage) -> None:
        raise NotImplementedError

    def _result(self) -> pb.CloudMessage:
        raise NotImplementedError

    def close(self) -> None:
        pass


NOTE_EVERY_S = 10.0  # how often a wait for an answer says that it is still waiting
log = logging.getLogger("sft_edge")

# Keepalive: ping every 10 s and give up on the connection 10 s after an unanswered ping, so a
# link that goes silent without a reset is noticed within about 20 s (the daemon permits pings
# every 5 s, so these never trigger its "too_many_pings" GOAWAY).
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options() -> List[Tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
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
            local=True,
        ) from None
    return channel


def connector(
    target: str,
    credentials: Optional[grpc.ChannelCredentials] = None,
    metadata: Sequence[Tuple[str, str]] = (),
    timeout: Optional[float] = None,
    connect_timeout: float = 30.0,
) -> Callable[[], GrpcTransport]:
    """A factory of fresh streams to ``target``, each on its own channel: what a session calls
    to connect, and again to reconnect after a broken link."""

    def connect() -> GrpcTransport:
        channel = open_channel(target, credentials, connect_timeout)
        return GrpcTransport(channel, metadata, timeout=timeout, owns_channel=True)

    return connect


class GrpcTransport(Transport):
    """One bidirectional ``Train`` stream: each message sent is answered by the next one read.

    A reader thread moves replies into a queue, so waiting for one can time out: a reply that
    does not come within ``timeout`` seconds ends the stream with DEADLINE_EXCEEDED.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: Sequence[Tuple[str, str]] = (),
        timeout: Optional[float] = None,
        owns_channel: bool = False,
    ):
        super().__init__()
        self.channel = channel
        self.timeout = timeout
        self._owns_channel = owns_channel
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        stub = pb_grpc.SplitTrainerStub(channel)
        self._call = stub.Train(self._request_iter(), metadata=tuple(metadata))
        self._reader = threading.Thread(target=self._read, name="sft-reader", daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[pb.EdgeMessage]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(CloudError(grpc.StatusCode.UNAVAILABLE, "the cloud ended the stream"))
        except grpc.RpcError as exc:
            self._replies.put(CloudError(exc.code(), exc.details() or ""))

    def _submit(self, msg: pb.EdgeMessage) -> None:
        self._requests.put(msg)

    def _result(self) -> pb.CloudMessage:
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            left = None if self.timeout is None else self.timeout - waited
            if left is not None and left <= 0:
                self._call.cancel()
                raise CloudError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from the cloud within {self.timeout:.0f}s"
                )
            try:
                item: Union[pb.CloudMessage, CloudError] = self._replies.get(
                    timeout=NOTE_EVERY_S if left is None else min(left, NOTE_EVERY_S)
                )
                break
            except queue.Empty:  # a silent link: say what is awaited, every few seconds
                waited = time.monotonic() - started
                if waited >= NOTE_EVERY_S - 0.01:
                    limit = (
                        ""
                        if self.timeout is None
                        else f" of the {self.timeout:.0f}s allowed (--step-timeout)"
                    )
                    log.info("waiting for the cloud's answer: %.0fs%s", waited, limit)
        if isinstance(item, CloudError):
            raise item
        return item

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
        if self._owns_channel:
            self.channel.close()


class InProcessTransport(Transport):
    """A cloud session in this process, reached through the same messages, serialized and
    parsed each way as on the wire: the split without a network (tests, benchmarks)."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol  # sft_cloud.daemon.protocol.StreamProtocol
        self._answers: Deque[Union[pb.CloudMessage, CloudError]] = collections.deque()

    def _submit(self, msg: pb.EdgeMessage) -> None:
        """Handled at once (no overlap in one process); the answer waits for ``result()``."""
        from sft_common.wire.errors import ProtocolError

        wire = pb.EdgeMessage.FromString(msg.SerializeToString())
        try:
            reply = self.protocol.handle(wire)
        except ProtocolError as exc:
            self._answers.append(CloudError(exc.code, exc.message))
            return
        self._answers.append(pb.CloudMessage.FromString(reply.SerializeToString()))

    def _result(self) -> pb.CloudMessage:
        answer = self._answers.popleft()
        if isinstance(answer, CloudError):
            raise answer
        return answer
