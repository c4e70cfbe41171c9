"""The training run's progress display: what phase it is in, and how fast it goes.

On a terminal: a tqdm bar of steps (loss, lr, epoch, bytes sent and received, examples/s), a
bar of its own while evaluating, and a line for each phase change (checkpointing, a rollback).
Elsewhere (a log file, CI): a plain line every ``every`` seconds and at each phase, so a log
does not fill with carriage returns. Evaluation time is not charged to the training rate.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator, Optional

log = logging.getLogger("sft_edge")


class Progress:
    def __init__(self, total: int, enabled: bool, initial: int = 0, per_epoch: int = 1, every: float = 30.0):
        self.total, self.per_epoch, self.every = total, max(1, per_epoch), every
        self.step_no, self.examples, self.started = initial, 0, time.monotonic()
        self.training_s = 0.0  # seconds spent in training steps, not evaluating or checkpointing
        self._mark = time.monotonic()
        self._last_line = 0.0
        self.bar = None
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def step(
        self, loss: float, lr: float, examples: int, sent: Optional[int], received: Optional[int]
    ) -> None:
        """One training step done (``examples`` in it); ``sent``/``received``: the run's bytes so far."""
        now = time.monotonic()
        self.training_s += now - self._mark
        self._mark = now
        self.step_no += 1
        self.examples += examples
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "epoch": f"{self.step_no / self.per_epoch:.2f}"}
        if sent is not None and received is not None:
            fields.update(sent=human_bytes(sent), recv=human_bytes(received))
        fields["ex/s"] = f"{self.examples / max(self.training_s, 1e-9):.1f}"
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif self.enabled and (now - self._last_line >= self.every or self.step_no == self.total):
            self._last_line = now
            log.info(
                "step %d/%d: %s", self.step_no, self.total, ", ".join(f"{k} {v}" for k, v in fields.items())
            )

    @contextlib.contextmanager
    def phase(self, name: str, after: int, batches: int = 0) -> Iterator[Phase]:
        """Evaluating, checkpointing (after ``after`` steps): announced, with a bar of ``batches``
        on a terminal, and kept out of the training rate."""
        self.say(f"{name} after step {after}")
        bar = None
        if self.bar is not None and batches:
            from tqdm import tqdm

            bar = tqdm(
                total=batches, desc=name, unit="batch", leave=False, dynamic_ncols=True, mininterval=0.5
            )
        try:
            yield Phase(bar)
        finally:
            if bar is not None:
                bar.close()
            if self.bar is not None:
                self.bar.unpause()  # the bar's own rate ignores the pause too
            self._mark = time.monotonic()

    def jump(self, step: int) -> None:
        """The run went back to ``step`` (a rollback to a checkpoint)."""
        self.step_no = step
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        self._mark = time.monotonic()

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Phase:
    """Ticks of a phase's own bar (nothing off a terminal)."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GB"
