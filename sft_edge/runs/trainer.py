"""The edge's training run: the loop over steps, evaluation, checkpoints, and the report.

``train(TrainConfig)`` is what ``sft-edge train`` calls. The loop is the same for every run kind
(``sft_edge.runs.kinds``: the two-part split, the U, ``--local``) and every problem
(``sft_edge.runs.problems``): it talks to a ``Session`` and asks the run's kind and problem the
rest. Data and model set-up live in ``sft_edge.runs.setup``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional

import numpy as np

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import lora_record, resolve_lora
from sft_common.storage.atomic import write_json
from sft_edge.data.glue import Encoded, batch_indices
from sft_edge.data.tasks import Task
from sft_edge.finished.record import RunRecord
from sft_edge.link.connect import connect_to_cloud
from sft_edge.link.transport import Transport
from sft_edge.runs import scalars
from sft_edge.runs.config import TrainConfig
from sft_edge.runs.kinds import kind_of
from sft_edge.runs.privacy import privacy_of, setting_of
from sft_edge.runs.problems import TextClassification
from sft_edge.runs.progress import Progress
from sft_edge.runs.setup import Run, RunState, open_session, prepare
from sft_edge.sessions.base import Session, delta_memory
from sft_edge.sessions.client import Rollback

__all__ = ["TrainConfig", "RunState", "Interrupted", "train", "evaluate"]
log = logging.getLogger("sft_edge")


class Interrupted(Exception):
    """Ctrl-C during the run: where it stopped, and how to continue."""

    def __init__(self, step: int, total: int, checkpoint: Optional[int], output_dir: Optional[str]):
        if checkpoint is not None:
            then = f"rerun with --resume (and the same --output-dir {output_dir}) to continue from step {checkpoint}"
        else:
            then = "no checkpoint was written (--output-dir with --checkpoint-every N makes a run resumable)"
        super().__init__(f"interrupted at step {step} of {total}; {then}")


def evaluate(session: Session, data: Encoded, batch_size: int, task: Task, device: str) -> Dict[str, float]:
    """Dev-set metrics of the current model, in the task's metric names."""
    return TextClassification().evaluate(session, data, task, batch_size, device, lambda: None)[0]


def train(
    cfg: TrainConfig,
    connect: Optional[Callable[[], Transport]] = None,
    base: Optional[BaseModel] = None,
    route: str = "",
) -> Dict:
    """Run one fine-tuning job end to end and return its report (also written to cfg.report).
    ``connect``: a factory of transports to the cloud (default: gRPC to ``cfg.cloud``, checked
    first); ``route``: the routing key its streams carry."""
    started = time.time()
    cfg.validate()
    if connect is None and kind_of(cfg).has_link:
        connect, route = connect_to_cloud(cfg)
    run = prepare(cfg, base)
    cfg = run.cfg  # the cut and wire resolved for this model
    session, state = open_session(cfg, run, connect, route)
    step = session.start_step
    if cfg.resume:
        state = state.rolled_back(session.restore(step))
    resuming = f", resuming at step {step}" if cfg.resume else ""
    log.info(
        "training %s on %s: %d examples, %d steps (%d per epoch), %s%s",
        run.base.name,
        run.task.name,
        len(run.train_data),
        run.total,
        run.per_epoch,
        run.kind.describe(cfg),
        resuming,
    )
    progress = Progress(run.total, cfg.progress, initial=step, per_epoch=run.per_epoch)
    scalar_log = scalars.open_for_run(cfg.output_dir, cfg.report)  # loss, lr, traffic, evals as CSV
    loop = Loop(cfg, run, session, progress, scalar_log)
    if run.problem.evaluates_at_start and step == 0 and not cfg.resume:
        state.evals = [loop.eval_entry(0)]  # the untrained model's perplexity
        state.start_check = run.problem.start_check(
            cfg, run, state.evals[0]["loss"]
        )  # warns if the split broke it
    try:
        state = loop.train_from(state, step, started)
    except KeyboardInterrupt:
        held = session.checkpoints.steps() if session.checkpoints else []
        raise Interrupted(loop.step, run.total, held[0] if held else None, cfg.output_dir) from None
    finally:
        progress.close()
        if scalar_log is not None:
            scalar_log.close()
    cloud_steps = session.close()
    report = _report(cfg, run, state, session, cloud_steps, time.time() - started)
    report.update(run.problem.report_extra(run.task, run.dev_data, loop.logits))
    log.info("%s", report["privacy"]["summary"])  # what the messages sent were measured to give away
    if cfg.output_dir:
        _save(cfg, run, session, report)
    if report["delta_cache_bytes"] is not None:
        log.info("delta mode: the caches hold %.1f MiB on this side", report["delta_cache_bytes"] / 2**20)
    if cfg.report:
        write_json(cfg.report, report)
    return report


