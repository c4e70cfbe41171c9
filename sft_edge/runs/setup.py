"""Setting a training run up: the model, the split, the data, and the session to train through.

``prepare`` reads what the run trains on; ``open_session`` opens the cloud session (or builds the
local model), resuming from ``--output-dir``'s checkpoints when asked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import FFN_OUTPUT, SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.training import resolve_device
from sft_edge.data.files import FileSpec, load_file_task
from sft_edge.data.glue import (
    Batch,
    Encoded,
    Example,
    batch_indices,
    collate,
    encode,
    load_examples,
    steps_per_epoch,
)
from sft_edge.data.lm import LMEncoded, collate_lm, encode_lm
from sft_edge.data.tasks import Task, get_task
from sft_edge.link.connect import grpc_connector, keep_route_key, route_key
from sft_edge.link.transport import Transport
from sft_edge.runs.config import CAUSAL_LM, OptimConfig, TrainConfig
from sft_edge.runs.lm_run import lm_task, read_lm_task
from sft_edge.sessions.local import LocalSession
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession


@dataclass
class Run:
    """What a training run works on, read and checked before any session opens."""

    task: Task
    base: BaseModel
    spec: SplitSpec
    device: str
    max_len: int  # tokens per example after truncation
    train_data: Union[Encoded, LMEncoded]
    dev_data: Union[Encoded, LMEncoded]
    per_epoch: int  # steps per epoch
    total: int  # steps of the whole run
    optim: OptimConfig
    ushape: Optional[UShapeSpec] = None  # --label-private: the U (spec is then its first cut)
    lm_shape: Optional[str] = None  # --problem causal-lm: the rows' shape (text, prompt/completion, chat)

    def batch(self, data: Union[Encoded, LMEncoded], indices: Sequence[int]) -> Batch:
        """The padded batch of these examples (causal LM: with token labels)."""
        if isinstance(data, LMEncoded):
            return collate_lm(data, indices)
        return collate(data, indices)


@dataclass
class RunState:
    """What the loop accumulates; becomes the report, and is saved with each checkpoint."""

    steps: int = 0
    losses: List[float] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)
    session_id: str = ""
    resumes: int = 0  # edge restarts (--resume) before this process
    resumes_live: int = 0  # re-attachments in the process that wrote the checkpoint
    bytes_sent: int = 0  # traffic of earlier processes of this run
    bytes_received: int = 0
    seconds_before: float = 0.0

    def rolled_back(self, saved: Dict) -> RunState:
        """The run as a checkpoint saved it; resumes, traffic and time keep counting."""
        state = RunState(**saved)
        state.session_id = self.session_id or state.session_id
        state.resumes, state.seconds_before = self.resumes, self.seconds_before
        state.bytes_sent, state.bytes_received = self.bytes_sent, self.bytes_received
        return state

    def record(self, session: Any, started: float) -> Dict:
        """What a checkpoint saves: this state with the live session's counters folded in."""
        record = asdict(self)
        record["resumes_live"] = session.resumes
        record["bytes_sent"] += session.bytes_sent
        record["bytes_received"] += session.bytes_received
        record["seconds_before"] += time.time() - started
        return record


def read_task(cfg: TrainConfig) -> Tuple[Task, List[Example], List[Example]]:
    """The task and its training and dev examples: a GLUE preset, or the device's own file."""
    if cfg.train_file is not None:
        spec = FileSpec(
            cfg.train_file,
            cfg.dev_file,
            cfg.columns,
            cfg.label_column or "",
            cfg.problem,
            cfg.dev_share,
            cfg.seed,
        )
        return load_file_task(spec)
    assert cfg.task is not None
    task = get_task(cfg.task)
    return task, load_examples(task, "train", cfg.data_dir), load_examples(task, "dev", cfg.data_dir)


