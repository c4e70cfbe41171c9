"""INT4_HADAMARD, stochastic rounding, zstd and the session's ``Wire``: stated errors, clear refusals."""

from __future__ import annotations

import pytest
import torch
import zstandard
from helpers import AllocationSpy

from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec, hadamard
from sft_common.wire.codecs import COMPRESSION_NAMES, WIRES, Wire
from sft_common.wire.errors import ProtocolError
from sft_edge.runs import config as run_config


def _residual_like(rows: int = 64, width: int = 576, seed: int = 0) -> torch.Tensor:
    """A decoder's residual stream in miniature: Gaussian rows, one outlier channel, one massive token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, 7] += 30.0  # a channel far larger than the rest
    x[0] *= 400.0  # the first token: a massive activation
    return x


def _round_trip(x: torch.Tensor, **kw) -> torch.Tensor:
    msg = pb.Tensor.FromString(codec.encode(x, pb.INT4_HADAMARD, **kw).SerializeToString())
    return codec.decode(msg, name="x", dtype=pb.INT4_HADAMARD, shape=tuple(x.shape), max_bytes=x.numel() * 4)


@pytest.mark.parametrize("width", [576, 64, 24, 7, 1])
def test_rotation_is_orthogonal_and_inverted_exactly(width):
    x = torch.randn(5, width, dtype=torch.float32)
    group = hadamard.group_for(width)
    y = hadamard.rotate(x, group)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hadamard.unrotate(y, group), x, rtol=0, atol=1e-5)


def test_round_trip_within_its_stated_error():
    """Each value within half a step of its group (amax / 14) in the rotated domain, so the row's
    error norm within that; massive rows exact to bf16."""
    x = _residual_like()
    y = _round_trip(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y[0], x[0].to(torch.bfloat16).float(), rtol=0, atol=0)  # sent whole
    rotated = hadamard.rotate(x[1:], 64).reshape(63, 9, 64)
    bound = (rotated.abs().amax(dim=2) / 14 * 1.01).pow(2).mul(64).sum(dim=1).sqrt()  # per row
    assert bool(((y[1:] - x[1:]).norm(dim=1) <= bound + 1e-4).all())
    # The outlier channel does not take the other values down with it, as one scale a row does.
    per_row = codec.decode(codec.encode(x, pb.INT4), name="x")
    assert (y[1:] - x[1:]).norm() < 0.25 * (per_row[1:] - x[1:]).norm()


@pytest.mark.parametrize("dtype, bits", [(pb.INT4_HADAMARD, 4), (pb.INT6_HADAMARD, 6), (pb.INT8_HADAMARD, 8)])
@pytest.mark.parametrize("width", [576, 24, 7])
def test_each_width_within_half_a_step(dtype, bits, width):
    """Every value within half a step of its group (amax / (2 L), L = 7, 31, 127) in the rotated
    domain: the round trip's error bound, for each code width and odd row lengths."""
    x = torch.randn(40, width)
    msg = pb.Tensor.FromString(codec.encode(x, dtype).SerializeToString())
    assert len(msg.data) == 40 * ((width * bits + 7) // 8)
    y = codec.decode(msg, name="x", dtype=dtype, shape=(40, width))
    group = hadamard.group_for(width)
    rotated = hadamard.rotate(x, group).reshape(40, width // group, group)
    half_step = rotated.abs().amax(dim=2, keepdim=True) / (2 * hadamard.code_max(bits)) * 1.01 + 1e-6
    got = hadamard.rotate(y, group).reshape(40, width // group, group)
    assert bool(((got - rotated).abs() <= half_step).all())


def test_spare_bits_must_be_zero():
    msg = codec.encode(torch.randn(2, 7), pb.INT6_HADAMARD)  # 42 bits a row: 6 bytes, 6 spare bits
    data = bytearray(msg.data)
    data[5] |= 0x80
    msg.data = bytes(data)
    with pytest.raises(ProtocolError, match="spare bits after a row's last code are not 0"):
        codec.decode(msg, name="x")


def test_bytes_a_token_at_smollm2_width():
    """576 values: 288 B of codes and 18 B of fp16 scales a token (7.5x fewer than fp32)."""
    x = torch.randn(32, 576)
    msg = codec.encode(x, pb.INT4_HADAMARD)
    assert not msg.outlier_rows and len(msg.data) == 32 * 288 and len(msg.group_scales) == 32 * 18
    x[3] *= 1000
    msg = codec.encode(x, pb.INT4_HADAMARD)
    assert list(msg.outlier_rows) == [3] and len(msg.outliers) == 576 * 2 and len(msg.data) == 31 * 288


def test_tiny_gradients_keep_their_precision():
    """The power-of-two pre-scale keeps fp16 group scales out of underflow."""
    g = torch.randn(16, 64) * 1e-9
    y = _round_trip(g)
    assert float((y - g).norm() / g.norm()) < 0.15


def test_outlier_rows_are_capped():
    x = torch.randn(16, 64)
    x[:8] *= 1e4  # half the rows massive: only 16 // 8 = 2 of them travel whole
    msg = codec.encode(x, pb.INT4_HADAMARD)
    assert len(msg.outlier_rows) == 2
    y = _round_trip(x)
    assert bool(((y - x).norm(dim=1) < 0.15 * x.norm(dim=1)).all())  # the rest quantised, not lost


def test_stochastic_rounding_is_unbiased_and_deterministic():
    g = torch.randn(8, 32) * 1e-3
    a, b = codec.encode(g, pb.INT8, stochastic=True), codec.encode(g, pb.INT8, stochastic=True)
    assert a.SerializeToString() == b.SerializeToString()  # a resent step sends the same bytes
    mean = torch.stack(
        [
            codec.decode(codec.encode(g * (1 + k * 1e-6), pb.INT8, stochastic=True), name="g")
            for k in range(400)
        ]
    ).mean(0)
    nearest = codec.decode(codec.encode(g, pb.INT8), name="g")
    step = g.abs().amax(dim=1, keepdim=True) / 127
    # the mean of 400 draws is within a few sigma (step / 2 / 20) of the value; nearest is biased
    assert float(((mean - g) / step).abs().max()) < 0.15
    assert float(((nearest - g) / step).abs().max()) > 0.3


@pytest.mark.parametrize("dtype", [pb.INT6_HADAMARD, pb.INT4_HADAMARD])
def test_group_codes_rounded_stochastically_are_unbiased_and_deterministic(dtype):
    """Gradients in group codes (``int4-6-hadamard-grad4``'s): the same tensor encodes to the same
    bytes, and the mean of many draws converges on the value where rounding to nearest does not."""
    g = torch.randn(8, 64) * 1e-3
    g[:, 0] *= 40  # one large value a row: every group's scale is set by it, the rest round coarsely
    a, b = codec.encode(g, dtype, stochastic=True), codec.encode(g, dtype, stochastic=True)
    assert a.SerializeToString() == b.SerializeToString()
    draws = [
        codec.decode(codec.encode(g * (1 + k * 1e-6), dtype, stochastic=True), name="g") for k in range(400)
    ]
    mean, nearest = torch.stack(draws).mean(0), codec.decode(codec.encode(g, dtype), name="g")
    assert float((mean - g).norm() / g.norm()) < 0.3 * float((nearest - g).norm() / g.norm())


def test_the_gradient_group_wires():
    wire = Wire.named("int4-6-hadamard-grad4")
    assert (wire.activations, wire.down, wire.gradients) == (
        pb.INT4_HADAMARD,
        pb.INT6_HADAMARD,
        pb.INT4_HADAMARD,
    )
    assert wire.stochastic
    g = torch.randn(40, 64)
    g[3] *= 1e3  # a row far above the median: an activation's would travel whole, a gradient's does not
    assert not wire.encode_gradient(g).outlier_rows and codec.encode(g, pb.INT4_HADAMARD).outlier_rows


@pytest.mark.parametrize("wire", [pb.FLOAT32, pb.INT8, pb.INT4_HADAMARD])
def test_zstd_round_trips_and_shrinks_codes(wire):
    x = _residual_like(32, 64)
    plain = codec.encode(x, wire)
    packed = codec.encode(x, wire, pb.ZSTD)
    assert len(packed.data) <= len(plain.data)
    y = codec.decode(packed, name="x", dtype=wire, compression=pb.ZSTD)
    torch.testing.assert_close(y, codec.decode(plain, name="x"), rtol=0, atol=0)


def test_zstd_frame_that_states_another_size_is_refused():
    frame = zstandard.ZstdCompressor().compress(b"\0" * (1 << 20))  # 1 MiB claimed by 50 bytes
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=[4], data=frame, compression=pb.ZSTD)
    with pytest.raises(ProtocolError, match="zstd frame states 1048576 bytes, the tensor has 16"):
        codec.decode(msg, name="x")
    msg.data = b"not a zstd frame"
    with pytest.raises(ProtocolError, match="zstd payload does not decompress"):
        codec.decode(msg, name="x")


def _hostile(**fields) -> pb.Tensor:
    good = codec.encode(_residual_like(16, 64), pb.INT4_HADAMARD)
    msg = pb.Tensor()
    msg.CopyFrom(good)
    for name, value in fields.items():
        if isinstance(value, list):  # a repeated field
            del getattr(msg, name)[:]
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"group": 48}, "group 48 is not a power of two"),
        ({"group": 128}, "dividing the row's 64 values"),
        ({"group": 0}, "group 0 is not a power of two"),
        ({"outlier_rows": [5, 5]}, "outlier rows must be increasing"),
        ({"outlier_rows": [16]}, "outlier rows must be increasing row indices below 16"),
        ({"outlier_rows": list(range(17))}, "17 outlier rows in a tensor of 16 rows"),
        ({"group_scales": b"\0" * 3}, "3 bytes of group scales"),
        ({"outliers": b""}, "needs 30 and 128"),
        ({"group_scales": b"\xff\x7f" * 15}, "group scales must be finite"),  # fp16 NaN
        ({"outliers": b"\xc0\x7f" * 64}, "outlier rows contain NaN"),  # bf16 NaN
        ({"data": b"\0" * 480}, "a stored code of 0 \\(-8\\)"),
        ({"data": b"\x88" * 10}, "10 bytes of data"),
        ({"scale": 1e-45}, "decodes to NaN or Inf"),
        ({"scales": [1.0]}, "row scales are for INT8 and INT4 only"),
        ({"shape": [1 << 30, 1 << 30]}, "over the limit of 4096"),
        (
            {"outlier_rows": list(range(40)), "shape": [40, 64]},
            "with 40 outlier rows is 5120 bytes, over the limit",
        ),
    ],
)
def test_hostile_codes_refused_before_allocation(fields, match):
    msg = _hostile(**fields)
    with AllocationSpy() as spy, pytest.raises(ProtocolError, match=match):
        codec.decode(msg, name="x", dtype=pb.INT4_HADAMARD, shape=[None, None], max_bytes=4096)
    spy.assert_bounded(4096)