class Loop:
    """The steps of one run: train, evaluate at each epoch's end, checkpoint, roll back."""

    def __init__(self, cfg: TrainConfig, run: Run, session: Session, progress: Progress, scalar_log):
        self.cfg, self.run, self.session, self.progress, self.scalars = (
            cfg,
            run,
            session,
            progress,
            scalar_log,
        )
        self.logits: Optional[np.ndarray] = None  # of the newest evaluation
        self.step = 0

    def train_from(self, state: RunState, step: int, started: float) -> RunState:
        """Train from ``step`` to the run's last; returns the state the report is made of."""
        cfg, run, session = self.cfg, self.run, self.session
        self.step = step
        while self.step < run.total:
            step = self.step
            try:
                lr = session.current_lr()  # the LR this step uses
                idx = batch_indices(len(run.train_data), cfg.batch_size, cfg.seed, step)
                loss = session.train_step(step, run.batch(run.train_data, idx).to(run.device))
                evals = state.evals
                if (step + 1) % run.per_epoch == 0 or step + 1 == run.total:
                    evals = evals + [self.eval_entry(step + 1)]
                state.losses.append(loss)
                state.evals, state.steps = evals, step + 1
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < run.total:
                    with self.progress.phase("checkpointing", step + 1):
                        session.checkpoint(step + 1, state.record(session, started))  # the cloud first
            except Rollback as rb:
                self.progress.say(
                    f"the cloud restarted: rolling back from step {step} to its checkpoint at {rb.step}"
                )
                state, self.step = state.rolled_back(rb.run), rb.step
                self.progress.jump(self.step)
                continue
            self.step = step + 1
            self._show(state, self.step, loss, lr, len(idx))
        return state

    def _show(self, state: RunState, step: int, loss: float, lr: float, examples: int) -> None:
        """The step on the progress bar and in the scalars (traffic only where there is a link)."""
        sent = state.bytes_sent + self.session.bytes_sent
        received = state.bytes_received + self.session.bytes_received
        if self.scalars is not None:
            self.scalars.train(step, loss, lr, sent, received)
        link = (sent, received) if self.run.kind.has_link else (None, None)
        self.progress.step(loss, lr, examples, *link)

    def eval_entry(self, done: int) -> Dict[str, Any]:
        """The eval_history entry after ``done`` steps (shown as progress; written to the scalars)."""
        run = self.run
        batches = -(-len(run.dev_data) // self.cfg.batch_size)
        with self.progress.phase("evaluating", done, batches) as phase:
            result, logits = run.problem.evaluate(
                self.session, run.dev_data, run.task, self.cfg.batch_size, run.device, phase.tick
            )
        if logits is not None:
            self.logits = logits
        self.progress.say(f"eval after step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        entry = {"step": done, "epoch": round(done / run.per_epoch, 3), **result}
        if self.scalars is not None:
            self.scalars.eval(done, entry)
        return entry


def _report(
    cfg: TrainConfig, run: Run, state: RunState, session: Session, cloud_steps, seconds: float
) -> Dict:
    return {
        "task": run.task.name,
        "train_file": cfg.train_file,
        "labels": list(run.task.labels) if run.task.labels is not None else None,  # names, in id order
        "model": run.base.name,
        **run.kind.report(cfg, run),  # mode, split_layer, label_private, rank, wire dtype, ...
        "steps": state.steps,
        "cloud_steps": cloud_steps,
        "session_id": state.session_id or None,
        "seconds": round(seconds + state.seconds_before, 3),
        "metrics": {k: v for k, v in state.evals[-1].items() if k not in ("step", "epoch")},
        "eval_history": state.evals,
        "start_check": state.start_check,  # causal LM: step 0's dev loss, split and unsplit
        "privacy": privacy_of(setting_of(cfg, run)),  # what crossed, what attacks read back from it
        "train_loss_first": state.losses[0],
        "train_loss_last": state.losses[-1],
        "bytes_sent": state.bytes_sent + session.bytes_sent,
        "bytes_received": state.bytes_received + session.bytes_received,
        "delta_cache_bytes": delta_memory(session),  # delta mode: what this side's caches hold (None: off)
        # edge restarts with --resume, plus re-attachments after broken links in this process
        "resumes": state.resumes + session.resumes,
        "train_examples": len(run.train_data),
        "dev_examples": len(run.dev_data),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "device": run.device,
        "config": asdict(cfg),
    }


def _save(cfg: TrainConfig, run: Run, session: Session, report: Dict) -> None:
    """The trained weights as safetensors, with what it takes to use them: ``sft_edge.json``
    (the split, the label names, the text columns, the cloud session), the model's config with
    the head's label count, and the tokenizer (``sft_edge.finished``, ``sft-edge predict``)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    assert cfg.output_dir is not None
    os.makedirs(cfg.output_dir, exist_ok=True)
    kind = run.kind
    tensors = {k: v.detach().cpu().contiguous() for k, v in session.state_dict().items()}
    save_file(tensors, os.path.join(cfg.output_dir, kind.weights))
    config = run.base.config.__class__.from_dict(run.base.config.to_dict())
    num_labels = run.problem.num_labels(run.task)
    if num_labels:  # a causal LM keeps its config: the LM head is the vocabulary's
        config.num_labels = num_labels
    config.save_pretrained(cfg.output_dir)
    AutoTokenizer.from_pretrained(run.base.tokenizer_dir).save_pretrained(cfg.output_dir)
    record_of(cfg, run, report).write(cfg.output_dir)


def record_of(cfg: TrainConfig, run: Run, report: Dict) -> RunRecord:
    """The finished run's record (``sft_edge.json``)."""
    return RunRecord(
        part=run.kind.part,
        model=report["model"],
        mode=report["mode"],
        problem=run.problem.record_name(run.task),
        num_labels=run.problem.num_labels(run.task),
        seed=cfg.seed,
        max_seq_len=run.max_len,
        weights=run.kind.weights,
        split_layer=run.spec.split_layer,
        label_private=cfg.label_private,
        tail_layers=report["tail_layers"],
        forward_only=cfg.forward_only,
        adapters=report.get("adapters"),
        rank=cfg.rank,
        factorise=run.spec.factorise,
        lm_shape=run.lm_shape,
        task=run.task.name,
        labels=report["labels"],
        text_columns=list(run.task.tsv_columns),
        label_column=run.task.tsv_label,
        batch_size=cfg.batch_size,
        wire_dtype=cfg.link.wire_dtype,
        compression=cfg.link.compression,
        lora=lora_record(resolve_lora(cfg.lora, run.base.config.model_type)),
        base_fingerprint=run.base.fingerprint,
        session_id=report["session_id"],
        steps=report["steps"],
        metrics=report["metrics"],
    )