def prepare(cfg: TrainConfig, base: Optional[BaseModel] = None) -> Run:
    """Load the model and the data, resolve the split and the step budget."""
    from transformers import AutoTokenizer

    device = resolve_device(cfg.device)
    lm = cfg.problem == CAUSAL_LM
    if lm:  # the data first: its errors need no model
        assert cfg.train_file is not None
        task, (train_rows, dev_rows) = (
            lm_task(),
            read_lm_task(cfg.train_file, cfg.dev_file, cfg.dev_share, cfg.seed),
        )
    else:
        task, train_examples, dev_examples = read_task(cfg)
    base = base or load_base_model(cfg.model)
    if lm:
        from sft_common.topology.ushape_lm import check_causal_lm

        check_causal_lm(base)  # an encoder is refused by name
    layers = base.num_hidden_layers
    # The default cut: the last layer; for the U, the first (the edge's least work on both ends).
    split_layer = (0 if cfg.label_private else layers - 1) if cfg.split_layer is None else cfg.split_layer
    factorise = FFN_OUTPUT if cfg.local else cfg.factorise  # --local has no cut to factorise
    spec = SplitSpec(
        split_layer=split_layer, rank=cfg.rank, mode=cfg.mode, init=cfg.svd_init, factorise=factorise
    )
    spec.validate(layers, base.hidden_size, base.intermediate_size)
    ushape = None
    if cfg.label_private:
        ushape = UShapeSpec(split_layer, cfg.rank, cfg.tail_layers, cfg.mode, factorise=factorise)
        ushape.validate(layers)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    max_len = min(cfg.max_seq_len, base.max_position_embeddings)
    train_data: Union[Encoded, LMEncoded]
    dev_data: Union[Encoded, LMEncoded]
    if lm:
        train_data = encode_lm(train_rows[: cfg.max_train_examples], tokenizer, max_len, cfg.train_file or "")
        dev_data = encode_lm(
            dev_rows[: cfg.max_eval_examples], tokenizer, max_len, cfg.dev_file or cfg.train_file or ""
        )
    else:
        train_data = encode(train_examples[: cfg.max_train_examples], tokenizer, max_len)
        dev_data = encode(dev_examples[: cfg.max_eval_examples], tokenizer, max_len)
    per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
    # As in Hugging Face's Trainer, --max-steps overrides --epochs.
    total = cfg.max_steps if cfg.max_steps is not None else int(round(cfg.epochs * per_epoch))
    if total < 1:
        raise ValueError("nothing to train: --epochs and --max-steps give zero steps")
    optim = OptimConfig(
        cfg.lr, cfg.weight_decay, int(cfg.warmup_ratio * total), total, cfg.seed, cfg.factor_lr
    )
    shape = train_rows[0].shape if lm else None
    return Run(
        task, base, spec, device, max_len, train_data, dev_data, per_epoch, total, optim, ushape, shape
    )


def open_session(
    cfg: TrainConfig, run: Run, connect: Optional[Callable[[], Transport]] = None, route: str = ""
) -> Tuple[Union[EdgeSession, UShapeSession, LocalSession], RunState]:
    """The session to train through, and the run state to continue (fresh, or from the newest
    checkpoint with ``--resume``: the session then starts at the step both sides hold)."""
    checkpoints = CheckpointDir(f"{cfg.output_dir}/checkpoints") if cfg.output_dir else None
    route = route or route_key(cfg.output_dir)
    state, held = RunState(), []
    if cfg.resume:
        held = checkpoints.steps() if checkpoints else []
        if not held:
            raise ValueError(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints to resume from")
        state = RunState(**checkpoints.meta(held[0])["run"])  # type: ignore[union-attr]
        state.resumes += 1 + state.resumes_live  # this restart, and the re-attachments before it
        state.resumes_live = 0
    if cfg.local:
        start = held[0] if held else 0
        local = LocalSession(
            run.base, run.task.num_labels, run.optim, run.device, checkpoints, start, cfg.lora,
            causal_lm=run.lm_shape is not None,
        )  # fmt: skip
        return local, state
    args = (
        run.task.num_labels, connect or grpc_connector(cfg, route), run.optim, cfg.batch_size, run.max_len,
        cfg.link, run.task.name, run.device, checkpoints, state.session_id, held, cfg.reconnect_timeout,
    )  # fmt: skip
    session: Union[EdgeSession, UShapeSession]
    if run.ushape is not None:  # --label-private
        session = UShapeSession(
            run.base, run.ushape, *args, lora=cfg.lora, causal_lm=run.lm_shape is not None
        )
    else:
        session = EdgeSession(
            run.base, run.spec, *args, lora=cfg.lora, calibration=calibration_batches(cfg, run)
        )
    state.session_id = session.session_id
    keep_route_key(cfg.output_dir, route)
    return session, state


def calibration_batches(cfg: TrainConfig, run: Run) -> Iterator[Batch]:
    """--svd-init activation-aware or residual-aware: the first ``--calibration-batches`` training
    batches, in the run's seeded order (those of steps 0, 1, ...), made as they are read."""
    for k in range(cfg.calibration_batches):
        yield run.batch(run.train_data, batch_indices(len(run.train_data), cfg.batch_size, cfg.seed, k))
