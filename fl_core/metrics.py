"""Classification metrics: accuracy, balanced accuracy, per-class precision/recall/F1,
macro F1, confusion matrix, and ROC AUC for two classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_core.schemas import ClassMetrics, EvalMetrics


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank statistic (ties count half)."""
    pos, neg = score[y_true == 1], score[y_true == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), dtype=np.float64)
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    scores: np.ndarray | None = None,
) -> EvalMetrics:
    """Metrics of predictions ``y_pred`` against ``y_true``.

    ``scores`` ([N, C] probabilities) enables ROC AUC for two-class tasks.
    """
    yt = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (yt, yp), 1)
    per_class = []
    recalls = []
    for i, name in enumerate(class_names):
        tp = cm[i, i]
        precision = _safe_div(tp, cm[:, i].sum())
        recall = _safe_div(tp, cm[i, :].sum())
        f1 = _safe_div(2 * precision * recall, precision + recall)
        support = int(cm[i, :].sum())
        if support:
            recalls.append(recall)
        per_class.append(
            ClassMetrics(name=name, precision=precision, recall=recall, f1=f1, support=support)
        )
    auc = None
    if k == 2 and scores is not None and len(yt):
        auc = roc_auc(yt, np.asarray(scores)[:, 1])
    return EvalMetrics(
        n=len(yt),
        accuracy=_safe_div(np.trace(cm), cm.sum()),
        balanced_accuracy=float(np.mean(recalls)) if recalls else 0.0,
        macro_f1=float(np.mean([c.f1 for c in per_class])),
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        roc_auc=auc,
    )


__all__ = ["compute_metrics", "roc_auc"]
