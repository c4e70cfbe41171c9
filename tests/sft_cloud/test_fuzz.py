"""Hostile input, property-based: every malformed message is refused with a status that names
the problem, before anything is allocated from a size it claims, and changes nothing."""

from __future__ import annotations

import math
import re
import struct
from typing import List, Tuple

import grpc
import lz4.block
import pytest
import torch
from helpers import AllocationSpy, max_diff, params, session_config
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel

WIDTH = 8  # rank 8 at the cut of random:tiny
MAX_BATCH, MAX_SEQ = 8, 64  # helpers.session_config
CAP = MAX_BATCH * MAX_SEQ * WIDTH * 4  # CloudSession.max_activation_bytes for that config
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HUGE_SHAPES = [[2**40, WIDTH], [2**31, 2**31], [2**62, 2**62], [WIDTH, 2**40], [2**40], [2**20, 2**20, 2**20]]
Case = Tuple[pb.EdgeMessage, grpc.StatusCode, str]


def _config():
    # LZ4 sessions also accept raw tensors, so both paths of the decoder are reachable.
    return session_config(compression=pb.LZ4)


def _fingerprint(base, config) -> str:
    return session_fingerprint(
        base.fingerprint, SplitSpec(split_layer=config.split_layer, rank=config.rank), 2
    )


def _floats(tokens: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, WIDTH, generator=g).numpy().tobytes()


def _valid_step(step: int, lengths: List[int], seed: int = 0) -> pb.EdgeMessage:
    tokens = sum(lengths)
    acts = pb.Tensor(dtype=pb.FLOAT32, shape=[tokens, WIDTH], data=_floats(tokens, seed))
    labels = [i % 2 for i in range(len(lengths))]
    return pb.EdgeMessage(train=pb.TrainStep(step=step, activations=acts, lengths=lengths, labels=labels))


lengths_st = st.lists(st.integers(1, MAX_SEQ), min_size=1, max_size=MAX_BATCH)


@st.composite
def hostile(draw, next_step: int) -> Case:
    """A train or eval message that is valid except for one thing, with the refusal it must get."""
    lengths = draw(lengths_st)
    tokens, batch = sum(lengths), len(lengths)
    nbytes = tokens * WIDTH * 4
    msg = _valid_step(next_step, lengths, draw(st.integers(0, 1000)))
    step, t = msg.train, msg.train.activations
    kind = draw(
        st.sampled_from(
            "step dtype shape huge length_lie nan lz4_nan lz4_garbage compression scale row_scales "
            "label_count label_value targets bad_lengths eval".split()
        )
    )
    if kind == "step":  # skipped ahead, or replayed from long ago
        step.step = draw(
            st.integers(-(2**63), 2**63 - 1).filter(lambda s: s not in (next_step, next_step - 1))
        )
        return msg, PRECONDITION, rf"step {step.step} is out of order: the session expects step {next_step}"
    if kind == "dtype":
        t.dtype = draw(st.integers(0, 2**31 - 1).filter(lambda d: d != pb.FLOAT32))
        return msg, INVALID, r"activations: (unknown dtype \d+|dtype \w+, the session uses FLOAT32)"
    if kind == "shape":
        shape = draw(
            st.lists(st.integers(-(2**40), 2**40), max_size=4).filter(lambda s: s != [tokens, WIDTH])
        )
        t.ClearField("shape")
        t.shape.extend(shape)
        return msg, INVALID, r"activations: (rank \d+ \(shape|shape \[.*\]: dimension \d is)"
    if kind == "huge":  # a few bytes claiming terabytes, raw or as lz4
        t.ClearField("shape")
        t.shape.extend(draw(st.sampled_from(HUGE_SHAPES)))
        t.data = draw(st.binary(max_size=64))
        t.compression = draw(st.sampled_from([pb.COMPRESSION_NONE, pb.LZ4]))
        return msg, INVALID, r"activations: (rank \d+ \(shape|shape \[.*\]: dimension \d is)"
    if kind == "length_lie":
        size = draw(st.integers(0, 2 * nbytes).filter(lambda n: n != nbytes))
        t.data = (t.data * 3)[:size]
        return (
            msg,
            INVALID,
            rf"activations: {size} bytes of data, shape \[{tokens}, {WIDTH}\] x 4 bytes needs {nbytes}",
        )
    if kind in ("nan", "lz4_nan"):
        i = draw(st.integers(0, tokens * WIDTH - 1))
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        t.data = t.data[: 4 * i] + struct.pack("<f", bad) + t.data[4 * i + 4 :]
        if kind == "lz4_nan":
            t.data, t.compression = lz4.block.compress(t.data, store_size=False), pb.LZ4
        return msg, INVALID, "activations: contains NaN or Inf"
    if kind == "lz4_garbage":
        t.data, t.compression = draw(st.binary(max_size=256)), pb.LZ4
        try:  # what the decoder will find (random bytes are occasionally a valid lz4 block)
            out = lz4.block.decompress(t.data, uncompressed_size=nbytes)
        except lz4.block.LZ4BlockError:
            return msg, INVALID, rf"activations: lz4 payload does not decompress to {nbytes} bytes"
        if len(out) != nbytes:
            return msg, INVALID, rf"activations: {len(out)} bytes of data"
        assume(not torch.isfinite(torch.frombuffer(bytearray(out), dtype=torch.float32)).all())
        return msg, INVALID, "activations: contains NaN or Inf"
    if kind == "compression":
        t.compression = draw(st.integers(2, 2**31 - 1))
        return msg, INVALID, rf"activations: unknown compression {t.compression}"
    if kind == "scale":
        t.scale = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-30]))
        return msg, INVALID, "activations: invalid scale"
    if kind == "row_scales":
        t.scales.extend(draw(st.lists(st.floats(width=32), min_size=1, max_size=8)))
        return msg, INVALID, "activations: row scales are for INT8 and INT4 only"
    if kind == "label_count":
        n = draw(st.integers(0, 3 * MAX_BATCH).filter(lambda n: n != batch))
        step.ClearField("labels")
        step.labels.extend([0] * n)
        return msg, INVALID, rf"classification needs {batch} labels and no targets, got {n} labels"
    if kind == "label_value":
        y = draw(st.one_of(st.integers(-(2**31), -1), st.integers(2, 2**31 - 1)))
        step.labels[draw(st.integers(0, batch - 1))] = y
        return msg, INVALID, r"label -?\d+ is outside 0..1"
    if kind == "targets":
        step.targets.extend(draw(st.lists(st.floats(width=32), min_size=1, max_size=MAX_BATCH)))
        return msg, INVALID, rf"classification needs {batch} labels and no targets"
    if kind == "bad_lengths":
        bad = draw(
            st.one_of(
                st.just([]),
                st.lists(st.integers(1, MAX_SEQ), min_size=MAX_BATCH + 1, max_size=4 * MAX_BATCH),
                st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=MAX_BATCH).filter(
                    lambda ls: any(not 1 <= n <= MAX_SEQ for n in ls)
                ),
            )
        )
        step.ClearField("lengths")
        step.lengths.extend(bad)
        return (
            msg,
            INVALID,
            r"(batch of \d+ examples; the session allows 1..8|sequence length -?\d+ is outside 1..64)",
        )
    # eval: the same tensor checks guard evaluation, which never changes state anyway
    t.ClearField("shape")
    t.shape.extend(draw(st.sampled_from(HUGE_SHAPES)))
    ev = pb.EvalStep(batch=1, activations=t, lengths=lengths)
    return pb.EdgeMessage(eval=ev), INVALID, r"activations: (rank \d+ \(shape|shape \[.*\]: dimension \d is)"


