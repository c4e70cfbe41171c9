"""What the cloud checks of a session's configuration before it builds anything."""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import grpc
import torch

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import lora_from_config
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import ACTIVATION_AWARE, FFN_INPUT, FFN_OUTPUT, PLAIN, RESIDUAL_AWARE, SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError

MODES = {pb.SFT: "sft", pb.SL: "sl"}
FACTORISE = {pb.FFN_OUTPUT: FFN_OUTPUT, pb.FFN_INPUT: FFN_INPUT}
INITS = {
    pb.SVD_INIT_PLAIN: PLAIN,
    pb.SVD_INIT_ACTIVATION_AWARE: ACTIVATION_AWARE,
    pb.SVD_INIT_RESIDUAL_AWARE: RESIDUAL_AWARE,
}


def invalid(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, message)


def spec_from_config(config: pb.SessionConfig) -> SplitSpec:
    """The split spec a session config asks for; INVALID_ARGUMENT if it is not well formed."""
    if config.mode not in MODES:
        raise invalid(f"mode {config.mode} is not one of SFT, SL")
    if config.factorise not in FACTORISE:
        raise invalid(f"factorise {config.factorise} is not one of FFN_OUTPUT, FFN_INPUT")
    if config.svd_init not in INITS:
        raise invalid(
            f"svd_init {config.svd_init} is not one of SVD_INIT_PLAIN, SVD_INIT_ACTIVATION_AWARE, "
            "SVD_INIT_RESIDUAL_AWARE"
        )
    return SplitSpec(
        split_layer=config.split_layer,
        rank=config.rank,
        mode=MODES[config.mode],
        init=INITS[config.svd_init],
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
    if config.wire_dtype not in codec.SUPPORTED_WIRE_DTYPES:
        names = ", ".join(pb.DType.Name(d) for d in sorted(codec.SUPPORTED_WIRE_DTYPES))
        raise invalid(f"wire dtype {config.wire_dtype} is not one of {names}")
    if config.compression not in (pb.COMPRESSION_NONE, pb.LZ4):
        raise invalid(f"compression {config.compression} is not one of COMPRESSION_NONE, LZ4")
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
    return spec


def given_factors(msg: pb.OpenSession) -> Optional[Tuple[Optional[pb.Tensor], pb.Tensor]]:
    """The cloud's factors an open carries (activation- or residual-aware init), checked for
    presence: only with the open of a new session, and always there when its config asks for such an
    init (a re-attach or a reopen keeps the session's own); Σ and v at the FFN output, v = Bᵀ
    alone at the FFN input. Returns (Σ or None, v), or None."""
    has_sigma, has_v = msg.HasField("cloud_sigma"), msg.HasField("cloud_v")
    new = not msg.session_id and not msg.inference_only
    aware = msg.config.svd_init != pb.SVD_INIT_PLAIN
    if (has_sigma or has_v) and not new:
        raise invalid(
            "cloud_sigma and cloud_v come with the open of a new session only: this session has its own"
        )
    if new and (has_sigma or has_v) != aware:
        raise invalid(
            "a calibrated svd_init (ACTIVATION_AWARE, RESIDUAL_AWARE) and the edge's factors "
            "(cloud_sigma, cloud_v) go together: "
            + ("the open carries none" if aware else "this session's init is the plain SVD")
        )
    if not (new and aware):
        return None
    needs_sigma = msg.config.factorise != pb.FFN_INPUT
    if not has_v or has_sigma != needs_sigma:
        raise invalid(
            "a calibrated init at the FFN output needs both cloud_sigma and cloud_v"
            if needs_sigma
            else "a calibrated init at the FFN input takes cloud_v (Bᵀ) alone, no cloud_sigma"
        )
    return (msg.cloud_sigma if has_sigma else None), msg.cloud_v


def decode_factors(
    tensors: Tuple[Optional[pb.Tensor], pb.Tensor], spec: SplitSpec, hidden: int
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Σ (rank,) or None, and v (rank, hidden), or INVALID_ARGUMENT saying what is wrong: a plain
    init, not fp32, another shape, NaN or Inf (``codec.decode`` checks those, sizes first)."""
    if spec.init == PLAIN:
        raise invalid("cloud_sigma and cloud_v come with a calibrated init only (not the plain SVD)")
    rank = spec.rank
    cap = 4 * rank * hidden
    sigma = None
    if tensors[0] is not None:
        sigma = codec.decode(tensors[0], name="cloud_sigma", dtype=pb.FLOAT32, shape=(rank,), max_bytes=cap)
    v = codec.decode(tensors[1], name="cloud_v", dtype=pb.FLOAT32, shape=(rank, hidden), max_bytes=cap)
    return sigma, v
