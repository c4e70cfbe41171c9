"""The edge's training run: the loop over steps, evaluation, checkpoints, and the report.

``train(TrainConfig)`` is what ``sft-edge train`` calls. The loop is the same for split
training (``EdgeSession``: SFT or SL, through a cloud session) and for ``--local`` training of
the whole model (``LocalSession``); data and model set-up live in ``sft_edge.runs.setup``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from sft_common.models.base_model import BaseModel
from sft_common.storage.atomic import write_json
from sft_edge.data import metrics as glue_metrics
from sft_edge.data.glue import Encoded, batch_indices, collate
from sft_edge.data.lm import LMEncoded
from sft_edge.data.tasks import Task
from sft_edge.finished.trained import RUN_FILE
from sft_edge.link.connect import connect_to_cloud
from sft_edge.link.transport import Transport
from sft_edge.runs import scalars
from sft_edge.runs.config import TrainConfig
from sft_edge.runs.lm_run import evaluate_lm
from sft_edge.runs.progress import Progress
from sft_edge.runs.setup import Run, RunState, open_session, prepare
from sft_edge.sessions.local import LocalSession
from sft_edge.sessions.two_part import EdgeSession, Rollback
from sft_edge.sessions.ushape import UShapeSession

__all__ = ["TrainConfig", "RunState", "Interrupted", "train", "evaluate"]
log = logging.getLogger("sft_edge")
Session = Union[EdgeSession, UShapeSession, LocalSession]


class Interrupted(Exception):
    """Ctrl-C during the run: where it stopped, and how to continue."""

    def __init__(self, step: int, total: int, checkpoint: Optional[int], output_dir: Optional[str]):
        if checkpoint is not None:
            then = f"rerun with --resume (and the same --output-dir {output_dir}) to continue from step {checkpoint}"
        else:
            then = "no checkpoint was written (--output-dir with --checkpoint-every N makes a run resumable)"
        super().__init__(f"interrupted at step {step} of {total}; {then}")


def predict_all(
    session, data: Encoded, batch_size: int, device: str, tick: Optional[Callable[[], None]] = None
) -> np.ndarray:
    """The current model's logits for every example of ``data``, (examples, num_labels)."""
    outputs = []
    for k, start in enumerate(range(0, len(data), batch_size)):
        idx = list(range(start, min(start + batch_size, len(data))))
        outputs.append(session.predict(collate(data, idx).to(device), k).cpu())
        if tick is not None:
            tick()
    return torch.cat(outputs).numpy()


def gold_labels(task: Task, data: Encoded) -> np.ndarray:
    return np.asarray(data.labels, dtype=np.float64 if task.is_regression else np.int64)


def evaluate(session, data: Encoded, batch_size: int, task: Task, device: str) -> Dict[str, float]:
    """Dev-set metrics of the current model, in the task's metric names."""
    logits = predict_all(session, data, batch_size, device)
    return glue_metrics.compute(task.metrics, logits, gold_labels(task, data))


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
    if connect is None and not cfg.local:
        connect, route = connect_to_cloud(cfg)
    run = prepare(cfg, base)
    session, state = open_session(cfg, run, connect, route)
    step = session.start_step
    if cfg.resume:
        state = state.rolled_back(session.restore(step))
    log.info(
        "training %s on %s: %d examples, %d steps (%d per epoch), %s%s",
        run.base.name, run.task.name, len(run.train_data), run.total, run.per_epoch,
        "local" if cfg.local else f"{cfg.mode}{' label-private' if cfg.label_private else ''} via {cfg.cloud}", f", resuming at step {step}" if cfg.resume else "",
    )  # fmt: skip
    progress = Progress(run.total, cfg.progress, initial=step, per_epoch=run.per_epoch)
    logits = None  # of the newest evaluation
    # --problem causal-lm: dev loss and perplexity, no classes
    gold = None if isinstance(run.dev_data, LMEncoded) else gold_labels(run.task, run.dev_data)
    scalar_log = scalars.open_for_run(cfg.output_dir, cfg.report)  # loss, lr, traffic, evals as CSV
    if gold is None and step == 0 and not cfg.resume:  # causal LM: the untrained model's perplexity
        state.evals = [_eval_entry(session, run, cfg.batch_size, gold, progress, 0)[0]]
        if scalar_log is not None:
            scalar_log.eval(0, state.evals[0])
    try:
        while step < run.total:
            try:
                lr = session.optimizer.param_groups[0]["lr"]  # the LR this step uses
                idx = batch_indices(len(run.train_data), cfg.batch_size, cfg.seed, step)
                loss = session.train_step(step, run.batch(run.train_data, idx).to(run.device))
                evals = state.evals
                if (step + 1) % run.per_epoch == 0 or step + 1 == run.total:
                    entry, logits = _eval_entry(session, run, cfg.batch_size, gold, progress, step + 1)
                    evals = evals + [entry]
                    if scalar_log is not None:
                        scalar_log.eval(step + 1, entry)
                state.losses.append(loss)
                state.evals, state.steps = evals, step + 1
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < run.total:
                    with progress.phase("checkpointing", step + 1):
                        session.checkpoint(
                            step + 1, state.record(session, started)
                        )  # the cloud first, then here
            except Rollback as rb:
                progress.say(
                    f"the cloud restarted: rolling back from step {step} to its checkpoint at {rb.step}"
                )
                state, step = state.rolled_back(rb.run), rb.step
                progress.jump(step)
                continue
            step += 1
            sent, received = (
                state.bytes_sent + session.bytes_sent,
                state.bytes_received + session.bytes_received,
            )
            if scalar_log is not None:
                scalar_log.train(step, loss, lr, sent, received)
            link = (sent, received) if not cfg.local else (None, None)
            progress.step(loss, lr, len(idx), *link)
    except KeyboardInterrupt:
        held = session.checkpoints.steps() if session.checkpoints else []
        raise Interrupted(step, run.total, held[0] if held else None, cfg.output_dir) from None
    finally:
        progress.close()
        if scalar_log is not None:
            scalar_log.close()
    cloud_steps = session.close()
    report = _report(cfg, run, state, session, cloud_steps, time.time() - started)
    if run.task.name == "custom" and run.task.labels is not None and logits is not None and gold is not None:
        report["per_class"] = glue_metrics.per_class(logits, gold, run.task.labels)
    if cfg.output_dir:
        _save(cfg, run, session, report)
    if cfg.report:
        write_json(cfg.report, report)
    return report


