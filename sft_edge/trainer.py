"""The edge's training run: data, backend, loop, evaluation, report and saved weights.

``train(TrainConfig)`` is what ``sft-edge train`` calls. The loop is the same for split
training (SFT or SL, through a cloud session) and for ``--local`` training of the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from sft_common.spec import SplitSpec
from sft_common.models import DEFAULT_MODEL, BaseModel, load_base_model
from sft_edge import credentials, glue_metrics, scalars
from sft_edge.backends import LocalBackend, OptimConfig, SplitBackend, check_factor_lr, check_pipeline
from sft_edge.checkpoints import EdgeCheckpoints
from sft_edge.client import GrpcTransport, ResilientTransport, Rollback, Transport, open_channel
from sft_edge.data import Encoded, batch_indices, collate, encode, load_examples, steps_per_epoch
from sft_edge.tasks import Task, get_task

log = logging.getLogger("sft_edge")


@dataclass
class TrainConfig:
    """Everything `sft-edge train` takes; see DESIGN.md for the flags."""

    task: str
    cloud: str = "localhost:50051"  # HOST:PORT of sft-cloud
    model: str = DEFAULT_MODEL  # hub name, local folder, or random:<preset>
    data_dir: Optional[str] = None  # GLUE TSV layout; None: the hub via `datasets`
    split_layer: Optional[int] = None  # None: the last layer
    rank: int = 8
    mode: str = "sft"  # sft | sl
    wire_dtype: str = "fp32"  # fp32 | fp16 | bf16 | int8
    compression: str = "none"  # none | lz4
    batch_size: int = 32
    micro_batches: int = 1  # > 1: each step as that many pipelined micro-batches (split runs)
    pipeline_depth: int = 2  # micro-batches in flight at once
    cls_only: bool = False  # cut at the last layer: send only each example's [CLS] row
    epochs: float = 3.0
    max_steps: Optional[int] = None  # stop after this many steps (overrides epochs)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    lr: float = 2e-5
    factor_lr: Optional[float] = None  # SFT: learning rate of the SVD factors u, Σ, v; None: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_seq_len: int = 128
    seed: int = 42
    device: str = "auto"
    output_dir: Optional[str] = None
    resume: bool = False
    checkpoint_every: Optional[int] = None
    local: bool = False  # train the whole model here, no cloud
    insecure: bool = False
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    auth_token_file: Optional[str] = None
    report: Optional[str] = None  # write the JSON report here
    step_timeout: float = 600.0  # seconds to wait for one answer before treating the link as dead
    reconnect_timeout: float = 300.0  # seconds to keep trying to re-attach after a broken link
    progress: bool = True  # show a progress bar on stderr


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

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> RunState:
        return cls(**d)


def _restore(ckpts: EdgeCheckpoints, step: int, backend: Any, current: RunState) -> RunState:
    """Load the edge checkpoint of ``step``; the run record rolls back with it, but keeps
    counting resumes and traffic."""
    saved = RunState.from_dict(ckpts.load(step, backend))
    saved.session_id = current.session_id or saved.session_id
    saved.resumes = current.resumes
    saved.bytes_sent, saved.bytes_received = current.bytes_sent, current.bytes_received
    saved.seconds_before = current.seconds_before
    return saved


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def make_transport(cfg: TrainConfig, resume_steps: Callable[[], List[int]]) -> Transport:
    """The gRPC stream to the daemon named by ``cfg.cloud``: TLS unless ``--insecure``, with
    this device's bearer token when it has one."""
    creds, metadata = credentials.secure_link(
        cfg.cloud, cfg.insecure, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.auth_token_file
    )

    def connect() -> GrpcTransport:
        channel = open_channel(cfg.cloud, creds)
        return GrpcTransport(channel, metadata, timeout=cfg.step_timeout, owns_channel=True)

    return ResilientTransport(connect, resume_steps, reconnect_timeout=cfg.reconnect_timeout)


def evaluate(backend, data: Encoded, batch_size: int, task: Task, device: str) -> Dict[str, float]:
    """Dev-set metrics of the current model, in the task's metric names."""
    outputs = []
    for k, start in enumerate(range(0, len(data), batch_size)):
        idx = list(range(start, min(start + batch_size, len(data))))
        outputs.append(backend.predict(collate(data, idx).to(device), k).cpu())
    logits = torch.cat(outputs).numpy()
    gold = np.asarray(data.labels, dtype=np.float64 if task.is_regression else np.int64)
    return glue_metrics.compute(task.metrics, logits, gold)


