"""A causal-LM run (``--problem causal-lm``): its task, its rows, and its dev loss and perplexity.

The rows are ``sft_edge.data.lm``'s (JSON Lines: text, prompt/completion or chat); without
``--dev-file`` a seeded ``--dev-share`` of the training file is held out, as for classification.
Evaluation runs the current model over the dev rows and reports the mean next-token loss per
learnt token (the sum of ``lm_loss_sum`` over the batches, divided by their learnt tokens) and
its perplexity. Nothing here knows about the cloud: the model is whatever ``session.predict``
runs (the U's head, the daemon's middle, the LM tail).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from sft_edge.data.files import _hold_out
from sft_edge.data.lm import LMEncoded, LMRow, collate_lm, lm_loss_sum, perplexity, read_lm_rows
from sft_edge.data.tasks import Task

METRICS = ("perplexity", "loss")  # of the dev rows; the first is the headline


def lm_task() -> Task:
    """The task a causal-LM run reports under: no labels, no columns, perplexity and loss."""
    return Task("causal-lm", "", (), "", (), None, METRICS)


def read_lm_task(
    train_file: str, dev_file: Optional[str], dev_share: float, seed: int
) -> Tuple[List[LMRow], List[LMRow]]:
    """The training and dev rows (the dev rows: ``dev_file``'s, or a seeded share of the training
    file's). Both files hold rows of one shape (``lm_data``)."""
    train_rows = read_lm_rows(train_file)
    if dev_file is None:
        return _hold_out(train_rows, dev_share, seed, train_file)
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
    """Dev perplexity and mean loss per learnt token of the current model (nothing changes)."""
    total, count = 0.0, 0
    for k, start in enumerate(range(0, len(data), batch_size)):
        batch = collate_lm(data, range(start, min(start + batch_size, len(data)))).to(device)
        summed, n = lm_loss_sum(session.predict(batch, k), batch.labels)
        total, count = total + float(summed), count + n
        if tick is not None:
            tick()
    loss = total / max(count, 1)
    return {"perplexity": perplexity(loss), "loss": loss}