class Snapshot:
    """Everything a refused message must leave as it was."""

    def __init__(self, session):
        self.session = session
        self.params = params(session.net2)
        self.step, self.reply = session.next_step, session.last_reply
        self.lr = [g["lr"] for g in session.optimizer.param_groups]
        self.opt = {
            id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in session.optimizer.state.items()
        }

    def assert_unchanged(self) -> None:
        s = self.session
        assert max_diff(self.params, params(s.net2)) == 0
        assert s.next_step == self.step and s.last_reply is self.reply
        assert [g["lr"] for g in s.optimizer.param_groups] == self.lr
        for p, state in s.optimizer.state.items():
            for k, v in self.opt[id(p)].items():
                assert torch.equal(state[k], v), k


@pytest.fixture
def proto(tiny_base):
    """A session two steps in (optimizer state and a cached reply exist), driven without a network."""
    registry = SessionRegistry(max_sessions=2)
    proto = StreamProtocol(registry, "edge")
    config = _config()
    proto.handle(
        pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=_fingerprint(tiny_base, config)))
    )
    for k in range(2):
        proto.handle(_valid_step(k, [5, 3], seed=k))
    return proto


@QUICK
@given(data=st.data())
def test_session_refuses_hostile_messages_and_changes_nothing(proto, data):
    msg, code, pattern = data.draw(hostile(proto.session.next_step))
    snap = Snapshot(proto.session)
    with AllocationSpy() as spy, pytest.raises(ProtocolError) as info:
        proto.handle(msg)
    assert info.value.code == code, info.value.message
    assert re.search(pattern, info.value.message), (pattern, info.value.message)
    spy.assert_bounded(CAP)
    snap.assert_unchanged()


@QUICK
@given(garbage=st.binary(max_size=512))
def test_garbage_bytes_as_a_message_are_refused_or_harmless(proto, garbage):
    try:
        msg = pb.EdgeMessage.FromString(garbage)
    except Exception:  # the transport refuses what does not parse (see the live test)
        return
    kind = msg.WhichOneof("kind")
    assume(kind != "close")  # a well-formed close is legitimately obeyed
    snap = Snapshot(proto.session)
    try:
        reply = proto.handle(msg)
    except ProtocolError as exc:
        assert exc.code in (INVALID, PRECONDITION) and exc.message
    else:  # only a replay (cached answer) or an evaluation can pass, and neither changes state
        assert kind in ("train", "eval"), reply
        if kind == "train":
            assert reply.train == proto.session.last_reply
    snap.assert_unchanged()


