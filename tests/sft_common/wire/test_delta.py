"""Delta mode (``wire.delta``): both caches stay bitwise equal, deltas shrink, hostile messages are refused."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import AllocationSpy

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec, delta
from sft_common.wire.delta import DeltaCache, DeltaCaches, DeltaMode
from sft_common.wire.errors import ProtocolError

WIDTH = 128
CODECS = (pb.INT8_HADAMARD, pb.INT4_HADAMARD)


def _wire(msg):
    """Through serialisation, as the receiver gets it."""
    return type(msg).FromString(msg.SerializeToString())


def _pair(budget: int = 1 << 20):
    mode = DeltaMode(budget)
    return DeltaCaches(mode, WIDTH, ("up",), delta.new_salt()), DeltaCaches(mode, WIDTH, ("up",))


def _epochs(sender, receiver, keys, lengths, x, epochs=3, drift=0.02):
    """Send ``x`` (moving a little each epoch) ``epochs`` times; returns [(bytes, max error)]."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(epochs):
        base, rows, decoded = delta.encode(CODECS, sender["up"], keys, lengths, x)
        got = delta.decode(CODECS, receiver["up"], keys, lengths, _wire(base), _wire(rows), WIDTH)
        assert torch.equal(got, decoded)  # the sender knows exactly what the receiver decoded
        sender["up"].update(keys, lengths, decoded)
        receiver["up"].update(keys, lengths, got)
        out.append((base.ByteSize() + rows.ByteSize(), float((got - x).abs().max() / x.abs().max())))
        x = x + drift * torch.randn(x.shape, generator=gen)
    return out


def test_round_trip_keeps_both_caches_bitwise_equal_and_deltas_are_cheaper():
    sender, receiver = _pair()
    lengths = [7, 3, 5]
    keys = sender.keys(torch.randint(0, 100, (3, 7)), lengths)
    x = torch.randn(sum(lengths), WIDTH)
    sent = _epochs(sender, receiver, keys, lengths, x)
    for key in keys:
        assert torch.equal(sender["up"].rows[key], receiver["up"].rows[key])
    assert sender.used == receiver.used == sum(lengths) * WIDTH * 4
    assert sent[1][0] < 0.6 * sent[0][0] and sent[2][0] < 0.6 * sent[0][0]  # 4-bit deltas
    assert sent[0][1] < 0.02 and max(e for _, e in sent[1:]) < 0.01  # deltas are small: finer


def test_keys_are_salted_and_depend_on_the_real_tokens_only():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
    one, other = (
        DeltaCaches(DeltaMode(1), 4, ("up",), b"a" * 16),
        DeltaCaches(DeltaMode(1), 4, ("up",), b"b" * 16),
    )
    assert one.keys(ids, [3, 3])[0] == one.keys(ids, [3, 3])[1]
    assert one.keys(ids, [3, 5])[0] != one.keys(ids, [3, 5])[1]
    assert one.keys(ids, [3, 3]) != other.keys(ids, [3, 3])
    assert all(len(k) == delta.KEY_BYTES for k in one.keys(ids, [3, 5]))


def test_the_budget_keeps_the_first_examples_and_both_sides_agree():
    lengths = [4, 4, 4]
    sender, receiver = _pair(budget=2 * 4 * WIDTH * 4)  # room for two examples
    keys = sender.keys(torch.arange(12).reshape(3, 4), lengths)
    x = torch.randn(12, WIDTH)
    _epochs(sender, receiver, keys, lengths, x, epochs=2)
    assert list(sender["up"].rows) == list(receiver["up"].rows) == keys[:2]
    base, rows, _ = delta.encode(CODECS, sender["up"], keys, lengths, x)
    assert list(rows.delta) == [True, True, False]  # the third travels whole every epoch


def test_state_round_trips_through_a_checkpoint():
    sender, receiver = _pair()
    lengths = [3, 2]
    keys = sender.keys(torch.randint(0, 50, (2, 3)), lengths)
    _epochs(sender, receiver, keys, lengths, torch.randn(5, WIDTH), epochs=2)
    restored = DeltaCaches(sender.mode, WIDTH, ("up",), delta.new_salt())
    restored.load(sender.state())
    assert restored.salt == sender.salt and restored.used == sender.used
    assert all(torch.equal(restored["up"].rows[k], sender["up"].rows[k]) for k in keys)
    empty = DeltaCaches(sender.mode, WIDTH, ("up",))
    empty.load({})  # a checkpoint from before delta mode
    assert empty.used == 0


