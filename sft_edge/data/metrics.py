"""GLUE metrics (accuracy, F1, Matthews correlation, Pearson and Spearman correlation), and the
macro-F1 and MSE that a task from the device's own file adds.

The standard implementations (scikit-learn, scipy), as Hugging Face `evaluate`'s GLUE metric
uses them; a thin layer maps the task's metric names to them and logits to predictions.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy.stats import pearsonr
from scipy.stats import spearmanr as scipy_spearmanr
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    mean_squared_error,
    precision_recall_fscore_support,
)


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(accuracy_score(gold, pred))


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    return float(f1_score(gold, pred, pos_label=1, zero_division=0))


def matthews_correlation(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA); 0 when undefined (a constant prediction)."""
    return float(matthews_corrcoef(gold, pred))


def _defined(value: float) -> float:
    """Correlation with a constant series is undefined (scipy: nan); report 0, as for MCC."""
    return float(value) if np.isfinite(value) else 0.0


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    return _defined(pearsonr(pred, gold)[0])


def spearmanr(pred: np.ndarray, gold: np.ndarray) -> float:
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    return _defined(scipy_spearmanr(pred, gold)[0])


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The unweighted mean of every class's F1 (classes of either array)."""
    return float(f1_score(gold, pred, average="macro", zero_division=0))


def mse(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(mean_squared_error(gold, pred))


def per_class(logits: np.ndarray, gold: np.ndarray, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Precision, recall and support of each class, by label name."""
    ids = list(range(len(names)))
    p, r, _, n = precision_recall_fscore_support(gold, logits.argmax(axis=1), labels=ids, zero_division=0)
    return {
        name: {"precision": float(p[i]), "recall": float(r[i]), "support": int(n[i])}
        for i, name in enumerate(names)
    }


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
    "macro_f1": macro_f1,
    "mse": mse,
}


def compute(names: Sequence[str], logits: np.ndarray, gold: np.ndarray) -> Dict[str, float]:
    """Task metrics from logits (n, num_labels); regression uses the single output as the score."""
    pred = logits[:, 0] if logits.shape[1] == 1 else logits.argmax(axis=1)
    return {name: METRICS[name](pred, gold) for name in names}
