"""A packed stream (``--compression zstd-stream``, ``sft_common.wire.stream``) through a real daemon.

Packing is lossless, so a packed run equals the same run with per-tensor zstd step for step,
bitwise; every message after the open crosses packed each way; a message that repeats an
earlier one costs almost nothing; a broken link re-attaches on a new stream that packs anew; and
what is not the stream's next block, or unpacks past the cap, is refused with one status.
"""

from __future__ import annotations

import grpc
import pytest

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire.errors import ProtocolError
from sft_common.wire.stream import Packer
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.link.transport import CloudError, GrpcTransport, InProcessTransport, open_channel
from sft_edge.runs.config import LinkOptions
from sft_edge.sessions.forward_only import ForwardOnlySession
from sft_edge.sessions.ushape import UShapeSession
from tests.test_ushape_lm_grpc import OPTIM, lm_batches

LORA = LoraSpec(rank=4, alpha=8.0)
SPEC = UShapeSpec(split_layer=0, tail_layers=1, mode="sl")
WIRE = "int4-6-hadamard-grad4"  # the decoder U's default wire


class WireRecorder(GrpcTransport):
    """A gRPC transport that keeps the kind and size of every message as it crossed."""

    def __init__(self, address: str, crossed: list):
        super().__init__(open_channel(address), owns_channel=True)
        self.crossed = crossed

    def _submit(self, msg):
        self.crossed.append(("sent", msg.WhichOneof("kind"), msg.ByteSize()))
        super()._submit(msg)

    def _result(self):
        reply = super()._result()
        self.crossed.append(("received", reply.WhichOneof("kind"), reply.ByteSize()))
        return reply


def u_session(connect, compression: str) -> UShapeSession:
    return UShapeSession(
        load_base_model("random:tiny-llama"), SPEC, 0, connect, OPTIM, batch_size=8, max_seq_len=32,
        link=LinkOptions(wire_dtype=WIRE, compression=compression), lora=LORA, causal_lm=True,
    )  # fmt: skip


def test_a_packed_u_run_equals_the_unpacked_one_and_crosses_packed(live_server):
    """The U over the decoder default's wire, 4 steps: zstd-stream's losses equal zstd's exactly;
    after the open and its answer every message crossed packed, and the edge's listeners saw the
    messages themselves; an evaluation repeated costs a fraction of the first."""
    address, _ = live_server
    losses = {}
    for compression in ("zstd", "zstd-stream"):
        crossed, seen = [], []
        edge = u_session(WireRecorder(address, crossed), compression)
        edge.transport.listeners.append(lambda way, msg, _, seen=seen: seen.append(msg.WhichOneof("kind")))
        losses[compression] = [edge.train_step(k, b) for k, b in enumerate(lm_batches())]
        evals = []
        for _ in range(2):
            before = edge.bytes_sent
            edge.predict(lm_batches(1, seed=9)[0])
            evals.append(edge.bytes_sent - before)
        assert edge.close() == len(losses[compression])
        packed = compression == "zstd-stream"
        assert [kind for _, kind, _ in crossed[:2]] == ["open", "opened"]
        assert all((kind == "packed") == packed for _, kind, _ in crossed[2:])
        assert "packed" not in seen and {"forward_up", "gradient_down", "eval"} <= set(seen)
        if packed:
            print(f"bytes up of an evaluation, then the same again: {evals}")
            assert evals[1] < evals[0] / 10, evals  # the same rows again: a back-reference
    assert losses["zstd-stream"] == losses["zstd"]


def test_a_packed_forward_only_run_sends_fewer_bytes_for_repeated_rows(recorded):
    """Forward-only over a packed stream: the cloud is handed the same messages (recorded after
    unpacking) and the tail's losses equal the per-tensor run's exactly."""
    address, _, messages = recorded
    base = load_base_model("random:tiny-llama")
    losses, kinds = {}, {}
    for compression in ("zstd", "zstd-stream"):
        start = len(messages)
        edge = ForwardOnlySession(
            base, SPEC, 0, GrpcTransport(open_channel(address)), OPTIM, batch_size=8, max_seq_len=32,
            link=LinkOptions(wire_dtype="int4-hadamard", compression=compression),
            cache=ActivationCache(None, {"base": base.fingerprint}, 64.0), lora=LORA, causal_lm=True,
        )  # fmt: skip
        losses[compression] = [edge.train_step(k, b) for k, b in enumerate(lm_batches() * 2)]
        edge.close()
        kinds[compression] = [m.WhichOneof("kind") for m, _ in messages[start:]]
    assert losses["zstd-stream"] == losses["zstd"]
    assert kinds["zstd-stream"] == kinds["zstd"] == ["open"] + ["eval"] * len(lm_batches()) + ["close"]


