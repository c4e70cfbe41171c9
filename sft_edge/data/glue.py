"""Task data on the edge: read GLUE TSVs (or the hub), tokenise, and batch with dynamic padding.

The order of examples is a pure function of (seed, epoch), so the batch of any step can be
rebuilt from the step number alone: that is what makes a resumed run see the same data.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from sft_edge.data.tasks import Task

Label = Union[int, float]


@dataclass
class Example:
    texts: Tuple[str, ...]  # one or two segments
    label: Label


@dataclass
class Batch:
    """One padded batch; ``lengths`` is the attention mask, compactly (right padding)."""

    input_ids: torch.Tensor  # (batch, seq) int64
    token_type_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: torch.Tensor  # (batch, seq) int64, 1 for real tokens
    lengths: List[int]  # real tokens per example
    labels: torch.Tensor  # (batch,) int64 or float32 (regression); causal LM: (batch, seq) int64

    def to(self, device: str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.token_type_ids.to(device),
            self.attention_mask.to(device),
            self.lengths,
            self.labels.to(device),
        )

    def split(self, parts: int) -> List[Batch]:
        """``parts`` micro-batches of consecutive examples (sizes differ by at most one; never
        more parts than examples), each trimmed to its own longest sequence (token labels too)."""
        n = len(self.lengths)
        parts = max(1, min(parts, n))
        if parts == 1:
            return [self]
        out, start = [], 0
        for k in range(parts):
            stop = start + n // parts + (1 if k < n % parts else 0)
            width = max(self.lengths[start:stop])
            labels = self.labels[start:stop]
            out.append(
                Batch(
                    self.input_ids[start:stop, :width],
                    self.token_type_ids[start:stop, :width],
                    self.attention_mask[start:stop, :width],
                    self.lengths[start:stop],
                    labels[:, :width] if labels.dim() == 2 else labels,
                )
            )
            start = stop
        return out


class DataError(ValueError):
    """Data that cannot be read; the message names the file and the problem."""


def load_examples(
    task: Task, split: str, data_dir: Optional[str], limit: Optional[int] = None
) -> List[Example]:
    """The ``train`` or ``dev`` examples of a task, from ``data_dir`` (GLUE TSV) or the hub."""
    if data_dir is not None:
        name = "train.tsv" if split == "train" else task.dev_file
        examples = _read_tsv(task, os.path.join(data_dir, task.folder, name))
    else:
        examples = _read_hub(task, split)
    return examples[:limit] if limit is not None else examples


def _label(task: Task, raw: str, where: str) -> Label:
    raw = raw.strip()
    if task.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number") from None
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one of {task.labels}")
    return task.labels.index(raw)


def _read_tsv(task: Task, path: str) -> List[Example]:
    if not os.path.isfile(path):
        raise DataError(
            f"{path} does not exist: --data-dir must hold the GLUE layout ({task.folder}/train.tsv, ...)"
        )
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: MRPC's header has a BOM
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.has_header:
        header, rows = rows[0], rows[1:]
        try:
            text_idx = [header.index(c) for c in task.tsv_columns]
            label_idx = header.index(task.tsv_label)
        except ValueError:
            raise DataError(
                f"{path}: header {header} lacks the columns {task.tsv_columns + (task.tsv_label,)}"
            ) from None
    else:
        text_idx = [int(c) for c in task.tsv_columns]
        label_idx = int(task.tsv_label)
    need = max(text_idx + [label_idx])
    examples = []
    for n, row in enumerate(rows, start=2 if task.has_header else 1):
        if not row:
            continue
        if len(row) <= need:
            raise DataError(f"{path}:{n}: {len(row)} columns, expected at least {need + 1}")
        examples.append(Example(tuple(row[i] for i in text_idx), _label(task, row[label_idx], f"{path}:{n}")))
    return examples


def _read_hub(task: Task, split: str) -> List[Example]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no --data-dir given and the `datasets` package is not installed (pip install datasets)"
        ) from None
    hub_split = "train" if split == "train" else task.hub_dev_split
    try:
        ds = datasets.load_dataset("glue", task.name, split=hub_split)
    except Exception as exc:
        raise DataError(
            f"could not load glue/{task.name} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "offline, pass --data-dir with the GLUE TSV files"
        ) from None
    return [Example(tuple(row[c] for c in task.hub_columns), row["label"]) for row in ds]


@dataclass
class Encoded:
    """Tokenised examples, unpadded."""

    input_ids: List[List[int]]
    token_type_ids: List[List[int]]
    labels: List[Label]

    def __len__(self) -> int:
        return len(self.labels)


def encode(examples: Sequence[Example], tokenizer, max_seq_len: int) -> Encoded:
    if not examples:
        raise DataError("no examples to train or evaluate on")
    segments = list(zip(*[e.texts for e in examples]))
    out = tokenizer(*segments, truncation=True, max_length=max_seq_len, padding=False)
    types = out.get("token_type_ids") or [[0] * len(ids) for ids in out["input_ids"]]
    return Encoded(out["input_ids"], types, [e.label for e in examples])


def collate(data: Encoded, indices: Sequence[int], pad_id: int = 0) -> Batch:
    """Pad the chosen examples to the longest among them (dynamic padding)."""
    lengths = [len(data.input_ids[i]) for i in indices]
    seq = max(lengths)
    ids = torch.full((len(indices), seq), pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), seq), dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, : lengths[row]] = torch.tensor(data.input_ids[i])
        types[row, : lengths[row]] = torch.tensor(data.token_type_ids[i])
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = [data.labels[i] for i in indices]
    label_t = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return Batch(ids, types, mask, lengths, label_t)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


@functools.lru_cache(maxsize=2)
def epoch_order(num_examples: int, seed: int, epoch: int) -> Tuple[int, ...]:
    """The shuffled order of one epoch: a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=g).tolist())


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> List[int]:
    """The examples of training step ``step`` (0-based, counting across epochs)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(num_examples, seed, epoch)
    return list(order[pos * batch_size : (pos + 1) * batch_size])
