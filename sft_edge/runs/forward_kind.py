"""The forward-only run kind (``--forward-only``): the U with its head and the cloud's middle frozen.

``ForwardOnly`` is ``UShape`` with a frozen head and middle: only the device's part trains (the
tail, or with ``--adapters parallel`` a side network beside the frozen tail). The first
cut's activations cross once per example and the middle's answers are cached on the device
(``sft_edge.sessions.forward_only``, ``sft_edge.data.activation_cache``): no gradient, label or loss
crosses, later epochs need no cloud, and the cloud serves the base's middle, frozen
(``sft_cloud.sessions.frozen``). ``kinds.kind_of`` resolves the flag into it.
"""

from __future__ import annotations

from typing import Any

from sft_common.storage.checkpoint import CheckpointDir
from sft_edge.finished.record import USHAPE, USHAPE_SIDE
from sft_edge.runs.config import OptimConfig, TrainConfig
from sft_edge.runs.defaults import asks_for_factors
from sft_edge.runs.kinds import UShape


class ForwardOnly(UShape):
    """``--forward-only``: the U with the head and the middle frozen; only the tail trains, here."""

    name = "forward-only"
    cloud_keeps_part = False  # the middle is the base's: any daemon serving the model serves it
    sends_once = True  # an example's (noised) first cut crosses once; its answer is cached

    def check(self, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.mode not in FORWARD_MODES:
            raise ValueError(FULL_WIDTH)
        if asks_for_factors(cfg):
            raise ValueError(FULL_WIDTH)
        if cfg.adapters not in ADAPTERS:
            raise ValueError(f"--adapters must be one of {', '.join(ADAPTERS)}, got {cfg.adapters!r}")
        if cfg.adapters == "parallel" and cfg.peft:
            raise ValueError(PARALLEL_NO_LORA)
        if cfg.activation_cache_mb < 0:
            raise ValueError(f"--activation-cache-mb must be >= 0, got {cfg.activation_cache_mb}")
        if cfg.link.dp.grad_noise > 0:
            raise ValueError(NO_GRADIENT_DP)
        if cfg.delta_cache_mb:
            raise ValueError(
                "--delta-cache-mb is for trained splits: --forward-only sends each example once "
                "(--activation-cache-mb keeps the middle's answers)"
            )

    def describe(self, cfg: TrainConfig) -> str:
        return f"forward-only ({cfg.adapters}: {cfg.tail_layers} layers here) via {cfg.cloud}"

    def report(self, cfg, run):
        return {**super().report(cfg, run), "forward_only": True, "adapters": cfg.adapters}

    def open(self, cfg, run, connect, held, session_id):
        folder = f"{cfg.output_dir}/activation_cache" if cfg.output_dir else None
        checkpoints = CheckpointDir(f"{cfg.output_dir}/checkpoints") if cfg.output_dir else None
        cache = forward_cache(
            folder,
            run.base,
            run.spec,
            cfg.tail_layers,
            cfg.link,
            cfg.activation_cache_mb,
            cfg.adapters,
            cfg.seed,
        )
        return forward_session(cfg, run, connect, cache, checkpoints, held[0] if held else 0)

    def exported_files(self, folder, record, connection):
        """Built here from the base and what the run trained (its tail, or its side network and task
        head): no daemon holds anything of the run."""
        from sft_edge.finished.frozen_parts import forward_only_files
        from sft_edge.finished.side_parts import side_files

        build = {"tail": forward_only_files, "parallel": side_files}[adapters_of(record)]
        return build(folder, record)

    def exported_part(self, record):
        """The U's three parts; with a side network, those and the side network beside them."""
        return EXPORTED_PARTS[adapters_of(record)]

    def reopen(self, record, base, connect, device):
        from sft_edge.runs.config import LinkOptions
        from sft_edge.sessions.forward_only import ForwardOnlySession

        spec = record.ushape_spec()
        link = LinkOptions(wire_dtype=record.wire_dtype, compression=record.compression)
        adapters = adapters_of(record)
        cache = forward_cache(None, base, spec, spec.tail_layers, link, INFERENCE_CACHE_MB, adapters)
        optim = OptimConfig(seed=record.seed)
        return ForwardOnlySession(
            base,
            spec,
            record.num_labels,
            connect,
            optim,
            record.batch_size,
            record.max_seq_len,
            link,
            cache,
            device=device,
            lora=record.lora_spec(),
            causal_lm=record.causal_lm,
            adapters=adapters,
        )


NO_GRADIENT_DP = (
    "--forward-only sends no gradient, so --dp-grad-noise has nothing to noise (--dp-noise clips and "
    "noises each example's first cut, once: its answer is cached)"
)
FORWARD_MODES = (None, "sl")  # --mode of a forward-only run: the full width (None: runs.defaults says sl)
FULL_WIDTH = (
    "--forward-only sends the full width (--mode sl): its head is frozen, so a rank-R cut would drop what "
    "the first layers compute for good (no --mode sft, --factorise or --factor-lr)"
)
ADAPTERS = ("tail", "parallel")  # --adapters: where a forward-only run's trainable part sits (placement_of)
PARALLEL_NO_LORA = (
    "--adapters parallel trains a side network beside the frozen backbone (and a task head): "
    "no --peft lora (that is --adapters tail's)"
)
EXPORTED_PARTS = {"tail": USHAPE, "parallel": USHAPE_SIDE}  # what an export of each --adapters holds
INFERENCE_CACHE_MB = 256.0  # a finished forward-only run's answers, in memory, for repeated prompts


def adapters_of(record) -> str:
    """What trained on the device in a finished forward-only run (``ADAPTERS``)."""
    return record.adapters or "tail"  # runs before --adapters parallel recorded none


def forward_cache(
    folder, base, spec, tail_layers: int, link, budget_mb: float, adapters: str = "tail", seed: int = 0
):
    """A forward-only run's ``ActivationCache``: its identity is what the middle's answers depend on
    (with a side network its width too, so a cache made without the middle's taps is refused; with
    ``--dp-noise`` the noise, its clip and the seed it is drawn from)."""
    from sft_common.topology.side import side_width
    from sft_edge.data.activation_cache import ActivationCache

    identity = {
        "base": base.fingerprint,
        "split_layer": spec.split_layer,
        "tail_layers": tail_layers,
        "wire_dtype": link.wire_dtype,
    }
    if adapters == "parallel":  # absent for the tail: its caches from before this field still read
        identity["side_width"] = side_width(base.hidden_size)
    if link.dp.noise > 0:  # absent without noise: caches from before --dp-noise still read
        identity["dp_noise"] = [link.dp.noise, link.dp.clip, seed]
    return ActivationCache(folder, identity, budget_mb)


def forward_session(cfg: TrainConfig, run: Any, connect, cache, checkpoints, start: int):
    from sft_edge.sessions.forward_only import ForwardOnlySession

    spec = ForwardOnly.ushape(cfg, run.spec)
    return ForwardOnlySession(
        run.base,
        spec,
        run.problem.num_labels(run.task),
        connect,
        run.optim,
        cfg.batch_size,
        run.max_len,
        cfg.link,
        cache,
        run.task.name,
        run.device,
        checkpoints,
        start,
        cfg.reconnect_timeout,
        lora=cfg.lora,
        causal_lm=run.problem.causal_lm,
        adapters=cfg.adapters,
    )
