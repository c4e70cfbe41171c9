"""What the cloud checks of a session's configuration before it builds anything."""

from __future__ import annotations

import math
from typing import Callable

import grpc

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import lora_from_config
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import FFN_INPUT, FFN_OUTPUT, SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec, delta
from sft_common.wire.compress import SUPPORTED as SUPPORTED_COMPRESSIONS
from sft_common.wire.errors import ProtocolError

MODES = {pb.SFT: "sft", pb.SL: "sl"}
FACTORISE = {pb.FFN_OUTPUT: FFN_OUTPUT, pb.FFN_INPUT: FFN_INPUT}


def invalid(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, message)


def spec_from_config(config: pb.SessionConfig) -> SplitSpec:
    """The split spec a session config asks for; INVALID_ARGUMENT if it is not well formed."""
    if config.mode not in MODES:
        raise invalid(f"mode {config.mode} is not one of SFT, SL")
    if config.factorise not in FACTORISE:
        raise invalid(f"factorise {config.factorise} is not one of FFN_OUTPUT, FFN_INPUT")
    return SplitSpec(
        split_layer=config.split_layer,
        rank=config.rank,
        mode=MODES[config.mode],
        factorise=FACTORISE[config.factorise],
    )


def ushape_from_config(config: pb.SessionConfig) -> UShapeSpec:
    """The U a label-private session config asks for (``spec_from_config`` checks the mode and
    the factorisation, which both cuts share)."""
    spec = spec_from_config(config)
    return UShapeSpec(
        config.split_layer, config.rank, config.tail_layers, spec.mode, factorise=spec.factorise
    )


def check_config(
    config: pb.SessionConfig,
    base: BaseModel,
    max_batch: int,
    max_seq: int,
    check_split: Callable[[pb.SessionConfig, SplitSpec, BaseModel], None],
) -> SplitSpec:
    """Validate a session config against the model and the server's limits. Returns the (first)
    cut; ``check_split`` is the session's own check of its split (the two-part's or the U's)."""
    spec = spec_from_config(config)
    check_split(config, spec, base)
    names = ", ".join(pb.DType.Name(d) for d in sorted(codec.SUPPORTED_WIRE_DTYPES))
    if config.wire_dtype not in codec.SUPPORTED_WIRE_DTYPES:
        raise invalid(f"wire dtype {config.wire_dtype} is not one of {names}")
    for what, dtype in (("gradient", config.grad_wire_dtype), ("down", config.down_wire_dtype)):
        if dtype and dtype not in codec.SUPPORTED_WIRE_DTYPES:
            raise invalid(f"{what} wire dtype {dtype} is not one of {names}")
    if config.compression not in SUPPORTED_COMPRESSIONS:
        known = ", ".join(pb.Compression.Name(c) for c in sorted(SUPPORTED_COMPRESSIONS))
        raise invalid(f"compression {config.compression} is not one of {known}")
    if not 1 <= config.max_batch_size <= max_batch:
        raise invalid(f"max_batch_size must be in 1..{max_batch}, got {config.max_batch_size}")
    seq_cap = min(max_seq, base.max_position_embeddings)
    if not 1 <= config.max_seq_len <= seq_cap:
        raise invalid(f"max_seq_len must be in 1..{seq_cap}, got {config.max_seq_len}")
    if not (math.isfinite(config.lr) and 0 < config.lr < 1):
        raise invalid(f"lr must be in (0, 1), got {config.lr}")
    if not (math.isfinite(config.factor_lr) and 0 <= config.factor_lr < 1):
        raise invalid(f"factor_lr must be in (0, 1), or 0 for lr; got {config.factor_lr}")
    try:
        lora_from_config(config, base)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if config.factor_lr and config.mode != pb.SFT:
        raise invalid("factor_lr is for SFT: plain split learning has no factors")
    if not (math.isfinite(config.weight_decay) and 0 <= config.weight_decay < 1):
        raise invalid(f"weight_decay must be in [0, 1), got {config.weight_decay}")
    if config.total_steps < 1 or not 0 <= config.warmup_steps <= config.total_steps:
        raise invalid(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
            f"got {config.total_steps} and {config.warmup_steps}"
        )
    delta_refusal = delta.check_config(config)
    if delta_refusal is not None:
        raise invalid(delta_refusal)
    if config.side_width and not config.forward_only:
        raise invalid(
            "side_width is for forward-only sessions (their side network reads the middle's layers)"
        )
    return spec


def refuse_calibrated_init(msg: pb.OpenSession) -> None:
    """INVALID_ARGUMENT for an open that asks for a calibrated start of the factors: an
    ``svd_init`` other than plain, or the edge's factors (``cloud_sigma``, ``cloud_v``). Those
    initialisations were removed (no gain, more leakage: docs/accuracy.md, docs/privacy.md); the
    fields stay in the .proto so that old edges get this answer, not a silent plain start."""
    if msg.config.svd_init != pb.SVD_INIT_PLAIN or msg.HasField("cloud_sigma") or msg.HasField("cloud_v"):
        raise invalid(
            "calibrated initialisation (svd_init ACTIVATION_AWARE or RESIDUAL_AWARE, cloud_sigma, "
            "cloud_v) was removed: the factors start from the cloud's plain SVD; open with "
            "svd_init SVD_INIT_PLAIN and no cloud_sigma or cloud_v"
        )