def _messages():
    """A receiver holding two examples, and a valid message with the second as a delta."""
    sender, receiver = _pair()
    lengths = [3, 2]
    keys = sender.keys(torch.randint(0, 50, (2, 3)), lengths)
    x = torch.randn(5, WIDTH)
    _epochs(sender, receiver, keys, lengths, x, epochs=1)
    sender["up"].rows.pop(keys[0])  # the first goes whole, the second as a delta
    base, rows, _ = delta.encode(CODECS, sender["up"], keys, lengths, x)
    assert list(rows.delta) == [False, True]
    return receiver, keys, lengths, base, rows


@pytest.mark.parametrize(
    "spoil, code, match",
    [
        (lambda k, n, b, r: (k[:1], n, b, r), grpc.StatusCode.INVALID_ARGUMENT, "1 example keys for 2"),
        (lambda k, n, b, r: ([k[0], b"x"], n, b, r), grpc.StatusCode.INVALID_ARGUMENT, "16 bytes"),
        (
            lambda k, n, b, r: (k, n, b, pb.DeltaRows(delta=[True], rows=r.rows)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "1 delta flags",
        ),
        (
            lambda k, n, b, r: ([k[1], b"z" * 16], n, b, r),
            grpc.StatusCode.FAILED_PRECONDITION,
            "holds no 2 rows",
        ),
        (lambda k, n, b, r: (k, [3, 4], b, r), grpc.StatusCode.FAILED_PRECONDITION, "holds no 4 rows"),
    ],
)
def test_wrong_keys_and_flags_are_refused_before_any_payload(spoil, code, match):
    receiver, *parts = _messages()
    keys, lengths, base, rows = spoil(*parts)
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match=match) as caught:
        delta.decode(CODECS, receiver["up"], keys, lengths, base, rows, WIDTH)
    assert caught.value.code == code and spy.sizes == []


def test_hostile_delta_shapes_are_refused_before_allocation():
    receiver, keys, lengths, base, rows = _messages()
    rows.rows.shape[:] = [2**40, WIDTH]  # claims far more rows than its examples have
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match="dimension 0 is"):
        delta.decode(CODECS, receiver["up"], keys, lengths, base, rows, WIDTH, max_bytes=4096)
    spy.assert_bounded(4096)  # the valid base rows only
    receiver, keys, lengths, base, rows = _messages()
    rows.rows.dtype = pb.FLOAT32  # not the session's delta codec
    with pytest.raises(ProtocolError, match="the session uses INT4_HADAMARD"):
        delta.decode(CODECS, receiver["up"], keys, lengths, base, rows, WIDTH)
    receiver, keys, lengths, base, rows = _messages()
    rows.rows.group_scales = b"\xff\x7f" * (len(rows.rows.group_scales) // 2)  # NaN scales
    with pytest.raises(ProtocolError, match="finite"):
        delta.decode(CODECS, receiver["up"], keys, lengths, base, rows, WIDTH)
    assert receiver.used == 5 * WIDTH * 4  # a refused message changes no cache


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(delta_cache_bytes=-1), "delta_cache_bytes must be"),
        (dict(delta_cache_bytes=1, mode=pb.SFT), "mode SL"),
        (dict(delta_cache_bytes=1, forward_only=True), "not forward_only"),
        (dict(delta_cache_bytes=1, delta_dtype=99), "delta_dtype 99"),
        (dict(delta_dtype=pb.INT4_HADAMARD), "for delta mode"),
    ],
)
def test_session_configs_are_checked(fields, match):
    config = pb.SessionConfig(mode=pb.SL, delta_base_dtype=pb.INT8_HADAMARD, delta_dtype=pb.INT4_HADAMARD)
    if "delta_cache_bytes" not in fields:
        config.delta_base_dtype = 0
    for name, value in fields.items():
        setattr(config, name, value)
    refusal = delta.check_config(config)
    assert refusal is not None and match in refusal
    assert delta.check_config(pb.SessionConfig(mode=pb.SL)) is None


@pytest.mark.parametrize("bits, dtype", [(2, pb.INT2_HADAMARD), (3, pb.INT3_HADAMARD)])
def test_narrow_codes_round_trip(bits, dtype):
    x = torch.randn(16, WIDTH)
    msg = _wire(codec.encode(x, dtype))
    y = codec.decode(msg, name="x", dtype=dtype, shape=(16, WIDTH))
    assert len(msg.data) == 16 * WIDTH * bits // 8
    assert float((y - x).norm() / x.norm()) < {2: 0.8, 3: 0.4}[bits]


def test_a_cache_replaces_an_example_whose_length_changed():
    cache = DeltaCache(1 << 20, 4)
    cache.update([b"k" * 16], [3], torch.ones(3, 4))
    cache.update([b"k" * 16], [2], torch.zeros(2, 4))
    assert cache.used == 2 * 4 * 4 and cache.held(b"k" * 16, 3) is None
