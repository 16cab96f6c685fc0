"""Metrics from predictions (scikit-learn implementations, never hand-rolled).

One function per task (imgcls.task): `classification_metrics` (multiclass, arg-max decisions),
`binary_metrics` (decisions at the tuned threshold) and `multilabel_metrics` (one decision per
label at its own threshold). Each returns flat `{name: number}` keys for metrics/eval.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from imgcls.task import decide, safe_name


def _averages(
    out: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, labels: Any, avgs: Sequence[str]
) -> None:
    """Add `precision_<avg>`, `recall_<avg>`, `f1_<avg>` for each averaging mode to `out`."""
    for avg in avgs:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})


def _per_class(
    out: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, labels: Any, classes: list[str]
) -> None:
    """Add per-class `precision_<c>`, `recall_<c>`, `f1_<c>`, `support_<c>` to `out`."""
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for i, name in enumerate(classes):
        key = safe_name(name)
        out[f"precision_{key}"] = float(p[i])
        out[f"recall_{key}"] = float(r[i])
        out[f"f1_{key}"] = float(f[i])
        out[f"support_{key}"] = int(s[i])


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 3
) -> dict[str, Any]:
    """Accuracy, top-k, macro / weighted P/R/F1 and per-class P/R/F1/support as flat keys."""
    labels = list(range(len(classes)))
    y_pred = probs.argmax(1)
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    k = min(top_k, len(classes) - 1)
    if k >= 2:
        out[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=k, labels=labels))
    ap = per_class_average_precision(y_true, probs)
    if ap:  # one-vs-rest, over the classes that occur in y_true
        out["average_precision_macro"] = float(np.mean(list(ap.values())))
    _averages(out, y_true, y_pred, labels, ("macro", "weighted"))
    _per_class(out, y_true, y_pred, labels, classes)
    return out


def binary_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float
) -> dict[str, Any]:
    """Binary head: metrics of the decisions `p(positive) >= threshold` (classes[1] positive).

    Adds to the multiclass keys (no top-k) the operating point (`threshold`,
    `precision_at_threshold`, `recall_at_threshold`, `f1_at_threshold`, all of the positive
    class) and the threshold-free `average_precision` and `roc_auc` of the positive score;
    those two are left out when the split lacks positives (AP) or either class (ROC AUC).
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = decide("binary", probs, [threshold])
    score = probs[:, 1]
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "threshold": float(threshold),
    }
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=[1], average=None, zero_division=0
    )
    out["precision_at_threshold"] = float(p[0])
    out["recall_at_threshold"] = float(r[0])
    out["f1_at_threshold"] = float(f[0])
    if y_true.any():
        out["average_precision"] = float(average_precision_score(y_true, score))
    if 0 < y_true.sum() < len(y_true):
        out["roc_auc"] = float(roc_auc_score(y_true, score))
    _averages(out, y_true, y_pred, [0, 1], ("macro", "weighted"))
    _per_class(out, y_true, y_pred, [0, 1], classes)
    return out


def multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: Sequence[float] | None
) -> dict[str, Any]:
    """Multi-label head: metrics of the per-label decisions `p_k >= threshold_k`.

    `subset_accuracy` is the exact-match ratio (every label of an image right); there is
    deliberately no `accuracy` key, so it is never compared with a multiclass accuracy.
    Micro / macro / weighted / samples P/R/F1, `hamming_loss`, `average_precision_macro` (over
    labels with positives) and `average_precision_micro`, then per label P/R/F1/support, its
    `threshold_<label>` and `average_precision_<label>`.
    """
    y_true = np.asarray(y_true) > 0.5
    y_pred = decide("multilabel", probs, thresholds)
    out: dict[str, Any] = {
        "n": len(y_true),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
    }
    ap = per_class_average_precision(y_true, probs)
    if ap:
        out["average_precision_macro"] = float(np.mean(list(ap.values())))
        out["average_precision_micro"] = float(
            average_precision_score(y_true, probs, average="micro")
        )
    _averages(out, y_true, y_pred, None, ("micro", "macro", "weighted", "samples"))
    _per_class(out, y_true, y_pred, None, classes)
    used = thresholds if thresholds else [0.5] * len(classes)  # decide()'s default
    for k, name in enumerate(classes):
        out[f"threshold_{safe_name(name)}"] = float(used[k])
        if k in ap:
            out[f"average_precision_{safe_name(name)}"] = ap[k]
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def multilabel_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(K, 2, 2) counts, one `[[TN, FP], [FN, TP]]` per label (sklearn's layout)."""
    return multilabel_confusion_matrix(np.asarray(y_true) > 0.5, np.asarray(y_pred) > 0.5)


def confusion_long(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per sample (`actual`, `predicted`) for `dvc plots` with the confusion template."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})


def confusion_long_multilabel(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """One row per (image, label) pair for `dvc plots`' confusion template.

    Values are the label ("cat") when it is present / predicted and "not cat" when it is not,
    so the plot shows each label's 2×2 confusion as its own block on the diagonal: a "cat" row
    never meets a "dog" column, and the four cells of a block are TP, FN, FP and TN. The columns
    stay `actual, predicted` so that `dvc.yaml`'s plot definition serves every task.
    """
    truth = np.asarray(y_true) > 0.5
    pred = np.asarray(y_pred) > 0.5
    n, k = truth.shape
    yes = np.asarray([str(c) for c in classes], dtype=object)
    no = np.asarray([f"not {c}" for c in classes], dtype=object)
    return pd.DataFrame(
        {
            "actual": np.where(truth, yes, no).reshape(n * k),
            "predicted": np.where(pred, yes, no).reshape(n * k),
        }
    )


def one_vs_rest(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) class indices or (N, K) multi-hot -> (N, K) bool "is class k" targets."""
    y = np.asarray(y_true)
    if y.ndim == 2:
        return y > 0.5
    return y.reshape(-1, 1) == np.arange(n_classes).reshape(1, -1)


def per_class_average_precision(y_true: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    """One-vs-rest average precision per class index, for the classes present in `y_true`.

    `y_true` is (N,) class indices (multiclass, binary) or (N, K) multi-hot (multi-label).
    """
    targets = one_vs_rest(y_true, probs.shape[1])
    return {
        k: float(average_precision_score(targets[:, k], probs[:, k]))
        for k in range(probs.shape[1])
        if targets[:, k].any()
    }
