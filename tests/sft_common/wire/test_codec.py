"""The tensor codec: exact round trips, and clear refusals of malformed tensors before allocation."""

from __future__ import annotations

import math

import grpc
import lz4.block
import pytest
import torch
from helpers import AllocationSpy

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError


@pytest.mark.parametrize("wire", [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16])
@pytest.mark.parametrize("compression", [pb.COMPRESSION_NONE, pb.LZ4])
def test_round_trip(wire, compression):
    x = torch.randn(37, 8)
    msg = pb.Tensor.FromString(codec.encode(x, wire, compression).SerializeToString())
    y = codec.decode(msg, name="x", dtype=wire, shape=(37, 8), compression=compression)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if wire == pb.FLOAT32:
        assert torch.equal(x, y)  # bit-exact
    else:
        narrow = codec.TORCH_DTYPES[wire]
        # Exactly what a cast to the narrow type keeps (fp16 scaling is by a power of two).
        torch.testing.assert_close(y, x.to(narrow).float(), atol=0, rtol=1e-3 if wire == pb.FLOAT16 else 0)


def test_fp16_keeps_tiny_gradients():
    """Gradients around 1e-8 underflow a plain fp16 cast; the per-tensor scale keeps them."""
    g = torch.randn(64, 8) * 1e-8
    assert (g.half().float() == 0).float().mean() > 0.5  # what a plain cast would lose
    y = codec.decode(codec.encode(g, pb.FLOAT16), name="g", dtype=pb.FLOAT16)
    torch.testing.assert_close(y, g, rtol=1e-3, atol=0)


def test_empty_and_scalar_shapes():
    for x in (torch.zeros(0, 8), torch.tensor(3.5)):
        y = codec.decode(codec.encode(x), name="x")
        assert y.shape == x.shape and torch.equal(y, x)


def test_lz4_shrinks_redundant_payloads():
    x = torch.zeros(128, 64)
    assert len(codec.encode(x, compression=pb.LZ4).data) < len(codec.encode(x).data) / 10


def _refused(msg, match, **expect):
    with pytest.raises(ProtocolError, match=match) as info:
        codec.decode(msg, name="activations", **expect)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "activations" in info.value.message


def test_refusals_say_what_was_wrong():
    good = codec.encode(torch.randn(4, 8))
    _refused(good, "dtype FLOAT32, the session uses FLOAT16", dtype=pb.FLOAT16)
    _refused(good, "rank 2 .* expected rank 3", shape=(4, 8, 1))
    _refused(good, "dimension 1 is 8, expected 16", shape=(4, 16))
    packed = codec.encode(torch.zeros(4, 8), compression=pb.LZ4)
    assert packed.compression == pb.LZ4
    _refused(packed, "compression LZ4, the session uses COMPRESSION_NONE", compression=pb.COMPRESSION_NONE)
    short = pb.Tensor(dtype=pb.FLOAT32, shape=[4, 8], data=good.data[:-4])
    _refused(short, "124 bytes of data, shape \\[4, 8\\] x 4 bytes needs 128")
    _refused(pb.Tensor(dtype=pb.FLOAT32, shape=[-4, -8], data=b""), "negative dimension")
    _refused(pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "unknown dtype 99")
    _refused(pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4, compression=9), "unknown compression")
    nan = codec.encode(torch.tensor([[1.0, float("nan")]]))
    _refused(nan, "NaN or Inf")
    inf = codec.encode(torch.tensor([[1.0, float("inf")]]), pb.FLOAT16)
    _refused(inf, "NaN or Inf", dtype=pb.FLOAT16)
    garbage = pb.Tensor(dtype=pb.FLOAT32, shape=[4, 8], data=b"\x01garbage", compression=pb.LZ4)
    _refused(garbage, "lz4 payload does not decompress to 128 bytes")
    bad_scale = pb.Tensor(dtype=pb.FLOAT16, shape=[1], data=b"\0\0", scale=float("nan"))
    _refused(bad_scale, "invalid scale")
    q = pb.Tensor(dtype=pb.INT8, shape=[2, 3], data=b"\1" * 6, scales=[1.0])
    _refused(q, "1 row scales for shape \\[2, 3\\], expected 2")
    q = pb.Tensor(dtype=pb.INT8, shape=[2, 3], data=b"\1" * 6, scales=[1.0, float("inf")])
    _refused(q, "row scales must be finite and non-negative")
    q = pb.Tensor(dtype=pb.INT8, shape=[2, 3], data=b"\1" * 6, scales=[1.0, -1.0])
    _refused(q, "row scales must be finite and non-negative")
    _refused(pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4, scales=[1.0]), "for INT8 and INT4 only")


