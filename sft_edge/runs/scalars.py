"""Scalars of a training run, one CSV row per value, written beside the progress bar.

Long format (``wall_time,step,tag,value``), as TensorBoard's scalar export: a task's metrics
and a resumed run's rows need no schema change. Tags: ``train/loss``, ``train/lr``,
``traffic/bytes_sent``, ``traffic/bytes_received`` (cumulative serialized message bytes of the
session, as in the report) after every step, and ``eval/<metric>`` after each evaluation. A
resumed or rolled-back run appends; readers keep the last row of each (step, tag).
``sft-edge plot`` (``sft_edge/runs/plot.py``) draws the curves.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Dict, List, Optional, Tuple

HEADER = ["wall_time", "step", "tag", "value"]
FILENAME = "scalars.csv"


def scalars_path(output_dir: Optional[str], report: Optional[str]) -> Optional[str]:
    """``<output-dir>/scalars.csv``; else ``<report>.scalars.csv`` beside the report; else none."""
    if output_dir:
        return os.path.join(output_dir, FILENAME)
    if report:
        stem = report[: -len(".json")] if report.endswith(".json") else report
        return stem + ".scalars.csv"
    return None


def open_for_run(output_dir: Optional[str], report: Optional[str]) -> Optional[ScalarLog]:
    """The run's scalar log, or None when the run writes no files (no --output-dir, no --report)."""
    path = scalars_path(output_dir, report)
    return ScalarLog(path) if path else None


class ScalarLog:
    """Appends rows and flushes each step, so a crashed run keeps its curve up to the crash."""

    def __init__(self, path: str):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(HEADER)

    def write(self, step: int, values: Dict[str, float]) -> None:
        now = round(time.time(), 3)
        for tag, value in values.items():
            self._writer.writerow([now, step, tag, repr(float(value))])
        self._file.flush()

    def train(self, step: int, loss: float, lr: float, bytes_sent: int, bytes_received: int) -> None:
        self.write(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "traffic/bytes_sent": bytes_sent,
                "traffic/bytes_received": bytes_received,
            },
        )

    def eval(self, step: int, metrics: Dict[str, float]) -> None:
        self.write(step, {f"eval/{k}": v for k, v in metrics.items() if k not in ("step", "epoch")})

    def close(self) -> None:
        self._file.close()


def read(path: str) -> Dict[str, List[Tuple[int, float]]]:
    """{tag: [(step, value), ...]} sorted by step, keeping the last row written for each (step, tag)."""
    latest: Dict[Tuple[str, int], float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            latest[(row["tag"], int(row["step"]))] = float(row["value"])
    out: Dict[str, List[Tuple[int, float]]] = {}
    for (tag, step), value in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(tag, []).append((step, value))
    return out
