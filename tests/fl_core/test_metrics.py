"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fl_core.metrics import compute_metrics, roc_auc


def test_binary_metrics_by_hand() -> None:
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 0]
    m = compute_metrics(y_true, y_pred, ["ok", "bad"])
    assert m.n == 6
    assert m.confusion_matrix == [[3, 1], [1, 1]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.balanced_accuracy == pytest.approx((3 / 4 + 1 / 2) / 2)
    ok, bad = m.per_class
    assert (ok.precision, ok.recall, ok.support) == (pytest.approx(3 / 4), pytest.approx(3 / 4), 4)
    assert bad.f1 == pytest.approx(0.5)
    assert m.macro_f1 == pytest.approx((0.75 + 0.5) / 2)
    assert m.roc_auc is None


def test_multiclass_confusion_and_missing_class() -> None:
    m = compute_metrics([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c"])
    assert m.confusion_matrix == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
    assert m.per_class[1].recall == 0.0
    assert m.per_class[1].precision == 0.0


def test_roc_auc_rank_statistic() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_auc_from_scores_in_compute_metrics() -> None:
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    m = compute_metrics([0, 0, 1, 1], scores.argmax(1), ["a", "b"], scores)
    assert m.roc_auc == pytest.approx(0.75)
