"""Report figures: confusion matrices and precision-recall curves (matplotlib, Agg).

Multiclass: a K×K confusion matrix and one-vs-rest PR curves. Binary: the same 2×2 matrix (of
the thresholded decisions) and one PR curve of the positive class with the threshold marked.
Multi-label: one 2×2 confusion per label and one PR curve per label, thresholds marked.

Every figure scales with the number of classes so that it stays readable from 2 to 50+ classes:
the canvas grows, tick labels rotate and shrink, and cell numbers are drawn only while they fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from imgcls.evaluation.metrics import one_vs_rest, per_class_average_precision


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(label: str, width: int = 18) -> str:
    """Shorten a long class name in the middle ('class_w…name_14'): ends tell classes apart."""
    label = str(label)
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "…" + label[-(width - 1 - head) :]


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, normalize: bool = False) -> Any:
    """A readable confusion-matrix figure for 2..50+ classes (sizes and labels scale with K)."""
    plt = pyplot()
    k = len(classes)
    data = cm.astype(float)
    if normalize:
        data = data / np.maximum(data.sum(axis=1, keepdims=True), 1)
    cell_in = 0.42 if k <= 20 else 0.32  # inches per cell: room for "0.97" at the font below
    side = min(max(4.5, cell_in * k + 2.8), 30.0)
    fig, ax = plt.subplots(figsize=(side + 0.8, side), dpi=100)
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, data.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cell_pt = 72 * (side - 2.8) / max(k, 1)  # approximate cell width in points
    fontsize = max(5.0, min(11.0, cell_pt / 2.4))
    names = [short(c) for c in classes]
    ax.set_xticks(range(k), names, fontsize=fontsize, rotation=45 if k <= 12 else 90)
    if k <= 12:
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    digits = len(str(int(cm.max()))) if cm.size else 1
    # Fractions as "0.97" where they fit, else as whole percents ("97", at most 3 characters).
    percent = normalize and 0.62 * fontsize * 4 > 0.95 * cell_pt
    chars = (3 if percent else 4) if normalize else digits
    if 0.62 * fontsize * chars <= 0.95 * cell_pt:  # draw numbers only where they fit their cell
        threshold = (1 if normalize else max(1.0, data.max())) / 2
        for i in range(k):
            for j in range(k):
                if k > 10 and (cm[i, j] == 0 or (percent and data[i, j] < 0.005)):
                    continue  # zeros only add clutter in a large matrix
                if not normalize:
                    text = f"{int(cm[i, j])}"
                else:
                    text = f"{100 * data[i, j]:.0f}" if percent else f"{data[i, j]:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize * 0.9,
                    color="white" if data[i, j] > threshold else "black",
                )
    if percent:
        ax.set_title(f"{title} (cells in %)")
    fig.tight_layout()
    return fig


def plot_pr_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    max_classes: int = 64,
    thresholds: Sequence[float] | None = None,
) -> Any:
    """One-vs-rest precision-recall curve per class as small multiples, titled with their AP.

    `y_true` is (N,) class indices or (N, K) multi-hot (then one panel per label). With
    `thresholds` (multi-label) each panel marks its operating point. With more than
    `max_classes` classes only the lowest-AP ones are drawn (the ones to fix).
    """
    plt = pyplot()
    targets = one_vs_rest(y_true, probs.shape[1])
    ap = per_class_average_precision(y_true, probs)
    order = sorted(ap, key=lambda c: ap[c])
    shown = order[:max_classes] if len(order) > max_classes else sorted(order)
    n = max(1, len(shown))
    ncols = min(n, 3 if n <= 6 else math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.6 * ncols, 2.5 * nrows + 0.6), dpi=100, squeeze=False
    )
    for ax, c in zip(axes.flat, shown, strict=False):
        precision, recall, _ = precision_recall_curve(targets[:, c], probs[:, c])
        ax.plot(recall, precision, drawstyle="steps-post", lw=1.5)
        ax.axhline(float(np.mean(targets[:, c])), color="grey", lw=0.8, ls="--")  # chance level
        if thresholds is not None:
            _mark_operating_point(ax, targets[:, c], probs[:, c], thresholds[c], size=5)
        ax.set(xlim=(0, 1.0), ylim=(0, 1.05))
        ax.set_title(f"{short(classes[c], 22)}  AP {ap[c]:.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no classes with samples", ha="center", va="center")
    for i, ax in enumerate(axes.flat[: len(shown)]):
        if i + ncols >= len(shown):  # the lowest drawn panel of its column
            ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    what = "per label" if np.asarray(y_true).ndim == 2 else "one vs rest"
    unit = "labels" if what == "per label" else "classes"
    extra = f" ({len(shown)} lowest-AP of {len(order)} {unit})" if len(order) > len(shown) else ""
    marks = "; dot: threshold" if thresholds is not None and shown else ""
    fig.suptitle(f"Precision-recall, {what}{extra}; dashed: chance{marks}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the suptitle
    return fig


def _mark_operating_point(
    ax: Any, y_true: np.ndarray, score: np.ndarray, threshold: float, size: float = 8
) -> tuple[float, float]:
    """Draw the (recall, precision) of the decisions `score >= threshold`; return it."""
    pred = score >= threshold
    tp = float(np.sum(pred & y_true))
    precision = tp / max(float(pred.sum()), 1.0)
    recall = tp / max(float(y_true.sum()), 1.0)
    ax.plot([recall], [precision], "o", color="firebrick", ms=size, zorder=3)
    return recall, precision


def plot_binary_pr_curve(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float
) -> Any:
    """Precision-recall curve of the positive class (classes[1]), the threshold marked on it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    positive = np.asarray(y_true) == 1
    if positive.any():
        precision, recall, _ = precision_recall_curve(positive, probs[:, 1])
        ap = float(average_precision_score(positive, probs[:, 1]))
        ax.plot(recall, precision, drawstyle="steps-post", lw=1.8, label=f"AP {ap:.3f}")
        ax.axhline(float(positive.mean()), color="grey", lw=0.8, ls="--", label="chance")
        r, p = _mark_operating_point(ax, positive, probs[:, 1], threshold)
        ax.annotate(
            f"threshold {threshold:.3f}\nP {p:.3f}  R {r:.3f}",
            (r, p),
            xytext=(-12, -14),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=9,
            color="firebrick",
        )
        ax.legend(loc="lower left", fontsize=9)
    else:
        ax.text(0.5, 0.5, f"no {short(classes[1])} images in this split", ha="center")
    ax.set(xlim=(0, 1.0), ylim=(0, 1.05), xlabel="recall", ylabel="precision")
    ax.set_title(f"Precision-recall of {short(classes[1], 28)} (positive class)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_multilabel_confusion(
    cms: np.ndarray, classes: list[str], title: str, normalize: bool = False
) -> Any:
    """Small multiples of each label's 2×2 confusion (rows: true no / yes), for 2..50+ labels.

    Panels keep a fixed size and wrap into a near-square grid, so 30 labels stay as readable as
    3; `normalize` divides each row by its total (true-negative rate and recall on the diagonal).
    """
    plt = pyplot()
    k = max(1, len(classes))
    ncols = min(k, 4 if k <= 8 else math.ceil(math.sqrt(k)))
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(2.1 * ncols + 0.6, 2.2 * nrows + 0.9),
        dpi=100,
        squeeze=False,
        layout="constrained",  # tight_layout misplaces fixed-aspect panels and clips labels
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, name) in enumerate(zip(axes.flat, classes, strict=False)):
        cm = np.asarray(cms[i], dtype=float)
        data = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
        top = 1.0 if normalize else max(1.0, data.max())
        ax.axis("on")
        ax.imshow(data, cmap="Blues", vmin=0, vmax=top)
        for r in range(2):
            for c in range(2):
                text = f"{data[r, c]:.2f}" if normalize else f"{int(cm[r, c])}"
                color = "white" if data[r, c] > top / 2 else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=9, color=color)
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_title(short(name, 20), fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("true", fontsize=8)
        if i + ncols >= len(classes):  # the lowest panel of its column
            ax.set_xlabel("predicted", fontsize=8)
    if not len(classes):
        axes.flat[0].text(0.5, 0.5, "no labels", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    return fig
