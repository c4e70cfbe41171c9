"""The training run's progress display: a tqdm bar on stderr, or log lines when it is off."""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("sft_edge")


class Progress:
    """Steps done, the last loss and the bytes sent; messages printed above the bar."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def step(self, loss: float, sent: Optional[int] = None) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{loss:.4f}"}
        if sent is not None:
            postfix["sent"] = human_bytes(sent)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def jump(self, step: int) -> None:
        """The run went back to ``step`` (a rollback to a checkpoint)."""
        if self.bar is not None:
            self.bar.n = step

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GB"
