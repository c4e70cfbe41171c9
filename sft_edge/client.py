"""Transports from the edge to a cloud session: a gRPC stream, or a session in this process.

Both take an ``EdgeMessage`` and return the ``CloudMessage`` that answers it, and both count
the serialized bytes of every message each way: that is the traffic the reports quote.
``call(msg)`` is ``submit(msg)`` then ``result()``; a pipelined caller submits several messages
before it reads their answers, which come back in order.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Deque, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc

log = logging.getLogger("sft_edge")
_END = object()
# Failures of the link rather than refusals of a message: worth reconnecting for.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,  # e.g. RST_STREAM from a connection torn down mid-frame
    grpc.StatusCode.ABORTED,
}


class CloudError(RuntimeError):
    """The cloud refused a message or the link failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"cloud said {code.name}: {details}")
        self.code = code
        self.details = details


class Rollback(Exception):
    """The cloud re-attached the session at an earlier step (it restarted from a checkpoint):
    the edge must load its own checkpoint of ``step`` and continue from there."""

    def __init__(self, step: int):
        super().__init__(f"the cloud resumed the session at step {step}")
        self.step = step


class Transport:
    """One session's message exchange; subclasses implement ``_submit`` and ``_result``."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    def call(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        self.submit(msg)
        return self.result()

    def submit(self, msg: pb.EdgeMessage) -> None:
        """Send a message without waiting for its answer."""
        self.bytes_sent += msg.ByteSize()
        self._submit(msg)

    def result(self) -> pb.CloudMessage:
        """The answer to the oldest message submitted and not yet answered."""
        reply = self._result()
        self.bytes_received += reply.ByteSize()
        return reply

    def _submit(self, msg: pb.EdgeMessage) -> None:
        raise NotImplementedError

    def _result(self) -> pb.CloudMessage:
        raise NotImplementedError

    def close(self) -> None:
        pass


# Keepalive: ping every 10 s and give up on the connection 10 s after an unanswered ping, so a
# link that goes silent without a reset is noticed within about 20 s (the daemon permits pings
# every 5 s, so these never trigger its "too_many_pings" GOAWAY).
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options() -> List[Tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
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
        ) from None
    return channel


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
        try:
            item: Union[pb.CloudMessage, CloudError] = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            self._call.cancel()
            raise CloudError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer from the cloud within {self.timeout:.0f}s"
            ) from None
        if isinstance(item, CloudError):
            raise item
        return item

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()
        if self._owns_channel:
            self.channel.close()


class ResilientTransport(Transport):
    """A session's stream that outlives broken links.

    When the link fails (a retryable status, or no answer within the step deadline) it
    reconnects with exponential backoff, re-attaches to the same session offering the steps
    the edge can continue from (``resume_steps()``: the live step first, then its checkpoints)
    and re-sends the messages of the step in flight, from its first micro-batch: the cloud
    answers those it had applied from its cache, so nothing is applied twice, and a cloud that
    lost a partly applied step gets all of it again. Answers the caller already had are dropped.
    If the cloud can only continue from an earlier checkpoint (it restarted), ``Rollback`` tells
    the trainer to load that checkpoint.
    """

    def __init__(
        self,
        connect: Callable[[], GrpcTransport],
        resume_steps: Callable[[], List[int]],
        reconnect_timeout: float = 300.0,
        backoff: Tuple[float, float] = (0.25, 10.0),
    ):
        super().__init__()
        self._connect = connect
        self.resume_steps = resume_steps
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff
        self.resumes = 0  # successful re-attachments
        self._open: Optional[pb.OpenSession] = None
        self._inner = connect()
        # Messages of the step in flight: the first `_answered` have had their answers returned.
        self._log: List[pb.EdgeMessage] = []
        self._answered = 0
        self._skip = 0  # answers to re-sent messages the caller already had

    def call(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        if msg.WhichOneof("kind") == "open":
            self._send(msg)
            reply = self._receive()
            self._open = pb.OpenSession()
            self._open.CopyFrom(msg.open)
            self._open.session_id = reply.opened.session_id
            return reply
        return super().call(msg)

    def _send(self, msg: pb.EdgeMessage) -> None:
        """On the current stream; every byte counts, re-sent ones too (they cross the link)."""
        self._inner.submit(msg)
        self.bytes_sent += msg.ByteSize()

    def _receive(self) -> pb.CloudMessage:
        reply = self._inner.result()
        self.bytes_received += reply.ByteSize()
        return reply

    def submit(self, msg: pb.EdgeMessage) -> None:
        self._log.append(msg)
        self._send(msg)

    def result(self) -> pb.CloudMessage:
        while True:
            try:
                reply = self._receive()
            except CloudError as exc:
                if exc.code not in RETRYABLE or self._open is None:
                    raise
                log.warning("link to the cloud failed (%s): reconnecting", exc)
                self._reattach()
                for msg in self._log:
                    self._send(msg)
                self._skip = self._answered
                continue
            if self._skip:
                self._skip -= 1
                continue
            msg = self._log[self._answered]
            self._answered += 1
            if _ends_step(msg):  # both sides are past it: nothing to re-send any more
                del self._log[: self._answered]
                self._answered = 0
            return reply

    def _reattach(self) -> None:
        assert self._open is not None
        deadline = time.monotonic() + self.reconnect_timeout
        delay = self.backoff[0]
        while True:
            self._inner.close()
            steps = self.resume_steps()
            attach = pb.OpenSession()
            attach.CopyFrom(self._open)
            attach.resume_steps[:] = steps
            try:
                self._inner = self._connect()
                self._send(pb.EdgeMessage(open=attach))
                reply = self._receive()
            except CloudError as exc:
                if exc.code not in RETRYABLE or time.monotonic() + delay > deadline:
                    raise CloudError(exc.code, f"could not re-attach to the session: {exc.details}") from None
                time.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            self.resumes += 1
            opened = reply.opened
            log.warning("re-attached to session %s at step %d", self._open.session_id[:8], opened.next_step)
            if steps and opened.next_step != steps[0]:
                self._log, self._answered = [], 0  # the trainer starts over from a checkpoint
                raise Rollback(opened.next_step)
            return

    def close(self) -> None:
        self._inner.close()


def _ends_step(msg: pb.EdgeMessage) -> bool:
    """Whether the answer to ``msg`` completes the step in flight (or it is no training step)."""
    if msg.WhichOneof("kind") != "train":
        return True
    return msg.train.micro >= msg.train.micro_count - 1


class InProcessTransport(Transport):
    """A cloud session in this process, reached through the same messages, serialized and
    parsed each way as on the wire: the split without a network (tests, benchmarks)."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol = protocol  # sft_cloud.protocol.StreamProtocol
        self._answers: Deque[Union[pb.CloudMessage, CloudError]] = collections.deque()

    def _submit(self, msg: pb.EdgeMessage) -> None:
        """Handled at once (no overlap in one process); the answer waits for ``result()``."""
        from sft_common.errors import ProtocolError

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
