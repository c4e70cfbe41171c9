"""Our GLUE metrics against values worked out by hand and against the metrics' definitions,
written out here in plain Python (no scipy, no scikit-learn: those are what the module calls)."""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import pytest

from sft_edge.data import metrics
from sft_edge.data.tasks import CLASSIFICATION_METRICS, REGRESSION_METRICS, TASKS, custom_task

# -- the definitions, from the textbook -------------------------------------------------------


def _counts(pred: Sequence[int], gold: Sequence[int], positive: int = 1):
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    tn = len(gold) - tp - fp - fn
    return tp, fp, fn, tn


def _f1(pred, gold, positive: int = 1) -> float:
    tp, fp, fn, _ = _counts(pred, gold, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _mcc(pred, gold) -> float:
    tp, fp, fn, tn = _counts(pred, gold)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def _ranks(x: Sequence[float]) -> List[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(x, y) -> float:
    return _pearson(_ranks(x), _ranks(y))


# -- small arrays, worked out by hand ---------------------------------------------------------

GOLD = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
PRED = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0])  # tp=2 (0, 1), fn=2 (2, 3), fp=1 (4), tn=5


def test_accuracy_by_hand():
    assert metrics.accuracy(PRED, GOLD) == 0.7  # (tp + tn) / n = (2 + 5) / 10
    assert metrics.accuracy(GOLD, GOLD) == 1.0 and metrics.accuracy(1 - GOLD, GOLD) == 0.0


def test_f1_by_hand():
    # precision 2/3, recall 2/4: F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7 = 2tp / (2tp + fp + fn)
    assert metrics.f1(PRED, GOLD) == pytest.approx(4 / 7, abs=1e-12)
    # F1 is of class 1, not symmetric: swapping the classes gives tp=5 fp=2 fn=1, 10 / 13
    assert metrics.f1(1 - PRED, 1 - GOLD) == pytest.approx(10 / 13, abs=1e-12)
    # no positive predicted and none gold: 0/0, reported as 0
    assert metrics.f1(np.zeros(4, dtype=int), np.zeros(4, dtype=int)) == 0.0


def test_matthews_correlation_by_hand():
    # (tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn)) = (10 - 2) / sqrt(3 * 4 * 6 * 7)
    assert metrics.matthews_correlation(PRED, GOLD) == pytest.approx(8 / math.sqrt(504), abs=1e-12)
    assert 8 / math.sqrt(504) == pytest.approx(0.356348, abs=1e-6)
    # tp=3 fp=1 fn=1 tn=3: (9 - 1) / sqrt(4 * 4 * 4 * 4) = 0.5
    gold, pred = np.array([1, 1, 1, 0, 0, 0, 1, 0]), np.array([1, 1, 0, 0, 0, 1, 1, 0])
    assert metrics.matthews_correlation(pred, gold) == pytest.approx(0.5, abs=1e-12)
    assert metrics.matthews_correlation(1 - gold, gold) == pytest.approx(-1.0, abs=1e-12)
    # a constant prediction: the denominator is 0, reported as 0
    assert metrics.matthews_correlation(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0


def test_pearson_by_hand():
    # x - 2.5 = (-1.5, -.5, .5, 1.5), y - 5 = (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    assert metrics.pearson(x, y) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    assert metrics.pearson(x, -2 * x + 1) == pytest.approx(-1.0, abs=1e-12)
    assert metrics.pearson(x, np.full(4, 3.0)) == 0.0  # a constant series: undefined, reported as 0


def test_spearman_by_hand_with_ties():
    # y's ranks: 5 -> 1, 6 -> 2, the two 7s share (3 + 4) / 2 = 3.5, 8 -> 5.
    # Pearson of the ranks: dx = (-2, -1, 0, 1, 2), dy = (-2, -1, .5, 2, .5): 8 / sqrt(10 * 9.5)
    x, y = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([5.0, 6.0, 7.0, 8.0, 7.0])
    assert metrics.spearmanr(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    # monotone but not linear: ranks agree exactly, Pearson does not
    assert metrics.spearmanr(x, x**3) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pearson(x, x**3) < 0.99
    assert metrics.spearmanr(np.full(5, 2.0), y) == 0.0


def test_macro_f1_and_mse_by_hand():
    gold, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp=1 fp=1 fn=1 -> 2/4; class 1: tp=2 fp=1 fn=0 -> 4/5; class 2: tp=1 fp=0 fn=1 -> 2/3
    assert metrics.macro_f1(pred, gold) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3, abs=1e-12)
    # a class only predicted (3) counts with F1 0: (1 + 1 + 0) / 3 over classes 0, 1, 3
    assert metrics.macro_f1(np.array([0, 1, 3]), np.array([0, 1, 1])) == pytest.approx(
        (1 + 2 * 1 / (2 * 1 + 0 + 1) + 0) / 3, abs=1e-12
    )
    # ((1 - 1.5)^2 + 0 + (3 - 1)^2) / 3 = 4.25 / 3
    assert metrics.mse(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 1.0])) == pytest.approx(4.25 / 3)


