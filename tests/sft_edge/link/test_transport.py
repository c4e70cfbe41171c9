"""Transports: the base class counts every message's bytes once, listeners see every message,
and a gRPC stream turns a dead or silent link into a CloudError with the right status."""

from __future__ import annotations

import grpc
import pytest
from helpers import session_config

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_edge.link.transport import CloudError, GrpcTransport, InProcessTransport, connector, open_channel


def _open(base, **kw) -> pb.EdgeMessage:
    config = session_config(**kw)
    spec = SplitSpec(split_layer=config.split_layer, rank=config.rank)
    return pb.EdgeMessage(
        open=pb.OpenSession(config=config, fingerprint=session_fingerprint(base.fingerprint, spec, 2))
    )


def test_bytes_are_counted_once_and_listeners_see_each_message_in_order(tiny_base):
    registry = SessionRegistry(device="cpu")
    transport = InProcessTransport(StreamProtocol(registry, "tester"))
    seen = []
    transport.listeners.append(
        lambda direction, msg, when: seen.append((direction, msg.WhichOneof("kind"), when))
    )
    opened = transport.call(_open(tiny_base))
    closed = transport.call(pb.EdgeMessage(close=pb.CloseSession()))
    assert [s[:2] for s in seen] == [
        ("sent", "open"),
        ("received", "opened"),
        ("sent", "close"),
        ("received", "closed"),
    ]
    assert [s[2] for s in seen] == sorted(s[2] for s in seen)
    assert (
        transport.bytes_sent
        == _open(tiny_base).ByteSize() + pb.EdgeMessage(close=pb.CloseSession()).ByteSize()
    )
    assert transport.bytes_received == opened.ByteSize() + closed.ByteSize()


def test_a_refusal_comes_back_as_a_cloud_error_with_its_status(tiny_base):
    transport = InProcessTransport(StreamProtocol(SessionRegistry(device="cpu"), "tester"))
    with pytest.raises(CloudError) as caught:
        transport.call(pb.EdgeMessage(train=pb.TrainStep(step=0)))  # before open
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "open a session first" in str(
        caught.value
    )


def test_grpc_stream_counts_what_the_daemon_counts(live_server, tiny_base):
    address, registry = live_server
    transport = connector(address)()
    reply = transport.call(_open(tiny_base))
    assert reply.opened.session_id and transport.bytes_sent == _open(tiny_base).ByteSize()
    assert transport.bytes_received == reply.ByteSize()
    transport.call(pb.EdgeMessage(close=pb.CloseSession()))
    transport.close()


def test_no_answer_within_the_timeout_is_a_deadline(live_server, tiny_base):
    address, registry = live_server
    transport = GrpcTransport(open_channel(address), timeout=0.5)
    transport.submit(_open(tiny_base))
    transport.result()
    with pytest.raises(CloudError) as caught:
        transport.result()  # nothing was asked: nothing comes
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    transport.close()


def test_nobody_listening_is_unavailable_after_the_connect_timeout():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody listens on it
    with pytest.raises(CloudError) as caught:
        open_channel(f"127.0.0.1:{port}", connect_timeout=0.5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "no sft-cloud daemon answered" in str(
        caught.value
    )