def _eval_entry(
    session, run: Run, batch_size: int, gold: Optional[np.ndarray], progress: Progress, done: int
) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
    """The eval_history entry after ``done`` steps (shown as progress), and the dev logits."""
    batches = -(-len(run.dev_data) // batch_size)
    with progress.phase("evaluating", done, batches) as phase:
        result, logits = _dev_metrics(session, run, batch_size, gold, phase.tick)
    progress.say(f"eval after step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return {"step": done, "epoch": round(done / run.per_epoch, 3), **result}, logits


def _dev_metrics(
    session, run: Run, batch_size: int, gold: Optional[np.ndarray], tick: Callable[[], None]
) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
    """The dev metrics of the current model, and its logits (None for a causal LM: its metrics
    are the dev loss and perplexity)."""
    if isinstance(run.dev_data, LMEncoded):
        return evaluate_lm(session, run.dev_data, batch_size, run.device, tick), None
    assert gold is not None
    logits = predict_all(session, run.dev_data, batch_size, run.device, tick)
    return glue_metrics.compute(run.task.metrics, logits, gold), logits


def _report(
    cfg: TrainConfig, run: Run, state: RunState, session: Session, cloud_steps, seconds: float
) -> Dict:
    split = not cfg.local
    return {
        "task": run.task.name,
        "train_file": cfg.train_file,
        "labels": list(run.task.labels) if run.task.labels is not None else None,  # names, in id order
        "model": run.base.name,
        "mode": cfg.mode if split else "local",
        "split_layer": run.spec.split_layer if split else None,
        "label_private": cfg.label_private,  # the U-shape: head, tail and loss on the edge
        "tail_layers": cfg.tail_layers if cfg.label_private else None,
        "rank": cfg.rank if (split and cfg.mode == "sft") else None,
        "factorise": run.spec.factorise if (split and cfg.mode == "sft") else None,
        "wire_dtype": cfg.wire_dtype if split else None,
        "compression": cfg.compression if split else None,
        "steps": state.steps,
        "cloud_steps": cloud_steps,
        "session_id": state.session_id or None,
        "seconds": round(seconds + state.seconds_before, 3),
        "metrics": {k: v for k, v in state.evals[-1].items() if k not in ("step", "epoch")},
        "eval_history": state.evals,
        "train_loss_first": state.losses[0],
        "train_loss_last": state.losses[-1],
        "bytes_sent": state.bytes_sent + session.bytes_sent,
        "bytes_received": state.bytes_received + session.bytes_received,
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
    the head's label count, and the tokenizer (``sft_edge.finished.trained``, ``sft-edge predict``)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    assert cfg.output_dir is not None
    os.makedirs(cfg.output_dir, exist_ok=True)
    name = "model.safetensors" if cfg.local else "edge.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in session.state_dict().items()}
    save_file(tensors, os.path.join(cfg.output_dir, name))
    config = run.base.config.__class__.from_dict(run.base.config.to_dict())
    lm = run.lm_shape is not None
    if not lm:  # a causal LM keeps its config: the LM head is the vocabulary's
        config.num_labels = run.task.num_labels
    config.save_pretrained(cfg.output_dir)
    AutoTokenizer.from_pretrained(run.base.tokenizer_dir).save_pretrained(cfg.output_dir)
    meta = {
        "format": 1,
        "weights": name,
        "part": "full" if cfg.local else "edge",
        "model": report["model"],
        "mode": report["mode"],
        "split_layer": run.spec.split_layer,
        "label_private": cfg.label_private,  # the U-shape: the weights hold head.* and tail.*
        "tail_layers": cfg.tail_layers if cfg.label_private else None,
        "rank": cfg.rank,
        "svd_init": cfg.svd_init,  # the fingerprint covers it (predict and export reopen the session)
        "factorise": run.spec.factorise,  # the FFN linear cut: predict and export rebuild its halves
        "problem": "causal-lm" if lm else "classification" if run.task.labels is not None else "regression",
        "lm_shape": run.lm_shape,  # causal LM: the rows' shape (generate templates chat runs' prompts)
        "num_labels": 0 if lm else run.task.num_labels,
        "task": run.task.name,
        "labels": report["labels"],  # names, in id order; None: regression
        "text_columns": list(run.task.tsv_columns),
        "label_column": run.task.tsv_label,
        "max_seq_len": run.max_len,
        "batch_size": cfg.batch_size,
        "wire_dtype": cfg.wire_dtype,
        "compression": cfg.compression,
        "seed": cfg.seed,
        # LoRA: the weights hold only what training owns; the base comes from "model", checked
        "lora": cfg.lora.resolved(run.base.config.model_type).as_dict() if cfg.lora else None,
        "base_fingerprint": run.base.fingerprint,
        "session_id": report["session_id"],
        "steps": report["steps"],
        "metrics": report["metrics"],
    }
    write_json(os.path.join(cfg.output_dir, RUN_FILE), meta)
