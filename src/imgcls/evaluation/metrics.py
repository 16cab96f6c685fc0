"""Metrics from predictions (scikit-learn implementations, never hand-rolled)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def safe_name(label: str) -> str:
    """A class name usable inside a flat metric key."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in str(label))


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
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for i, name in enumerate(classes):
        key = safe_name(name)
        out[f"precision_{key}"] = float(p[i])
        out[f"recall_{key}"] = float(r[i])
        out[f"f1_{key}"] = float(f[i])
        out[f"support_{key}"] = int(s[i])
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def confusion_long(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per sample (`actual`, `predicted`) for `dvc plots` with the confusion template."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})


def per_class_average_precision(y_true: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    """One-vs-rest average precision per class index, for the classes present in `y_true`."""
    return {
        k: float(average_precision_score(y_true == k, probs[:, k]))
        for k in range(probs.shape[1])
        if np.any(y_true == k)
    }