def test_replay_of_the_last_step_gets_the_cached_reply_and_changes_nothing(proto):
    snap = Snapshot(proto.session)
    reply = proto.handle(_valid_step(1, [2], seed=99))  # even with other content: it is a retry
    assert reply.train == proto.session.last_reply
    snap.assert_unchanged()
    with AllocationSpy() as spy:  # the spy sees what a valid step allocates: it does watch
        proto.handle(_valid_step(2, [4, 4]))
    assert spy.sizes == [8 * WIDTH * 4] and proto.session.next_step == 3


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(0, 2**62), min_size=1, max_size=4),
    data=st.binary(max_size=64),
    compression=st.sampled_from([pb.COMPRESSION_NONE, pb.LZ4]),
    dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT8, pb.INT4]),
)
@example(shape=[0, 3_036_988_439, 3_037_012_561], data=b"", compression=0, dtype=1)  # torch overflowed
def test_codec_checks_a_claimed_size_before_allocating(shape, data, compression, dtype):
    """With no expected shape (only a byte cap), the claimed size is checked before lz4 or torch
    allocate anything: a tiny message cannot make the decoder reserve terabytes. (Found here: an
    empty shape with huge other dimensions made torch raise instead of a clear refusal.)"""
    # INT4 packs two values a byte (each row padded to a whole byte): half the count is a lower bound
    itemsize = 0.5 if dtype == pb.INT4 else torch.empty((), dtype=codec.TORCH_DTYPES[dtype]).element_size()
    claimed = math.prod(max(d, 1) for d in shape) * itemsize  # a 0 counts as 1 (strides)
    scales = [1.0] * min(shape[0] if len(shape) > 1 else 1, 4) if dtype in codec.ROW_SCALED else []
    msg = pb.Tensor(dtype=dtype, shape=shape, data=data, compression=compression, scales=scales)
    with AllocationSpy() as spy:
        try:
            codec.decode(msg, name="x", shape=[None] * len(shape), max_bytes=CAP)
        except ProtocolError as exc:
            assert exc.code == INVALID and exc.message.startswith("x: ")
            if claimed > CAP:
                assert "over the limit" in exc.message
        else:
            assert claimed <= CAP
    spy.assert_bounded(CAP)


# -- against a live daemon ----------------------------------------------------------------------


@pytest.fixture
def live(live_server, tiny_base):
    """A session on a live daemon, two steps in; yields (channel, open message, registry session)."""
    address, registry = live_server
    channel = open_channel(address)
    config = _config()
    request = pb.OpenSession(config=config, fingerprint=_fingerprint(tiny_base, config))
    t = GrpcTransport(channel)
    opened = t.call(pb.EdgeMessage(open=request)).opened
    for k in range(2):
        t.call(_valid_step(k, [5, 3], seed=k))
    t.close()
    request.session_id = opened.session_id
    yield channel, request, registry.get(opened.session_id)
    channel.close()


def _attach(channel, request) -> GrpcTransport:
    t = GrpcTransport(channel, timeout=30)
    opened = t.call(pb.EdgeMessage(open=request)).opened
    assert opened.session_id == request.session_id
    return t


def _wait_detached(session, timeout=10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while session.attached and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.attached == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_live_daemon_refuses_hostile_messages_with_a_clear_status(live, data):
    channel, request, session = live
    msg, code, pattern = data.draw(hostile(session.next_step))
    t = _attach(channel, request)
    snap = Snapshot(session)
    with AllocationSpy() as spy, pytest.raises(CloudError) as info:
        t.call(msg)
    t.close()
    assert info.value.code == code, info.value.details
    assert re.search(pattern, info.value.details), (pattern, info.value.details)
    spy.assert_bounded(CAP)
    snap.assert_unchanged()


def test_live_daemon_survives_garbage_and_keeps_serving(live):
    """Bytes that are no protobuf message end the stream (gRPC's own INTERNAL status) and leave
    the session and the daemon as they were; a valid step on a new stream then succeeds."""
    channel, request, session = live
    train = channel.stream_stream(
        "/sft.v1.SplitTrainer/Train",
        request_serializer=None,
        response_deserializer=pb.CloudMessage.FromString,
    )
    snap = Snapshot(session)
    # 0x0a 0xff...: field 1 (open), length-delimited, with a length that runs past the end.
    for garbage in (
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\xff" * 64,
        b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    ):
        call = train(iter([pb.EdgeMessage(open=request).SerializeToString(), garbage]))
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "deserializing" in (info.value.details() or "")
    snap.assert_unchanged()
    _wait_detached(session)
    t = _attach(channel, request)
    reply = t.call(_valid_step(session.next_step, [6, 2, 9])).train
    assert reply.step == snap.step and session.next_step == snap.step + 1
    t.close()
    _wait_detached(session)
