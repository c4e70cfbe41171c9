"""The GLUE task registry: columns, label sets and metrics of each task, in two data layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Task:
    """One GLUE task as the GLUE TSV files and the Hugging Face ``glue`` dataset lay it out."""

    name: str  # Hugging Face spelling: sst2, mrpc, ...
    folder: str  # folder under the GLUE data dir
    tsv_columns: Tuple[str, ...]  # text columns in the TSV header (or indices, for CoLA)
    tsv_label: str  # label column in the TSV header (or index)
    hub_columns: Tuple[str, ...]  # text columns in the `glue` dataset
    labels: Optional[Tuple[str, ...]]  # label strings in id order; None: regression
    metrics: Tuple[str, ...]  # metric names; the first is the headline
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    has_header: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS = {
    t.name: t
    for t in (
        Task("sst2", "SST-2", ("sentence",), "label", ("sentence",), _BIN, ("accuracy",)),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), _BIN,
             ("f1", "accuracy")),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _NLI2, ("accuracy",)),
        Task("cola", "CoLA", ("3",), "1", ("sentence",), _BIN, ("matthews_correlation",), has_header=False),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None,
             ("pearson", "spearmanr")),
        Task("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), _NLI2, ("accuracy",)),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), _BIN,
             ("f1", "accuracy")),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
             ("entailment", "neutral", "contradiction"), ("accuracy",), dev_file="dev_matched.tsv",
             hub_dev_split="validation_matched"),
        Task("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _BIN, ("accuracy",)),
    )
}  # fmt: skip


CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearmanr", "mse")


def custom_task(text_columns: Tuple[str, ...], label_column: str, labels: Optional[Tuple[str, ...]]) -> Task:
    """A task read from the device's own file (``--train-file``): its columns, label names
    (None: regression) and the metrics of its kind."""
    metrics = REGRESSION_METRICS if labels is None else CLASSIFICATION_METRICS
    return Task("custom", "", text_columns, label_column, text_columns, labels, metrics)


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
