"""What a run learns (``--problem``): labelled texts (classes or a number), or a causal language model.

A ``Problem`` reads and checks its data, encodes and batches it, and evaluates the current model
on the dev set; the trainer asks it and never branches on the problem. ``problem_of(cfg)`` picks
one, once. A causal LM's rows are ``sft_edge.data.lm``'s (JSON Lines: text, prompt/completion or
chat); its metrics are the dev loss per learnt token and its perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from sft_edge.data import metrics as task_metrics
from sft_edge.data.files import FileSpec, hold_out, load_file_task
from sft_edge.data.glue import Batch, Encoded, collate, encode, load_examples
from sft_edge.data.lm import LMEncoded, LMRow, collate_lm, encode_lm, lm_loss_sum, perplexity, read_lm_rows
from sft_edge.data.tasks import Task, get_task

CAUSAL_LM = "causal-lm"
LM_METRICS = ("perplexity", "loss")  # of the dev rows; the first is the headline


@dataclass
class Data:
    """A problem's task and its training and dev rows, read and checked, not yet tokenised."""

    task: Task
    train: List[Any]  # Example or LMRow
    dev: List[Any]
    lm_shape: Optional[str] = None  # causal LM: the rows' shape (text, prompt/completion, chat)


class Problem:
    """The interface: what the trainer, the report and the run's record ask of a problem."""

    name = ""  # as the run's record says it (classification, regression, causal-lm)
    evaluates_at_start = False  # report the untrained model's dev metrics as step 0
    causal_lm = False  # the model ends in its own LM head; the loss is the next-token one

    def check(self, cfg, keeps_labels: bool) -> None:
        """Raise ValueError for flags this problem does not take. ``keeps_labels``: whether the
        run kind keeps the labels (and the loss) on this device."""
        raise NotImplementedError

    def read(self, cfg) -> Data:
        raise NotImplementedError

    def check_model(self, base) -> None:
        """Refuse a model this problem cannot train (before anything is built)."""

    def encode(self, rows: Sequence[Any], tokenizer, max_len: int, path: str) -> Any:
        raise NotImplementedError

    def batch(self, data: Any, indices: Sequence[int]) -> Batch:
        raise NotImplementedError

    def record_name(self, task: Task) -> str:
        return self.name

    def num_labels(self, task: Task) -> int:
        """The width of the head the run trains (0: the model's own LM head)."""
        return task.num_labels

    def evaluate(
        self, session, data: Any, task: Task, batch_size: int, device: str, tick: Callable[[], None]
    ) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
        """Dev metrics of the current model (nothing changes), and its logits where they say more."""
        raise NotImplementedError

    def start_check(self, cfg, run, split_loss: float) -> Optional[Dict[str, float]]:
        """Step 0 of the split model against the unsplit one (``runs.start_check``), or None."""
        return None

    def report_extra(self, task: Task, data: Any, logits: Optional[np.ndarray]) -> Dict[str, Any]:
        """What this problem adds to the run's report."""
        return {}


class TextClassification(Problem):
    """Labelled texts: a GLUE task, or the device's own file (classes, or a number: regression)."""

    def check(self, cfg, keeps_labels: bool) -> None:
        if cfg.train_file is None:
            return
        if not cfg.label_column or not 1 <= len(cfg.columns) <= 2:
            raise ValueError(
                "--train-file needs --text-columns (one column, or two for sentence pairs: A,B) "
                "and --label-column"
            )
        if cfg.label_column in cfg.columns:
            raise ValueError(f"--label-column {cfg.label_column!r} is also a text column")

    def read(self, cfg) -> Data:
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
            return Data(*load_file_task(spec))
        task = get_task(cfg.task)
        return Data(
            task, load_examples(task, "train", cfg.data_dir), load_examples(task, "dev", cfg.data_dir)
        )

    def encode(self, rows: Sequence[Any], tokenizer, max_len: int, path: str) -> Encoded:
        return encode(rows, tokenizer, max_len)

    def batch(self, data: Encoded, indices: Sequence[int]) -> Batch:
        return collate(data, indices)

    def record_name(self, task: Task) -> str:
        return "regression" if task.is_regression else "classification"

    def evaluate(self, session, data, task, batch_size, device, tick):
        logits = predict_all(session, data, batch_size, device, tick)
        return task_metrics.compute(task.metrics, logits, gold_labels(task, data)), logits

    def report_extra(self, task: Task, data: Any, logits: Optional[np.ndarray]) -> Dict[str, Any]:
        """A file's classes: precision, recall and F1 of each (GLUE reports its own metrics only)."""
        if task.name != "custom" or task.labels is None or logits is None:
            return {}
        return {"per_class": task_metrics.per_class(logits, gold_labels(task, data), task.labels)}


