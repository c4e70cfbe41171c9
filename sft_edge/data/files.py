"""The device's own labelled text files: CSV, TSV, JSON Lines and Parquet, read with `datasets`.

``load_file_task`` turns ``--train-file [--dev-file] --text-columns --label-column --problem`` into
a ``Task`` (label names sorted from the training file, or regression) and its examples. Files are
read by `datasets`' local loaders only (never the hub), into a temporary cache that is removed
afterwards. Everything is checked before a session opens, and an error names the file, the line
and the column: a missing column, an empty file, a row with too few fields, text that is not
UTF-8, a dev label the training file lacks, one class only.
"""

from __future__ import annotations

import csv
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from sft_edge.data.glue import DataError, Example
from sft_edge.data.tasks import Task, custom_task
from sft_edge.runs.config import PROBLEMS

# extension -> `datasets` loader; the text formats are checked line by line first
FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class FileSpec:
    """What ``--train-file`` and its companions say."""

    train_file: str
    dev_file: Optional[str]  # None: hold out ``dev_share`` of the training file
    text_columns: Tuple[str, ...]  # one, or two for sentence pairs
    label_column: str
    problem: str = "auto"  # auto | classification | regression
    dev_share: float = 0.1
    seed: int = 42  # which rows are held out


def load_file_task(spec: FileSpec) -> Tuple[Task, List[Example], List[Example]]:
    """The task a file describes, with its training and dev examples (labels as ids or floats)."""
    columns = list(spec.text_columns) + [spec.label_column]
    train_rows = read_rows(spec.train_file, columns)
    if spec.dev_file is not None:
        dev_rows = read_rows(spec.dev_file, columns)
    else:
        train_rows, dev_rows = hold_out(train_rows, spec.dev_share, spec.seed, spec.train_file)
    train_labels = [row[spec.label_column] for row, _ in train_rows]
    regression = _is_regression(spec.problem, train_labels)
    names: Optional[Tuple[str, ...]] = None
    if not regression:
        names = tuple(str(v) for v in sorted(set(train_labels), key=_label_order))
        if len(names) < 2:
            raise DataError(
                f"{spec.train_file}: column {spec.label_column!r} holds one class only ({names[0]!r}): "
                "a classifier needs at least two (or pass --problem regression for numbers)"
            )
    task = custom_task(spec.text_columns, spec.label_column, names)
    train = _examples(train_rows, spec, task, spec.train_file)
    dev = _examples(dev_rows, spec, task, spec.dev_file or spec.train_file)
    return task, train, dev


def read_rows(path: str, columns: Sequence[str]) -> List[Tuple[Dict, int]]:
    """``(row, line number)`` for every row of a file, keeping ``columns``; checked."""
    fmt = _format(path)
    if fmt == "csv":
        lines = _check_delimited(path, columns)
    elif fmt == "json":
        lines = check_text(path)
    table = _load(path, fmt)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r}; the file has {', '.join(map(repr, table.column_names))} "
            "(see --text-columns and --label-column)"
        )
    if len(table) == 0:
        raise DataError(f"{path}: the file has no rows")
    rows = table.select_columns(list(columns)).to_list()
    if fmt == "parquet" or len(lines) != len(rows):  # Parquet, or a JSON array: row numbers
        lines = list(range(1, len(rows) + 1))
    out = []
    for row, line in zip(rows, lines):
        for c in columns:
            if row[c] is None or (isinstance(row[c], str) and not row[c].strip()):
                raise DataError(f"{path}:{line}: column {c!r} is empty")
        out.append((row, line))
    return out


def _format(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise DataError(
            f"{path}: unknown file type {ext or '(none)'!r}; use .csv, .tsv, .jsonl, .json or .parquet"
        )
    return FORMATS[ext]


def check_text(path: str) -> List[int]:
    """UTF-8 throughout (the line and column of the first bad byte otherwise); the numbers of
    the lines that hold something (JSON Lines: one row each)."""
    lines = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if text.strip():
                lines.append(n)
    if not lines:
        raise DataError(f"{path}: the file is empty")
    return lines


def _check_delimited(path: str, columns: Sequence[str]) -> List[int]:
    """Every row has the header's number of fields; returns each row's first line number."""
    check_text(path)
    csv.field_size_limit(sys.maxsize)
    tsv = path.lower().endswith(".tsv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty")
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: no column {missing[0]!r} in the header ({', '.join(map(repr, header))}); "
                "see --text-columns and --label-column"
            )
        lines, start = [], reader.line_num + 1
        for row in reader:
            if row:
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{start}: {len(row)} fields, the header has {len(header)} "
                        f"({', '.join(header)})"
                    )
                lines.append(start)
            start = reader.line_num + 1
    if not lines:
        raise DataError(f"{path}: the file has a header but no rows")
    return lines


def _load(path: str, fmt: str):
    """One file through `datasets`' local loader, every cell as written (no NA guessing)."""
    import datasets

    kwargs: Dict = {}
    if fmt == "csv":
        kwargs = {"keep_default_na": False, "na_filter": False, "encoding": "utf-8-sig"}
        if path.lower().endswith(".tsv"):
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="sft-data-") as cache:
        try:
            ds = datasets.load_dataset(
                fmt, data_files=path, split="train", cache_dir=cache, keep_in_memory=True, **kwargs
            )
        except Exception as exc:  # the loaders raise many types; the cause is in the message
            cause = exc.__cause__ or exc
            raise DataError(f"{path}: could not be read as {fmt} ({type(cause).__name__}: {cause})") from None
    return ds


def _label_order(value) -> Tuple[int, object]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _is_regression(problem: str, labels: List) -> bool:
    if problem not in PROBLEMS:
        raise ValueError(f"--problem must be one of {', '.join(PROBLEMS)}, got {problem!r}")
    if problem == "auto":
        return all(isinstance(v, float) for v in labels)
    return problem == "regression"


def _examples(rows: List[Tuple[Dict, int]], spec: FileSpec, task: Task, path: str) -> List[Example]:
    out = []
    for row, line in rows:
        raw = row[spec.label_column]
        if task.labels is None:
            try:
                label: object = float(raw)
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}:{line}: column {spec.label_column!r}: {raw!r} is not a number"
                ) from None
        else:
            if str(raw) not in task.labels:
                raise DataError(
                    f"{path}:{line}: column {spec.label_column!r}: label {raw!r} does not occur in the training "
                    f"file (its labels: {', '.join(task.labels)})"
                )
            label = task.labels.index(str(raw))
        out.append(Example(tuple(str(row[c]) for c in spec.text_columns), label))  # type: ignore[arg-type]
    return out


def hold_out(rows: List, share: float, seed: int, path: str) -> Tuple[List, List]:
    """A seeded share of the rows as the dev set, the rest for training (file order kept)."""
    if not 0 < share < 1:
        raise ValueError(f"--dev-share must be between 0 and 1, got {share}")
    n_dev = max(1, round(len(rows) * share))
    if len(rows) - n_dev < 1:
        raise DataError(f"{path}: {len(rows)} rows are too few to hold out a dev share; pass --dev-file")
    dev_idx = set(random.Random(seed).sample(range(len(rows)), n_dev))
    return [r for i, r in enumerate(rows) if i not in dev_idx], [
        r for i, r in enumerate(rows) if i in dev_idx
    ]
