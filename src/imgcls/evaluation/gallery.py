"""Image grids: the most confident mistakes (evaluate) and augmented training samples (train)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgcls.evaluation.figures import pyplot, short
from imgcls.task import row_names


def _mistake_confidence(
    y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) "is a mistake" and (N,) confidence of the decision that was wrong.

    Single-label: the probability of the predicted class. Multi-label: an image is a mistake if
    any label decision is wrong, and its confidence is that of its most confident wrong decision
    (`p` for a label predicted present, `1 - p` for one predicted absent).
    """
    if np.ndim(y_true) == 2:
        wrong = (np.asarray(y_true) > 0.5) != (np.asarray(y_pred) > 0.5)
        sure = np.where(np.asarray(y_pred) > 0.5, probs, 1.0 - probs)
        return wrong.any(1), np.where(wrong, sure, 0.0).max(1, initial=0.0)
    return y_pred != y_true, probs[np.arange(len(y_pred)), y_pred]


def confident_mistakes(
    y_true: np.ndarray, probs: np.ndarray, n: int, y_pred: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the `n` mistakes made with the highest confidence (most confident first).

    `y_pred` defaults to the arg-max (multiclass); pass the thresholded decisions of a binary
    head, or the (N, K) bool decisions of a multi-label head.
    """
    y_pred = probs.argmax(1) if y_pred is None else y_pred
    is_wrong, confidence = _mistake_confidence(y_true, probs, y_pred)
    wrong = np.flatnonzero(is_wrong)
    return wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]


def _names(row: np.ndarray, classes: list[str]) -> str:
    """A multi-hot row as its label set ("a|b"), "(none)" when empty."""
    return row_names(np.asarray(row).reshape(1, -1), classes)[0]


def mistakes_table(
    idx: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    paths: list[str],
    y_pred: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One record per gallery tile (path, true, predicted, confidence) for a JSON report.

    Multi-label records hold label sets ("a|b") and list the `wrong` labels with their
    probabilities.
    """
    y_pred = probs.argmax(1) if y_pred is None else y_pred
    _, confidence = _mistake_confidence(y_true, probs, y_pred)
    if np.ndim(y_true) == 2:
        wrong = (np.asarray(y_true) > 0.5) != (np.asarray(y_pred) > 0.5)
        return [
            {
                "path": paths[i],
                "true": _names(y_true[i], classes),
                "predicted": _names(y_pred[i], classes),
                "confidence": round(float(confidence[i]), 4),
                "wrong": {
                    classes[k]: round(float(probs[i, k]), 4) for k in np.flatnonzero(wrong[i])
                },
            }
            for i in idx
        ]
    return [
        {
            "path": paths[i],
            "true": classes[y_true[i]],
            "predicted": classes[y_pred[i]],
            "confidence": round(float(confidence[i]), 4),
            "p_true": round(float(probs[i, y_true[i]]), 4),
        }
        for i in idx
    ]


def plot_mistakes(
    images: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    idx: np.ndarray,
    title: str = "Most confident mistakes",
    y_pred: np.ndarray | None = None,
) -> Any:
    """A grid of misclassified images, each titled true / predicted / confidence.

    Multi-label tiles show the true and predicted label sets ("a|b", "(none)").
    """
    plt = pyplot()
    n = len(idx)
    ncols = min(max(n, 1), 8)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.9 * ncols + 0.2, 2.3 * nrows + 0.5), dpi=100, squeeze=False
    )
    y_pred = probs.argmax(1) if y_pred is None else y_pred
    _, confidence = _mistake_confidence(y_true, probs, y_pred)
    multi = np.ndim(y_true) == 2
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        img = np.asarray(images[i])  # (S, S, C) uint8
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        true = _names(y_true[i], classes) if multi else classes[y_true[i]]
        pred = _names(y_pred[i], classes) if multi else classes[y_pred[i]]
        ax.set_title(
            f"true: {short(true, 16)}\npred: {short(pred, 16)}\nconf {confidence[i]:.2f}",
            fontsize=8,
            color="firebrick",
            loc="left",
        )
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(f"{title} ({n})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    return fig
