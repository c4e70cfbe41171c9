"""GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold != 1)).sum())
    fn = float(((pred != 1) & (gold == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_correlation(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary Matthews correlation coefficient (CoLA); 0 when undefined."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    p, g = pred - pred.mean(), gold - gold.mean()
    denom = np.sqrt((p * p).sum() * (g * g).sum())
    return 0.0 if denom == 0 else float((p * g).sum() / denom)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def spearmanr(pred: np.ndarray, gold: np.ndarray) -> float:
    return pearson(_rank(pred), _rank(gold))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def compute(names: Sequence[str], logits: np.ndarray, gold: np.ndarray) -> Dict[str, float]:
    """Task metrics from logits (n, num_labels); regression uses the single output as the score."""
    pred = logits[:, 0] if logits.shape[1] == 1 else logits.argmax(axis=1)
    return {name: METRICS[name](pred, gold) for name in names}