def train(
    cfg: TrainConfig,
    transport_factory: Optional[Callable[[TrainConfig, Callable[[], List[int]]], Transport]] = None,
    base: Optional[BaseModel] = None,
) -> Dict:
    """Run one fine-tuning job end to end and return its report (also written to cfg.report)."""
    from transformers import AutoTokenizer

    start = time.time()
    task = get_task(cfg.task)
    device = resolve_device(cfg.device)
    if cfg.mode not in ("sft", "sl"):
        raise ValueError(f"--mode must be sft or sl, got {cfg.mode!r}")
    if cfg.batch_size < 1 or cfg.max_seq_len < 2:
        raise ValueError("--batch-size must be >= 1 and --max-seq-len >= 2")
    check_pipeline(cfg.micro_batches, cfg.pipeline_depth)
    if cfg.local and (cfg.micro_batches > 1 or cfg.cls_only):
        raise ValueError("--micro-batches and --cls-only shape what crosses the link; --local has no link")
    if cfg.micro_batches > cfg.batch_size:
        raise ValueError(
            f"--micro-batches {cfg.micro_batches} is more than --batch-size {cfg.batch_size}: "
            "every micro-batch needs at least one example"
        )
    check_factor_lr("local" if cfg.local else cfg.mode, cfg.factor_lr)  # before loading any data
    base = base or load_base_model(cfg.model)
    split_layer = base.config.num_hidden_layers - 1 if cfg.split_layer is None else cfg.split_layer
    spec = SplitSpec(split_layer=split_layer, rank=cfg.rank, mode=cfg.mode)
    spec.validate(base.config.num_hidden_layers, base.config.hidden_size, base.config.intermediate_size)

    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    max_len = min(cfg.max_seq_len, base.config.max_position_embeddings)
    train_data = encode(
        load_examples(task, "train", cfg.data_dir, cfg.max_train_examples), tokenizer, max_len
    )
    dev_data = encode(load_examples(task, "dev", cfg.data_dir, cfg.max_eval_examples), tokenizer, max_len)
    per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
    # As in Hugging Face's Trainer, --max-steps overrides --epochs.
    total = cfg.max_steps if cfg.max_steps is not None else int(round(cfg.epochs * per_epoch))
    if total < 1:
        raise ValueError("nothing to train: --epochs and --max-steps give zero steps")
    optim = OptimConfig(
        cfg.lr, cfg.weight_decay, int(cfg.warmup_ratio * total), total, cfg.seed, cfg.factor_lr
    )

    ckpts = EdgeCheckpoints(cfg.output_dir) if cfg.output_dir else None
    if cfg.checkpoint_every is not None and (cfg.checkpoint_every < 1 or ckpts is None):
        raise ValueError("--checkpoint-every N needs N >= 1 and an --output-dir to write checkpoints to")
    state = RunState()
    if cfg.resume:
        if ckpts is None or not ckpts.steps():
            raise ValueError(f"--resume: no checkpoint in {cfg.output_dir}/checkpoints to resume from")
        state = RunState.from_dict(ckpts.run_meta(ckpts.steps()[0]))
        state.resumes += 1 + state.resumes_live  # this restart, and the re-attachments before it
        state.resumes_live = 0

    backend: Union[LocalBackend, SplitBackend]
    transport: Optional[Transport] = None
    live = {"step": 0}  # the step in flight, for re-attaching after a broken link
    if cfg.local:
        backend = LocalBackend(base, task.num_labels, optim, device)
        backend.start_step = ckpts.steps()[0] if (cfg.resume and ckpts) else 0
    else:
        resume_steps = (ckpts.steps() if ckpts else []) if cfg.resume else []
        transport = (transport_factory or make_transport)(
            cfg, lambda: [live["step"]] + (ckpts.steps() if ckpts else [])
        )
        backend = SplitBackend(
            base, spec, task.num_labels, transport, optim, cfg.batch_size, max_len,
            cfg.wire_dtype, cfg.compression, task.name, device, state.session_id, resume_steps,
            cfg.micro_batches, cfg.pipeline_depth, cfg.cls_only,
        )  # fmt: skip
        state.session_id = backend.session.session_id
    step = backend.start_step
    if cfg.resume:
        assert ckpts is not None
        state = _restore(ckpts, step, backend, state)
    log.info(
        "training %s on %s: %d examples, %d steps (%d per epoch), %s%s",
        base.name, task.name, len(train_data), total, per_epoch,
        "local" if cfg.local else f"{cfg.mode} via {cfg.cloud}", f", resuming at step {step}" if cfg.resume else "",
    )  # fmt: skip

    bar = _progress(total, cfg.progress, initial=step)
    scalar_log = scalars.open_for_run(cfg.output_dir, cfg.report)  # loss, lr, traffic, evals as CSV
    try:
        while step < total:
            live["step"] = step
            try:
                idx = batch_indices(len(train_data), cfg.batch_size, cfg.seed, step)
                lr = backend.optimizer.param_groups[0]["lr"]  # the LR this step uses
                loss = backend.train_step(step, collate(train_data, idx).to(device))
                live["step"] = step + 1
                if (step + 1) % per_epoch == 0 or step + 1 == total:
                    result = evaluate(backend, dev_data, cfg.batch_size, task, device)
                    evals = state.evals + [
                        {"step": step + 1, "epoch": round((step + 1) / per_epoch, 3), **result}
                    ]
                    _say(
                        bar,
                        f"eval after step {step + 1}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
                    )
                    if scalar_log is not None:
                        scalar_log.eval(step + 1, result)
                else:
                    evals = state.evals
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                    backend.checkpoint(step + 1)  # the cloud first, then the edge (see Checkpoint)
            except Rollback as rb:
                assert ckpts is not None, "the cloud rolled back, but this run keeps no checkpoints"
                _say(
                    bar, f"the cloud restarted: rolling back from step {step} to its checkpoint at {rb.step}"
                )
                state = _restore(ckpts, rb.step, backend, state)
                step = rb.step
                if bar is not None:
                    bar.n = step
                continue
            state.losses.append(loss)
            state.evals = evals
            state.steps = step = step + 1
            if scalar_log is not None:
                scalar_log.train(
                    step, loss, lr, state.bytes_sent + (transport.bytes_sent if transport else 0),
                    state.bytes_received + (transport.bytes_received if transport else 0),
                )  # fmt: skip
            if (
                ckpts is not None
                and cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and step < total
            ):
                record = state.to_dict()
                record["resumes_live"] = transport.resumes if isinstance(transport, ResilientTransport) else 0
                record["bytes_sent"] += transport.bytes_sent if transport else 0
                record["bytes_received"] += transport.bytes_received if transport else 0
                record["seconds_before"] += time.time() - start
                ckpts.save(step, backend, record)
            if bar is not None:
                postfix = {"loss": f"{loss:.4f}"}
                if transport is not None:
                    postfix["sent"] = _human(transport.bytes_sent)
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if scalar_log is not None:
            scalar_log.close()
    cloud_steps = backend.close()
    seconds = time.time() - start

    report = {
        "task": task.name,
        "model": base.name,
        "mode": "local" if cfg.local else cfg.mode,
        "split_layer": None if cfg.local else split_layer,
        "rank": cfg.rank if (not cfg.local and cfg.mode == "sft") else None,
        "wire_dtype": None if cfg.local else cfg.wire_dtype,
        "compression": None if cfg.local else cfg.compression,
        "steps": state.steps,
        "cloud_steps": cloud_steps,
        "session_id": state.session_id or None,
        "seconds": round(seconds + state.seconds_before, 3),
        "metrics": {k: v for k, v in state.evals[-1].items() if k not in ("step", "epoch")},
        "eval_history": state.evals,
        "train_loss_first": state.losses[0],
        "train_loss_last": state.losses[-1],
        "bytes_sent": state.bytes_sent + (transport.bytes_sent if transport else 0),
        "bytes_received": state.bytes_received + (transport.bytes_received if transport else 0),
        # edge restarts with --resume, plus re-attachments after broken links in this process
        "resumes": state.resumes + (transport.resumes if isinstance(transport, ResilientTransport) else 0),
        "train_examples": len(train_data),
        "dev_examples": len(dev_data),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "device": device,
        "config": asdict(cfg),
    }
    if cfg.output_dir:
        _save(cfg, backend, report, split_layer)
    if cfg.report:
        _write_json(cfg.report, report)
    return report


def _save(cfg: TrainConfig, backend: Any, report: Dict, split_layer: int) -> None:
    """The trained weights as safetensors, with a JSON file saying how to load them."""
    from safetensors.torch import save_file

    assert cfg.output_dir is not None
    os.makedirs(cfg.output_dir, exist_ok=True)
    name = "model.safetensors" if cfg.local else "edge.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in backend.state_dict().items()}
    save_file(tensors, os.path.join(cfg.output_dir, name))
    meta = {
        "weights": name,
        "part": "full" if cfg.local else "edge",
        "model": report["model"],
        "mode": report["mode"],
        "split_layer": split_layer,
        "rank": cfg.rank,
        "task": cfg.task,
        "steps": report["steps"],
        "metrics": report["metrics"],
    }
    _write_json(os.path.join(cfg.output_dir, "sft_edge.json"), meta)


def _write_json(path: str, obj: Dict) -> None:
    """Atomic: write a temporary file beside the target, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def _say(bar, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        log.info(text)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GB"