def test_a_broken_packed_stream_reattaches_and_packs_anew(live_server):
    """The link breaks twice mid-run (the gRPC call cancelled under the session): the session
    re-attaches on new streams, re-sends what was unanswered packed with the new stream's context,
    and ends where the unbroken run does."""
    address, _ = live_server
    whole = u_session(lambda: GrpcTransport(open_channel(address), owns_channel=True), "zstd-stream")
    reference = [whole.train_step(k, b) for k, b in enumerate(lm_batches())]
    whole.close()
    edge = u_session(lambda: GrpcTransport(open_channel(address), owns_channel=True), "zstd-stream")
    losses = []
    for k, batch in enumerate(lm_batches()):
        if k in (1, 3):
            edge.transport._call.cancel()  # the stream dies; the session finds out at its next answer
        losses.append(edge.train_step(k, batch))
    assert edge.resumes == 2
    assert losses == reference
    assert edge.close() == len(losses)


def _protocol(max_message_bytes: int = 1 << 20) -> StreamProtocol:
    return StreamProtocol(SessionRegistry(device="cpu"), "tester", max_message_bytes)


def _open_packed(protocol: StreamProtocol) -> None:
    """A session opened on ``protocol`` that asked to pack; the next message is the edge's first packed one."""
    edge = u_session(InProcessTransport(protocol), "zstd-stream")
    assert protocol.packing is not None and edge.session_id


@pytest.mark.parametrize(
    "packed, why",
    [
        (b"not zstd at all", "not the stream's next zstd block"),
        (None, "decompresses to more than"),  # a block of zeros far over the cap
        (Packer().pack(b"\xff\xff\xff"), "does not hold an EdgeMessage"),
        (Packer().pack(pb.EdgeMessage(packed=b"x").SerializeToString()), "holds a packed message"),
    ],
    ids=["garbage", "bomb", "not-a-message", "nested"],
)
def test_the_cloud_refuses_what_is_not_the_next_packed_message(packed, why):
    protocol = _protocol(max_message_bytes=1 << 16)
    _open_packed(protocol)
    if packed is None:
        packed = Packer().pack(b"\0" * (8 << 20))
    with pytest.raises(ProtocolError) as refused:
        protocol.handle(pb.EdgeMessage(packed=packed))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and why in refused.value.message


def test_a_packed_message_on_a_stream_that_did_not_ask_is_refused():
    protocol = _protocol()
    u_session(InProcessTransport(protocol), "zstd")
    with pytest.raises(ProtocolError) as refused:
        protocol.handle(pb.EdgeMessage(packed=Packer().pack(b"")))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


class OldDaemon(StreamProtocol):
    """A daemon from before packing: it does not know OpenSession.pack_stream."""

    def _open(self, msg):
        reply = super()._open(msg)
        reply.opened.ClearField("stream_packed")
        self.packing = None
        return reply


def test_an_edge_that_asked_to_pack_refuses_a_daemon_that_does_not():
    with pytest.raises(CloudError, match="does not pack streams"):
        u_session(InProcessTransport(OldDaemon(SessionRegistry(device="cpu"), "tester")), "zstd-stream")


class GarblingDaemon(StreamProtocol):
    """Answers a packed message with bytes that are not its stream's next block."""

    def handle(self, msg):
        reply = super().handle(msg)
        return pb.CloudMessage(packed=b"garbage") if reply.WhichOneof("kind") == "packed" else reply


def test_the_edge_refuses_a_packed_answer_that_does_not_unpack():
    edge = u_session(
        InProcessTransport(GarblingDaemon(SessionRegistry(device="cpu"), "tester")), "zstd-stream"
    )
    with pytest.raises(CloudError, match="refused the cloud's packed answer") as refused:
        edge.train_step(0, lm_batches(1)[0])
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