def test_huge_claimed_shape_is_refused_before_allocation(monkeypatch):
    """A message claiming 2^60 elements is refused from its shape alone."""
    allocations = []
    monkeypatch.setattr(torch, "frombuffer", lambda *a, **k: allocations.append(a))
    monkeypatch.setattr(lz4.block, "decompress", lambda *a, **k: allocations.append(a))
    huge = pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 30, 1 << 30], data=b"", compression=pb.LZ4)
    _refused(huge, "over the limit of 1048576", max_bytes=1 << 20)
    assert allocations == []


def test_int8_round_trip_per_row():
    """Each row is scaled by its own max: rows of very different magnitudes keep 1/254 of their range."""
    x = torch.randn(50, 8) * torch.logspace(-9, 2, 50)[:, None]
    x[7] = 0.0  # an all-zero row (padding-like) stays exactly zero
    msg = pb.Tensor.FromString(codec.encode(x, pb.INT8).SerializeToString())
    assert len(msg.data) == x.numel() and len(msg.scales) == 50
    y = codec.decode(msg, name="x", dtype=pb.INT8, shape=(50, 8))
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((y - x).abs() <= step / 2 * (1 + 1e-5)).all())
    assert torch.equal(y[7], torch.zeros(8))
    for shape in ((0, 8), (), (5,)):
        z = torch.randn(shape)
        assert codec.decode(codec.encode(z, pb.INT8), name="z").shape == z.shape


def test_lz4_only_where_it_shrinks():
    """Dense random data does not shrink under lz4: it travels raw, and an LZ4 session accepts it."""
    dense = torch.randn(64, 8)
    msg = codec.encode(dense, pb.FLOAT16, pb.LZ4)
    assert msg.compression == pb.COMPRESSION_NONE and len(msg.data) == dense.numel() * 2
    y = codec.decode(msg, name="x", dtype=pb.FLOAT16, compression=pb.LZ4)
    torch.testing.assert_close(y, dense.half().float(), atol=0, rtol=1e-3)
    assert codec.encode(torch.zeros(64, 8), pb.FLOAT16, pb.LZ4).compression == pb.LZ4


def test_decode_makes_no_extra_copy_of_fp32(monkeypatch):
    """fp32 payloads become a tensor over the received bytes: no bytearray copy on the way in."""
    monkeypatch.setattr("builtins.bytearray", lambda *a: pytest.fail("decode copied the payload"))
    x = torch.randn(16, 8)
    assert torch.equal(codec.decode(codec.encode(x), name="x"), x)


# -- int4: packed, two values a byte, one float32 scale per row ----------------------------------


