"""Limits: idle sessions are checkpointed, evicted and restored exactly; oversized payloads are
refused before anything is allocated for them."""

from __future__ import annotations

import os
import time

import grpc
import lz4.block
import pytest
import torch
from helpers import AllocationSpy, params, session_config

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError


def _open_msg(base, **kw) -> pb.EdgeMessage:
    config = session_config(**kw)
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    return pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=fp))


def _step(k: int) -> pb.EdgeMessage:
    g = torch.Generator().manual_seed(k)
    lengths = [7, 4, 9]
    acts = codec.encode(torch.randn(sum(lengths), 8, generator=g))
    return pb.EdgeMessage(train=pb.TrainStep(step=k, activations=acts, lengths=lengths, labels=[0, 1, 1]))


def _reattach(registry, msg: pb.EdgeMessage, session_id: str, resume: int) -> StreamProtocol:
    again = pb.EdgeMessage()
    again.CopyFrom(msg)
    again.open.session_id = session_id
    again.open.resume_steps[:] = [resume]
    proto = StreamProtocol(registry, "edge")
    assert proto.handle(again).opened.next_step == resume
    return proto


def test_idle_session_is_checkpointed_evicted_and_restored_exactly(tmp_path, tiny_base):
    # The reference: the same five steps with no interruption.
    ref = StreamProtocol(SessionRegistry(), "edge")
    ref.handle(_open_msg(tiny_base))
    ref_replies = [ref.handle(_step(k)).train for k in range(5)]

    registry = SessionRegistry(checkpoint_dir=str(tmp_path), idle_timeout=0.1)
    proto = StreamProtocol(registry, "edge")
    opened = proto.handle(_open_msg(tiny_base)).opened
    sid = opened.session_id
    replies = [proto.handle(_step(k)).train for k in range(3)]
    time.sleep(0.15)
    assert registry.evict_idle() == []  # a session with a stream attached is never evicted
    proto.detach()
    assert registry.evict_idle() == []  # detaching counts as activity
    time.sleep(0.15)
    assert registry.evict_idle() == [sid] and len(registry) == 0
    assert os.path.isfile(os.path.join(tmp_path, sid, "step-000000003.safetensors"))

    # The edge comes back: the session is rebuilt from its checkpoint and goes on as if nothing happened.
    proto = _reattach(registry, _open_msg(tiny_base), sid, resume=3)
    assert proto.session.next_step == 3 and len(registry) == 1
    replies += [proto.handle(_step(k)).train for k in range(3, 5)]
    assert replies == ref_replies  # losses and gradients, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(params(proto.session.net2), params(ref.session.net2)))
    assert [s["step"] for s in proto.session.optimizer.state.values()] == [
        s["step"] for s in ref.session.optimizer.state.values()
    ]


def test_evicted_without_checkpoint_dir_is_gone(tiny_base):
    registry = SessionRegistry(idle_timeout=0.05)
    proto = StreamProtocol(registry, "edge")
    sid = proto.handle(_open_msg(tiny_base)).opened.session_id
    proto.detach()
    assert registry.evict_idle(now=time.monotonic() + 1) == [sid]
    with pytest.raises(ProtocolError, match="no session with this id") as info:
        _reattach(registry, _open_msg(tiny_base), sid, resume=0)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED  # the same answer as for an unknown id


def test_payloads_over_the_session_cap_are_refused_before_allocation(tiny_base):
    proto = StreamProtocol(SessionRegistry(), "edge")
    proto.handle(_open_msg(tiny_base, compression=pb.LZ4, max_batch_size=4, max_seq_len=16))
    session = proto.session
    cap = session.inputs.max_bytes()
    assert cap == 4 * 16 * 8 * 4  # batch x seq x rank x fp32: derived from the session's config

    # A shape over the cap, as the decoder sees it with the session's limit.
    claimed = pb.Tensor(dtype=pb.FLOAT32, shape=[4 * 16 + 1, 8], data=b"\0" * 16, compression=pb.LZ4)
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match=f"over the limit of {cap}"):
        codec.decode(claimed, name="activations", shape=(None, 8), max_bytes=cap)
    assert spy.sizes == []

    lengths = [16, 16, 16, 16]  # the most the session allows: exactly the cap
    nbytes = 64 * 8 * 4

    def step(data: bytes, compression=pb.COMPRESSION_NONE) -> pb.EdgeMessage:
        t = pb.Tensor(dtype=pb.FLOAT32, shape=[64, 8], data=data, compression=compression)
        return pb.EdgeMessage(train=pb.TrainStep(step=0, activations=t, lengths=lengths, labels=[0, 1, 0, 1]))

    cases = [
        # More bytes than the shape needs (a megabyte): refused before a tensor is built on it.
        (step(b"\0" * (1 << 20)), f"1048576 bytes of data, shape \\[64, 8\\] x 4 bytes needs {nbytes}"),
        # An lz4 bomb (64 MiB of zeros in ~250 KB): lz4 is given the expected size as its limit.
        (
            step(lz4.block.compress(b"\0" * (64 << 20), store_size=False), pb.LZ4),
            "lz4 payload does not decompress",
        ),
    ]
    for msg, match in cases:
        with AllocationSpy() as spy, pytest.raises(ProtocolError, match=match) as info:
            proto.handle(msg)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        spy.assert_bounded(cap)
    # Too many tokens for the session: refused from the lengths, before the tensor is looked at.
    too_long = step(b"\0" * nbytes)
    too_long.train.lengths[0] = 17
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match="sequence length 17 is outside 1..16"):
        proto.handle(too_long)
    assert spy.sizes == []
    assert session.next_step == 0
    proto.handle(step(torch.randn(64, 8).numpy().tobytes()))  # the largest valid step passes
    assert session.next_step == 1
