"""Metrics and figures from predictions (scikit-learn implementations, never hand-rolled)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)


def _safe_name(label: str) -> str:
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
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for i, name in enumerate(classes):
        key = _safe_name(name)
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


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, normalize: bool = False):
    """A readable confusion-matrix figure for 2..50+ classes (sizes and labels scale with K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    data = cm.astype(float)
    if normalize:
        data = data / np.maximum(data.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.45 * k + 2.5), 28.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=110)
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, data.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    fontsize = max(5, min(11, int(180 / max(k, 1))))
    ax.set_xticklabels(
        classes,
        rotation=45 if k <= 10 else 90,
        ha="right" if k <= 10 else "center",
        fontsize=fontsize,
    )
    ax.set_yticklabels(classes, fontsize=fontsize)
    if k <= 30:  # beyond that the numbers would overlap; colours carry the information
        threshold = (1 if normalize else data.max()) / 2
        for i in range(k):
            for j in range(k):
                text = f"{data[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=max(5, fontsize - 1),
                    color="white" if data[i, j] > threshold else "black",
                )
    fig.tight_layout()
    return fig
