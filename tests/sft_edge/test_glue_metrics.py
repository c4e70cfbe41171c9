"""Our GLUE metrics agree with scipy's and with hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest

from sft_edge.data import metrics


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:20] = np.round(y[:20])  # ties
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearmanr(x, np.round(y)) == pytest.approx(stats.spearmanr(x, np.round(y))[0], abs=1e-12)


def test_classification_metrics_by_hand():
    gold = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    # tp=3 fp=1 fn=1 tn=3
    assert metrics.accuracy(pred, gold) == 0.75
    assert metrics.f1(pred, gold) == pytest.approx(0.75)
    assert metrics.matthews_correlation(pred, gold) == pytest.approx((9 - 1) / 16)
    assert metrics.matthews_correlation(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0


def test_compute_picks_argmax_or_score():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert metrics.compute(["accuracy", "f1"], logits, np.array([1, 0])) == {"accuracy": 1.0, "f1": 1.0}
    scores = np.array([[1.0], [2.0], [3.5]])
    assert metrics.compute(["pearson"], scores, np.array([1.0, 2.0, 3.0]))["pearson"] > 0.9
