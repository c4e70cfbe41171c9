"""Curves of a run to PNG (`sft-edge plot`): loss and LR, eval metrics, traffic, from scalars.csv."""

from __future__ import annotations

import os
from typing import List, Optional

from sft_edge.runs.scalars import FILENAME, read


def _smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average, so a noisy per-step loss shows its trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(source: str, out: Optional[str] = None, title: Optional[str] = None) -> str:
    """Draw the run whose scalars are ``source`` (a CSV, or a folder holding scalars.csv); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a Jetson or in CI
    import matplotlib.pyplot as plt

    path = os.path.join(source, FILENAME) if os.path.isdir(source) else source
    series = read(path)
    if "train/loss" not in series:
        raise ValueError(f"{path} has no train/loss rows: is it an sft-edge scalars file?")
    out = out or os.path.splitext(path)[0] + ".png"

    fig, (ax_loss, ax_eval, ax_bytes) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps, loss = zip(*series["train/loss"])
    ax_loss.plot(steps, loss, alpha=0.3, color="C0", label="loss")
    ax_loss.plot(steps, _smooth(list(loss), max(1, len(loss) // 50)), color="C0", label="loss (smoothed)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    if "train/lr" in series:
        ax_lr = ax_loss.twinx()
        lr_steps, lr = zip(*series["train/lr"])
        ax_lr.plot(lr_steps, lr, color="C3", linestyle="--", label="lr")
        ax_lr.set_ylabel("learning rate", color="C3")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title("loss")

    evals = sorted(tag for tag in series if tag.startswith("eval/"))
    for i, tag in enumerate(evals):
        s, v = zip(*series[tag])
        ax_eval.plot(s, v, marker="o", color=f"C{i}", label=tag[len("eval/") :])
    ax_eval.set_xlabel("step")
    ax_eval.set_title("dev metrics" if evals else "dev metrics (none yet)")
    if evals:
        ax_eval.legend()

    for i, tag in enumerate(("traffic/bytes_sent", "traffic/bytes_received")):
        if tag in series:
            s, v = zip(*series[tag])
            ax_bytes.plot(s, [x / 1e6 for x in v], color=f"C{i}", label=tag.split("_", 1)[1])
    ax_bytes.set_xlabel("step")
    ax_bytes.set_ylabel("MB (cumulative, serialized messages)")
    ax_bytes.set_title("traffic")
    ax_bytes.legend()

    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(path))))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