def test_per_class_by_hand():
    gold = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 2, 0]]  # argmax: the predictions above
    out = metrics.per_class(logits, gold, ["a", "b", "c"])
    assert out == {
        "a": {"precision": pytest.approx(1 / 2), "recall": pytest.approx(1 / 2), "support": 2},
        "b": {"precision": pytest.approx(2 / 3), "recall": 1.0, "support": 2},
        "c": {"precision": 1.0, "recall": pytest.approx(1 / 2), "support": 2},
    }


# -- the definitions on larger random arrays (ties included) ----------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_against_the_definitions(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, size=200)
    pred = np.where(rng.random(200) < 0.7, gold, 1 - gold)  # 70% agreement, so MCC is far from 0
    assert metrics.accuracy(pred, gold) == pytest.approx(float(np.mean(pred == gold)), abs=1e-12)
    assert metrics.f1(pred, gold) == pytest.approx(_f1(pred, gold), abs=1e-12)
    assert metrics.matthews_correlation(pred, gold) == pytest.approx(_mcc(pred, gold), abs=1e-12)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:40] = np.round(y[:40])  # ties
    assert metrics.pearson(x, y) == pytest.approx(_pearson(list(x), list(y)), abs=1e-12)
    rounded = list(np.round(y))  # many ties
    assert metrics.spearmanr(x, np.round(y)) == pytest.approx(_spearman(list(x), rounded), abs=1e-12)


def test_the_reference_ranks_average_ties():
    """The test's own ranking, checked by hand: it is what the Spearman expectations rest on."""
    assert _ranks([10, 30, 20, 30, 30]) == [1.0, 4.0, 2.0, 4.0, 4.0]  # 30s span ranks 3..5


# -- which metrics each task reports ----------------------------------------------------------


def test_metric_names_per_task():
    """GLUE's metrics (the GLUE paper, table 1; Hugging Face evaluate's glue), headline first."""
    assert {name: task.metrics for name, task in TASKS.items()} == {
        "sst2": ("accuracy",),
        "mrpc": ("f1", "accuracy"),
        "rte": ("accuracy",),
        "cola": ("matthews_correlation",),
        "stsb": ("pearson", "spearmanr"),
        "qnli": ("accuracy",),
        "qqp": ("f1", "accuracy"),
        "mnli": ("accuracy",),
        "wnli": ("accuracy",),
    }
    assert custom_task(("text",), "label", ("a", "b", "c")).metrics == ("accuracy", "macro_f1")
    assert custom_task(("text",), "score", None).metrics == ("pearson", "spearmanr", "mse")
    named = {m for task in TASKS.values() for m in task.metrics}
    assert named | set(CLASSIFICATION_METRICS) | set(REGRESSION_METRICS) == set(metrics.METRICS)


def test_compute_picks_argmax_or_score():
    # argmax of each row: 1, 0, 1, 1 against gold 1, 0, 0, 1: accuracy 3/4, tp=2 fp=1 fn=0 -> F1 4/5
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [-3.0, 0.0], [0.4, 0.6]])
    gold = np.array([1, 0, 0, 1])
    assert metrics.compute(TASKS["mrpc"].metrics, logits, gold) == {
        "f1": pytest.approx(4 / 5),
        "accuracy": 0.75,
    }
    # regression: the single output is the score. (1, 2, 3.5) vs (1, 2, 3): dx = (-7/6, -1/6, 4/3),
    # dy = (-1, 0, 1): Pearson (7/6 + 4/3) / sqrt((49 + 1 + 64)/36 * 2) = 2.5 / sqrt(114 / 18)
    scores = np.array([[1.0], [2.0], [3.5]])
    out = metrics.compute(TASKS["stsb"].metrics, scores, np.array([1.0, 2.0, 3.0]))
    assert out == {"pearson": pytest.approx(2.5 / math.sqrt(114 / 18)), "spearmanr": pytest.approx(1.0)}