def _int4_rows(shape):
    """(rows, values a row) as the int4 layout counts them: dim 0 is the row for rank >= 2."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (torch.Size(shape).numel() // rows if rows else 0)


@pytest.mark.parametrize("shape", [(50, 8), (37, 7), (6, 1), (3, 4, 5), (9,), (8,), ()])
@pytest.mark.parametrize("compression", [pb.COMPRESSION_NONE, pb.LZ4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_round_trip_within_half_a_step_per_row(shape, compression, seed):
    """Even and odd row lengths, 1-D and scalars: every value within scale / 2 of the input, every
    decoded value within +-7 scale, all-zero rows exactly zero, rows * ceil(row_len / 2) bytes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows, row_len = _int4_rows(shape)
    if len(shape) >= 2:
        x = x * torch.logspace(-9, 2, rows)[(...,) + (None,) * (len(shape) - 1)]  # rows of any magnitude
        x[rows // 2] = 0.0  # an all-zero row (padding-like) stays exactly zero
    msg = pb.Tensor.FromString(codec.encode(x, pb.INT4, compression).SerializeToString())
    assert list(msg.shape) == list(shape) and len(msg.scales) == rows
    nbytes = rows * ((row_len + 1) // 2)
    raw = lz4.block.decompress(msg.data, uncompressed_size=nbytes) if msg.compression == pb.LZ4 else msg.data
    assert len(raw) == nbytes
    y = codec.decode(msg, name="x", dtype=pb.INT4, shape=shape, compression=compression)
    assert y.dtype == torch.float32 and y.shape == x.shape
    scale = torch.tensor(list(msg.scales)).reshape(rows, 1)
    xr, yr = x.reshape(rows, row_len), y.reshape(rows, row_len)
    torch.testing.assert_close(scale, xr.abs().amax(dim=1, keepdim=True) / 7, rtol=1e-6, atol=0)
    assert bool(((yr - xr).abs() <= scale / 2 * (1 + 1e-5)).all())
    assert bool((yr.abs() <= 7 * scale * (1 + 1e-6)).all())
    if len(shape) >= 2:
        assert torch.equal(y[rows // 2], torch.zeros(shape[1:])) and msg.scales[rows // 2] == 0.0


def test_int4_layout_low_nibble_first_and_rows_padded_to_a_byte():
    """nibble = q + 8, low nibble first; an odd row ends in the padding nibble 8; rows start on
    byte boundaries. 3 values a row: 2 bytes a row."""
    x = torch.tensor([[7.0, -7.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]])
    msg = codec.encode(x, pb.INT4)
    # row 0: scale 1, q = 7, -7, 0 -> nibbles 15, 1, 8 (+ pad 8); row 1: all zero, scale 0;
    # row 2: scale 1/7, q = -7, 3.5 -> 4 (round half to even), 7 -> nibbles 1, 12, 15 (+ pad 8)
    assert msg.data == bytes([0x1F, 0x88, 0x88, 0x88, 0xC1, 0x8F])
    assert list(msg.scales) == pytest.approx([1.0, 0.0, 1 / 7])
    y = codec.decode(msg, name="x", dtype=pb.INT4, shape=(3, 3))
    torch.testing.assert_close(y, torch.tensor([[7.0, -7.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 4 / 7, 1.0]]))


@pytest.mark.parametrize("wire", sorted(codec.SUPPORTED_WIRE_DTYPES))
def test_empty_tensors_in_every_wire_dtype(wire):
    """No payload: it travels raw even in an lz4 session (lz4 cannot encode 0 bytes)."""
    for shape in ((0, 8), (4, 0), (0,), (2, 0, 3)):
        msg = codec.encode(torch.zeros(shape), wire, pb.LZ4)
        assert msg.data == b"" and msg.compression == pb.COMPRESSION_NONE
        assert len(msg.scales) == (_int4_rows(shape)[0] if wire in codec.ROW_SCALED else 0)
        y = codec.decode(msg, name="x", dtype=wire, shape=shape, compression=pb.LZ4)
        assert y.shape == shape and y.dtype == torch.float32


def test_int4_lz4_only_where_it_shrinks():
    dense = codec.encode(torch.randn(64, 8), pb.INT4, pb.LZ4)
    assert dense.compression == pb.COMPRESSION_NONE and len(dense.data) == 64 * 4
    sparse = torch.zeros(128, 64)
    sparse[0] = torch.randn(64)  # the last-layer gradient: zero except at [CLS]
    packed = codec.encode(sparse, pb.INT4, pb.LZ4)
    assert packed.compression == pb.LZ4 and len(packed.data) < 128 * 32 / 10
    y = codec.decode(packed, name="g", dtype=pb.INT4, shape=(128, 64), compression=pb.LZ4)
    assert torch.equal(y[1:], torch.zeros(127, 64))


def test_int4_non_finite_input_is_refused_by_the_receiver():
    """Like int8, the encoder does not raise: a row with NaN or Inf gets a non-finite scale (its
    nibbles are 8), and the decoder refuses the tensor."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        msg = codec.encode(torch.tensor([[1.0, 2.0, 3.0], [1.0, bad, 3.0]]), pb.INT4)
        assert math.isfinite(msg.scales[0]) and not math.isfinite(msg.scales[1])
        assert msg.data[2:] == b"\x88\x88"
        _refused(msg, "row scales must be finite and non-negative", dtype=pb.INT4)


def test_int4_refusals_say_what_was_wrong():
    good = codec.encode(torch.randn(2, 3), pb.INT4)  # 2 rows x 2 bytes
    assert len(good.data) == 4

    def bad(**change):
        msg = pb.Tensor()
        msg.CopyFrom(good)
        for key, value in change.items():
            if key in ("scales", "shape"):
                msg.ClearField(key)
                getattr(msg, key).extend(value)
            else:
                setattr(msg, key, value)
        return msg

    _refused(bad(scales=[1.0]), "1 row scales for shape \\[2, 3\\], expected 2")
    _refused(bad(scales=[1.0, 1.0, 1.0]), "3 row scales for shape \\[2, 3\\], expected 2")
    for scales in ([1.0, -1.0], [-1e-30, 1.0], [float("nan"), 1.0], [1.0, float("inf")]):
        _refused(bad(scales=scales), "row scales must be finite and non-negative")
    _refused(bad(data=good.data[:-1]), "3 bytes of data, shape \\[2, 3\\] in int4 needs 2 rows x 2 bytes = 4")
    _refused(bad(data=good.data + b"\x88"), "5 bytes of data")
    _refused(bad(data=b"\x88\x88" * 3, shape=[3, 3]), "2 row scales for shape \\[3, 3\\], expected 3")
    _refused(bad(data=bytes([0x80, 0x88, 0x88, 0x88])), "a 0 nibble \\(-8\\)")  # low nibble 0
    _refused(bad(data=bytes([0x88, 0x88, 0x08, 0x88])), "a 0 nibble \\(-8\\)")  # high nibble 0
    _refused(bad(data=bytes([0x88, 0x88, 0x88, 0x08])), "a 0 nibble \\(-8\\)")  # the padding nibble
    _refused(bad(data=bytes([0x88, 0x98, 0x88, 0x88])), "padding nibble is not 8")
    _refused(bad(data=b"\x01garbage", compression=pb.LZ4), "lz4 payload does not decompress to 4 bytes")
    _refused(good, "dtype INT4, the session uses INT8", dtype=pb.INT8)
    _refused(codec.encode(torch.randn(2, 3), pb.INT8), "dtype INT8, the session uses INT4", dtype=pb.INT4)
    _refused(good, "over the limit of 3", max_bytes=3)  # the cap counts packed bytes: 4
    codec.decode(good, name="x", max_bytes=4)


@pytest.mark.parametrize(
    "shape, scales, data, compression, match",
    [
        ([1 << 30, 1 << 30], [], b"", pb.LZ4, "over the limit of 4096"),
        ([1, 1 << 40], [1.0], b"\x88", pb.COMPRESSION_NONE, "over the limit of 4096"),
        ([0, 1 << 31, 1 << 31], [], b"", pb.COMPRESSION_NONE, "dimensions span"),  # 0s count as 1
        ([64, 64], [1.0] * 63, b"\x00garbage", pb.LZ4, "63 row scales"),
        ([64, 64], [1.0] * 63 + [float("nan")], b"\x00garbage", pb.LZ4, "row scales must be finite"),
        ([64, 64], [1.0] * 64, b"\x88" * 100, pb.COMPRESSION_NONE, "100 bytes of data"),
        ([64, 64], [1.0] * 64, b"\x01garbage", pb.LZ4, "does not decompress to 2048 bytes"),
        ([64, 63], [1.0] * 64, b"\x00" * 2048, pb.COMPRESSION_NONE, "a 0 nibble"),
    ],
)
def test_int4_checks_before_allocating(shape, scales, data, compression, match):
    """Shape, cap, scale count and values are checked from the message alone; what lz4 and torch
    are then asked for is never more than the cap (the packed size of the claimed shape)."""
    msg = pb.Tensor(dtype=pb.INT4, shape=shape, scales=scales, data=data, compression=compression)
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match=match):
        codec.decode(msg, name="x", dtype=pb.INT4, shape=[None] * len(shape), max_bytes=4096)
    spy.assert_bounded(4096)
    if "scales" in match:
        assert spy.sizes == []  # refused before lz4 was asked for anything


def test_int4_allocation_spy_watches_a_valid_message():
    msg = codec.encode(torch.randn(64, 63), pb.INT4, pb.LZ4)
    msg.data, msg.compression = lz4.block.compress(msg.data, store_size=False), pb.LZ4
    with AllocationSpy() as spy:
        codec.decode(msg, name="x", dtype=pb.INT4, shape=(64, 63), max_bytes=4096)
    assert spy.sizes == [64 * 32, 64 * 32]  # lz4's output, then torch's view of it


@pytest.mark.parametrize("dtype", [pb.INT8, pb.INT4])
def test_row_scales_that_would_decode_to_inf_are_refused(dtype):
    """A finite scale times the largest code can overflow float32 (127 * 3e38 = inf): refused
    before the payload is read; huge values an encoder makes still decode finite."""
    big = torch.full((2, 6), 1e38)
    big[1] = -big[1]
    msg = codec.encode(big, dtype)
    out = codec.decode(msg, name="x", dtype=dtype, shape=(2, 6))
    assert bool(torch.isfinite(out).all()) and float(out.abs().min()) > 9e37
    msg.scales[0] = 3e38
    with pytest.raises(ProtocolError, match="overflow float32") as caught:
        codec.decode(msg, name="x", dtype=dtype, shape=(2, 6))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
