"""Setting a training run up: the model, the split, the data, and the session to train through.

``prepare`` reads what the run trains on; ``open_session`` opens the cloud session (or builds the
local model), resuming from ``--output-dir``'s checkpoints when asked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import FFN_OUTPUT, SplitSpec
from sft_common.training import resolve_device
from sft_edge.data.glue import Batch, steps_per_epoch
from sft_edge.data.tasks import Task
from sft_edge.link.connect import grpc_connector, keep_route_key, route_key
from sft_edge.link.transport import Transport
from sft_edge.runs.config import OptimConfig, TrainConfig
from sft_edge.runs.defaults import resolved
from sft_edge.runs.kinds import RunKind, kind_of
from sft_edge.runs.problems import Problem, problem_of
from sft_edge.sessions.base import Session


@dataclass
class Run:
    """What a training run works on, read and checked before any session opens."""

    cfg: TrainConfig  # the run's flags, the cut and wire resolved (``runs.defaults``)
    kind: RunKind  # how it is split (two-part, the U, local)
    problem: Problem  # what it learns (labelled texts, or a causal LM)
    task: Task
    base: BaseModel
    spec: SplitSpec  # the cut (the U's first cut)
    device: str
    max_len: int  # tokens per example after truncation
    train_data: Any  # the problem's encoded rows
    dev_data: Any
    per_epoch: int  # steps per epoch
    total: int  # steps of the whole run
    optim: OptimConfig
    lm_shape: Optional[str] = None  # --problem causal-lm: the rows' shape (text, prompt/completion, chat)

    def batch(self, data: Any, indices: Sequence[int]) -> Batch:
        """The padded batch of these examples (causal LM: with token labels)."""
        return self.problem.batch(data, indices)


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
    start_check: Optional[Dict[str, float]] = None  # runs.start_check: step 0, split and unsplit

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


def prepare(cfg: TrainConfig, base: Optional[BaseModel] = None) -> Run:
    """Load the model and the data, resolve the split and the step budget."""
    from transformers import AutoTokenizer

    device = resolve_device(cfg.device)
    kind, problem = kind_of(cfg), problem_of(cfg)
    data = problem.read(cfg)  # the data first: its errors need no model
    base = base or load_base_model(cfg.model)
    problem.check_model(base)
    cfg = resolved(cfg, base)
    layers = base.num_hidden_layers
    split_layer = kind.default_split_layer(layers) if cfg.split_layer is None else cfg.split_layer
    factorise = cfg.factorise if kind.has_link else FFN_OUTPUT  # --local has no cut to factorise
    spec = SplitSpec(split_layer, cfg.rank, cfg.mode or "sft", factorise=factorise)  # resolved above
    spec.validate(layers, base.hidden_size, base.intermediate_size)
    kind.check_split(cfg, spec, layers)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    max_len = min(cfg.max_seq_len, base.max_position_embeddings)
    train_path = cfg.train_file or ""
    train_data = problem.encode(data.train[: cfg.max_train_examples], tokenizer, max_len, train_path)
    dev_data = problem.encode(
        data.dev[: cfg.max_eval_examples], tokenizer, max_len, cfg.dev_file or train_path
    )
    per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
    # As in Hugging Face's Trainer, --max-steps overrides --epochs.
    total = cfg.max_steps if cfg.max_steps is not None else int(round(cfg.epochs * per_epoch))
    if total < 1:
        raise ValueError("nothing to train: --epochs and --max-steps give zero steps")
    warmup = int(cfg.warmup_ratio * total)
    optim = OptimConfig(cfg.lr, cfg.weight_decay, warmup, total, cfg.seed, cfg.factor_lr)
    return Run(
        cfg,
        kind,
        problem,
        data.task,
        base,
        spec,
        device,
        max_len,
        train_data,
        dev_data,
        per_epoch,
        total,
        optim,
        data.lm_shape,
    )


def open_session(
    cfg: TrainConfig, run: Run, connect: Optional[Callable[[], Transport]] = None, route: str = ""
) -> Tuple[Session, RunState]:
    """The session to train through, and the run state to continue (fresh, or from the newest
    checkpoint with ``--resume``: the session then starts at the step both sides hold)."""
    state, held = RunState(), []
    if cfg.resume:
        checkpoints = CheckpointDir(f"{cfg.output_dir}/checkpoints")
        held = checkpoints.steps()
        if not held:
            raise ValueError(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints to resume from")
        state = RunState(**checkpoints.meta(held[0])["run"])
        state.resumes += 1 + state.resumes_live  # this restart, and the re-attachments before it
        state.resumes_live = 0
    route = route or route_key(cfg.output_dir)
    if run.kind.has_link:
        connect = connect or grpc_connector(cfg, route)
    session = run.kind.open(cfg, run, connect, held, state.session_id)
    state.session_id = session.session_id
    if run.kind.has_link:
        keep_route_key(cfg.output_dir, route)
    return session, state
