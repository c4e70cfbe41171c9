"""The tensor codec: exact round trips, and clear refusals of malformed tensors before allocation."""

from __future__ import annotations

import grpc
import lz4.block
import pytest
import torch

from sft_common import codec
from sft_common.errors import ProtocolError
from sft_common.proto import sft_pb2 as pb


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
    _refused(pb.Tensor(dtype=7, shape=[1], data=b"\0" * 4), "unknown dtype 7")
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
    _refused(pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\0" * 4, scales=[1.0]), "for INT8 only")


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