class CausalLM(Problem):
    """Fine-tune a decoder on JSON Lines rows; the labels are the text itself."""

    name = CAUSAL_LM
    evaluates_at_start = True  # the untrained model's perplexity: what the fine-tuning starts from
    causal_lm = True

    def check(self, cfg, keeps_labels: bool) -> None:
        if cfg.train_file is None:
            raise ValueError("--problem causal-lm trains on your own --train-file (JSON Lines), not a --task")
        if cfg.text_columns or cfg.label_column:
            raise ValueError(
                "--problem causal-lm takes no --text-columns or --label-column: its rows name their "
                "fields (text; prompt and completion; or messages)"
            )
        if not keeps_labels:
            raise ValueError(
                "--problem causal-lm needs --label-private: in the two-part split the cloud holds the "
                "head and computes the loss, so it would be sent the labels, which for a language model "
                "are the text itself (every next token); the U-shape keeps the LM head and the loss here "
                "(or train the whole model here with --local)"
            )

    def read(self, cfg) -> Data:
        train, dev = read_lm_task(cfg.train_file, cfg.dev_file, cfg.dev_share, cfg.seed)
        return Data(lm_task(), train, dev, train[0].shape)

    def check_model(self, base) -> None:
        from sft_common.topology.ushape_lm import check_causal_lm

        check_causal_lm(base)  # an encoder is refused by name

    def encode(self, rows: Sequence[Any], tokenizer, max_len: int, path: str) -> LMEncoded:
        return encode_lm(rows, tokenizer, max_len, path)

    def batch(self, data: LMEncoded, indices: Sequence[int]) -> Batch:
        return collate_lm(data, indices)

    def num_labels(self, task: Task) -> int:
        return 0

    def evaluate(self, session, data, task, batch_size, device, tick):
        return evaluate_lm(session, data, batch_size, device, tick), None

    def start_check(self, cfg, run, split_loss: float) -> Optional[Dict[str, float]]:
        from sft_edge.runs.start_check import start_check

        return start_check(cfg, run, split_loss)


def problem_of(cfg) -> Problem:
    """The problem ``--problem`` names (auto, classification and regression are read from the data)."""
    return CausalLM() if cfg.problem == CAUSAL_LM else TextClassification()


def lm_task() -> Task:
    """The task a causal-LM run reports under: no labels, no columns, perplexity and loss."""
    return Task(CAUSAL_LM, "", (), "", (), None, LM_METRICS)


def read_lm_task(
    train_file: str, dev_file: Optional[str], dev_share: float, seed: int
) -> Tuple[List[LMRow], List[LMRow]]:
    """The training and dev rows (the dev rows: ``dev_file``'s, or a seeded share of the training
    file's). Both files hold rows of one shape (``sft_edge.data.lm``)."""
    train_rows = read_lm_rows(train_file)
    if dev_file is None:
        return hold_out(train_rows, dev_share, seed, train_file)
    dev_rows = read_lm_rows(dev_file)
    if dev_rows[0].shape != train_rows[0].shape:
        raise ValueError(
            f"{dev_file} holds {dev_rows[0].shape} rows and {train_file} {train_rows[0].shape} rows: "
            "give the dev file the training file's row shape"
        )
    return train_rows, dev_rows


def evaluate_lm(
    session, data: LMEncoded, batch_size: int, device: str, tick: Optional[Callable[[], None]] = None
) -> Dict[str, float]:
    """Dev perplexity and mean loss per learnt token of the current model (nothing changes): the
    sum of ``lm_loss_sum`` over the batches, divided by their learnt tokens."""
    total, count = 0.0, 0
    for k, start in enumerate(range(0, len(data), batch_size)):
        batch = collate_lm(data, range(start, min(start + batch_size, len(data)))).to(device)
        summed, n = lm_loss_sum(session.predict(batch, k), batch.labels)
        total, count = total + float(summed), count + n
        if tick is not None:
            tick()
    loss = total / max(count, 1)
    return {"perplexity": perplexity(loss), "loss": loss}


def predict_all(
    session, data: Encoded, batch_size: int, device: str, tick: Optional[Callable[[], None]] = None
) -> np.ndarray:
    """The current model's logits for every example of ``data``, (examples, num_labels)."""
    import torch

    outputs = []
    for k, start in enumerate(range(0, len(data), batch_size)):
        idx = list(range(start, min(start + batch_size, len(data))))
        outputs.append(session.predict(collate(data, idx).to(device), k).cpu())
        if tick is not None:
            tick()
    return torch.cat(outputs).numpy()


def gold_labels(task: Task, data: Encoded) -> np.ndarray:
    return np.asarray(data.labels, dtype=np.float64 if task.is_regression else np.int64)