def test_group_fields_refused_on_other_dtypes():
    msg = codec.encode(torch.randn(2, 4), pb.INT8)
    msg.group = 4
    with pytest.raises(ProtocolError, match="for the HADAMARD dtypes only"):
        codec.decode(msg, name="x")


def test_wire_pairs_and_the_session_config():
    wire = Wire.named("int4-6-hadamard", "zstd")
    assert (wire.activations, wire.down, wire.gradients) == (pb.INT4_HADAMARD, pb.INT6_HADAMARD, pb.INT8)
    assert wire.stochastic and wire.compression == pb.ZSTD
    config = pb.SessionConfig()
    wire.configure(config)
    assert Wire.of(config) == wire
    old = pb.SessionConfig(wire_dtype=pb.FLOAT16, compression=pb.LZ4)  # before grad_ and down_wire_dtype
    assert Wire.of(old) == Wire(pb.FLOAT16, pb.FLOAT16, pb.FLOAT16, False, pb.LZ4)
    x = torch.randn(10, 64)
    assert wire.encode_activations(x).dtype == pb.INT4_HADAMARD
    down = wire.encode_activations(x, down=True)
    assert down.dtype == pb.INT6_HADAMARD and len(down.data) == 10 * 48
    torch.testing.assert_close(wire.decode_activations(down, "a", (10, 64), down=True), x, rtol=0, atol=0.25)
    g = torch.randn(10, 64)
    msg = wire.encode_gradient(g)
    assert msg.dtype == pb.INT8
    with pytest.raises(ProtocolError, match="dtype INT8, the session uses INT4_HADAMARD"):
        wire.decode_activations(msg, "activations", (10, 64))
    torch.testing.assert_close(wire.decode_gradient(msg, "gradient", (10, 64)), g, rtol=0, atol=0.05)


def test_cli_names_match_the_codecs():
    """The torch-free names the CLI offers are the codec's."""
    assert run_config.WIRE_DTYPES == tuple(WIRES)
    assert run_config.COMPRESSIONS == COMPRESSION_NAMES
