"""How a run is split between this device and the cloud: the run's kind, one strategy object each.

``TwoPart`` (the paper's split: net1 here, net2 and the loss on the cloud), ``UShape``
(``--label-private``: the head and the tail here, the middle on the cloud, the labels never leave),
``ForwardOnly`` (``--forward-only``, ``sft_edge.runs.forward_kind``: the U with its head and middle
frozen; no gradient crosses)
and ``Local`` (``--local``: the whole model here, no cloud). ``kind_of(cfg)`` resolves the flags
once, ``kind_of_record(record)`` a finished run; the trainer, the run's set-up, predict, generate
and ``load_trained`` ask the object and never branch on the kind. A kind checks its own flags,
picks its default cut, opens its session (for training, or a finished one for inference), and
fills its part of the report and of the run's record.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import FFN_INPUT, SplitSpec
from sft_edge.finished.record import EDGE, FULL, SPLIT, USHAPE, RunRecord
from sft_edge.runs.config import OptimConfig, TrainConfig, check_factor_lr


class RunKind:
    """The interface every kind implements (the split kinds share ``SplitKind``'s parts)."""

    name = ""  # in logs and errors
    part = EDGE  # what the run's --output-dir holds (sft_edge.finished.record)
    weights = "edge.safetensors"
    keeps_labels = False  # the labels and the loss stay on this device
    has_link = True  # traffic crosses a link to the cloud
    cloud_keeps_part = True  # a finished run's trained cloud part stays in its daemon session
    sends_once = False  # each example's rows cross once in all (not once an epoch): one DP release

    def check(self, cfg: TrainConfig) -> None:
        """Raise ValueError for flags this kind does not take (after the generic checks)."""
        raise NotImplementedError

    def default_split_layer(self, layers: int) -> int:
        return layers - 1

    def check_split(self, cfg: TrainConfig, spec: SplitSpec, layers: int) -> None:
        """Refuse a split the model cannot take (``spec`` is checked already), before any session."""

    def mode(self, cfg: TrainConfig) -> str:
        """The report's ``mode``: sft, sl or local."""
        return cfg.mode or "sft"  # set by runs.defaults before a run asks

    def describe(self, cfg: TrainConfig) -> str:
        return f"{cfg.mode} via {cfg.cloud}"

    def open(self, cfg: TrainConfig, run: Any, connect: Optional[Callable], held: List[int], session_id: str):
        """The session a run trains through (``sft_edge.sessions.base.Session``): a new cloud
        session, or with ``held`` checkpoint steps the run's ``session_id`` re-attached at one of them."""
        raise NotImplementedError

    def reopen(self, record: RunRecord, base, connect: Callable, device: str):
        """A finished run's session reopened for inference only (predict, export, generate)."""
        raise NotImplementedError(f"a {self.name} run keeps nothing on a daemon")

    def exported_files(self, folder: str, record: RunRecord, connection) -> Dict[str, bytes]:
        """``sft-edge export``: the files to write beside a copy of the run's folder (name -> bytes);
        a split kind's: the cloud part, fetched from the run's finished session."""
        from sft_edge.finished.parts import open_finished
        from sft_edge.finished.predict import fetch_weights

        session = open_finished(folder, record, connection, "cpu")
        try:
            return {"cloud.safetensors": fetch_weights(session)}
        finally:
            session.close()

    def exported_part(self, record: RunRecord) -> str:
        """What ``sft-edge export`` makes of the run's folder (``RunRecord.part``): the U's three
        parts where the labels stay here, else both halves."""
        return USHAPE if self.keeps_labels else SPLIT

    def report(self, cfg: TrainConfig, run: Any) -> Dict[str, Any]:
        """The report's fields that say how the run was split."""
        sft = cfg.mode == "sft"
        return {
            "mode": self.mode(cfg),
            "split_layer": run.spec.split_layer,
            "label_private": cfg.label_private,
            "tail_layers": None,
            "rank": cfg.rank if sft else None,
            "factorise": run.spec.factorise if sft else None,
            "wire_dtype": cfg.wire_dtype,
            "compression": cfg.compression,
            "delta_cache_mb": cfg.delta_cache_mb,
        }


def check_cut(cfg: TrainConfig) -> None:
    """A split kind's cut: the FFN-input bottleneck is an SFT cut."""
    if cfg.factorise == FFN_INPUT and cfg.mode == "sl":
        raise ValueError(
            "--factorise ffn-input needs --mode sft: plain split learning sends the hidden states and "
            "factorises nothing"
        )
    check_factor_lr(cfg.mode or "sft", cfg.factor_lr)  # None: a factor LR makes it sft (runs.defaults)


def check_delta(cfg: TrainConfig, spec: SplitSpec) -> None:
    """``--delta-cache-mb`` only where the hidden state itself crosses (the resolved cut ``spec``)."""
    if cfg.delta_cache_mb and not spec.cut.carries_hidden_state:
        raise ValueError(
            f"--delta-cache-mb needs full-width cuts (--mode sl), not --mode {spec.mode}: a rank-R cut "
            "sends factors of the activations, which delta mode does not cache"
        )


def session_arguments(
    cfg: TrainConfig, run: Any, connect: Optional[Callable], held: List[int], session_id: str
):
    """The arguments the two split sessions share, in their constructors' order after the spec."""
    checkpoints = CheckpointDir(f"{cfg.output_dir}/checkpoints") if cfg.output_dir else None
    return (
        run.problem.num_labels(run.task),
        connect,
        run.optim,
        cfg.batch_size,
        run.max_len,
        cfg.link,
        run.task.name,
        run.device,
        checkpoints,
        session_id,
        held,
        cfg.reconnect_timeout,
    )


def finished_arguments(record: RunRecord, device: str) -> Dict[str, Any]:
    """The keyword arguments a finished split session is reopened with."""
    from sft_edge.runs.config import LinkOptions

    return dict(
        batch_size=record.batch_size,
        max_seq_len=record.max_seq_len,
        link=LinkOptions(wire_dtype=record.wire_dtype, compression=record.compression),
        device=device,
        session_id=record.session_id,
        inference_only=True,
        lora=record.lora_spec(),
    )


class TwoPart(RunKind):
    """The paper's split: net1 (and u) here; Σ, v, net2, the head and the loss on the cloud."""

    name = "two-part"

    def check(self, cfg: TrainConfig) -> None:
        if cfg.tail_layers != 1:
            raise ValueError("--tail-layers goes with --label-private (the U-shaped split)")
        check_cut(cfg)

    def check_split(self, cfg: TrainConfig, spec: SplitSpec, layers: int) -> None:
        check_delta(cfg, spec)

    def open(self, cfg, run, connect, held, session_id):
        from sft_edge.sessions.two_part import EdgeSession

        args = session_arguments(cfg, run, connect, held, session_id)
        return EdgeSession(run.base, run.spec, *args, lora=cfg.lora)

    def reopen(self, record, base, connect, device):
        from sft_edge.sessions.two_part import EdgeSession

        optim = OptimConfig(seed=record.seed)
        kw = finished_arguments(record, device)
        return EdgeSession(base, record.split_spec(), record.num_labels, connect, optim, **kw)


class UShape(RunKind):
    """``--label-private``: the head and the tail here (the labels, the loss), the middle on the cloud."""

    name = "label-private"
    keeps_labels = True

    def check(self, cfg: TrainConfig) -> None:
        if cfg.micro_batches > 1 or cfg.cls_only:
            raise ValueError(
                "--label-private is a split with the cloud that sends each step whole: it does not go with "
                "--local, --micro-batches or --cls-only"
            )
        check_cut(cfg)

    def default_split_layer(self, layers: int) -> int:
        return 0  # the edge's least work on both ends

    def describe(self, cfg: TrainConfig) -> str:
        return f"{cfg.mode} label-private via {cfg.cloud}"

    def report(self, cfg, run):
        return {**super().report(cfg, run), "tail_layers": cfg.tail_layers}

    def check_split(self, cfg: TrainConfig, spec: SplitSpec, layers: int) -> None:
        self.ushape(cfg, spec).validate(layers)
        check_delta(cfg, spec)

    @staticmethod
    def ushape(cfg: TrainConfig, first: SplitSpec):
        """The U whose first cut is ``first``, with the run's tail."""
        from sft_common.topology.ushape import UShapeSpec

        return UShapeSpec(first.split_layer, cfg.rank, cfg.tail_layers, first.mode, factorise=cfg.factorise)

    def open(self, cfg, run, connect, held, session_id):
        from sft_edge.sessions.ushape import UShapeSession

        spec = self.ushape(cfg, run.spec)
        args = session_arguments(cfg, run, connect, held, session_id)
        return UShapeSession(run.base, spec, *args, lora=cfg.lora, causal_lm=run.problem.causal_lm)

    def reopen(self, record, base, connect, device):
        from sft_edge.sessions.ushape import UShapeSession

        optim = OptimConfig(seed=record.seed)
        kw = finished_arguments(record, device)
        spec = record.ushape_spec()
        return UShapeSession(base, spec, record.num_labels, connect, optim, causal_lm=record.causal_lm, **kw)


class Local(RunKind):
    """``--local``: the whole unsplit model here, no cloud (the baseline split training is compared with)."""

    name = "local"
    part = FULL
    weights = "model.safetensors"
    keeps_labels = True
    has_link = False
    cloud_keeps_part = False

    def check(self, cfg: TrainConfig) -> None:
        if cfg.micro_batches > 1 or cfg.cls_only:
            raise ValueError(
                "--micro-batches and --cls-only shape what crosses the link; --local has no link"
            )
        if cfg.label_private:
            raise ValueError(
                "--label-private is a split with the cloud that sends each step whole: it does not go with "
                "--local, --micro-batches or --cls-only"
            )
        if cfg.tail_layers != 1:
            raise ValueError("--tail-layers goes with --label-private (the U-shaped split)")
        if cfg.delta_cache_mb:
            raise ValueError("--delta-cache-mb shapes what crosses the link; --local has no link")
        check_factor_lr("local", cfg.factor_lr)

    def mode(self, cfg: TrainConfig) -> str:
        return "local"

    def describe(self, cfg: TrainConfig) -> str:
        return "local"

    def open(self, cfg, run, connect, held, session_id):
        from sft_edge.sessions.local import LocalSession

        checkpoints = CheckpointDir(f"{cfg.output_dir}/checkpoints") if cfg.output_dir else None
        start = held[0] if held else 0
        return LocalSession(
            run.base,
            run.problem.num_labels(run.task),
            run.optim,
            run.device,
            checkpoints,
            start,
            cfg.lora,
            causal_lm=run.problem.causal_lm,
        )

    def report(self, cfg, run):
        fields = dict.fromkeys(
            ("split_layer", "tail_layers", "rank", "factorise", "wire_dtype", "compression", "delta_cache_mb")
        )
        return {**fields, "mode": "local", "label_private": cfg.label_private}


def kind_of(cfg: TrainConfig) -> RunKind:
    """The kind ``--local``, ``--forward-only`` and ``--label-private`` name."""
    if cfg.local:
        return Local()
    if cfg.forward_only:
        from sft_edge.runs.forward_kind import ForwardOnly

        return ForwardOnly()
    return UShape() if cfg.label_private else TwoPart()


def kind_of_record(record: RunRecord) -> RunKind:
    """The kind a finished run trained as (an export keeps its kind: its part names it)."""
    if record.part == FULL:
        return Local()
    if record.forward_only:
        from sft_edge.runs.forward_kind import ForwardOnly

        return ForwardOnly()
    return UShape() if record.label_private or record.part == USHAPE else TwoPart()


def exported_part(record: RunRecord) -> str:
    """What ``sft-edge export`` makes of a split run's folder (``RunKind.exported_part``)."""
    return kind_of_record(record).exported_part(record)
