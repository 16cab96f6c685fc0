"""Report figures: confusion matrix and per-class precision-recall curves (matplotlib, Agg).

Every figure scales with the number of classes so that it stays readable from 2 to 50+ classes:
the canvas grows, tick labels rotate and shrink, and cell numbers are drawn only while they fit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from imgcls.evaluation.metrics import per_class_average_precision


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
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], max_classes: int = 64
) -> Any:
    """One-vs-rest precision-recall curve per class as small multiples, titled with their AP.

    With more than `max_classes` classes only the lowest-AP ones are drawn (the ones to fix).
    """
    plt = pyplot()
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
        precision, recall, _ = precision_recall_curve(y_true == c, probs[:, c])
        ax.plot(recall, precision, drawstyle="steps-post", lw=1.5)
        ax.axhline(float(np.mean(y_true == c)), color="grey", lw=0.8, ls="--")  # chance level
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
    extra = f" ({len(shown)} lowest-AP of {len(order)} classes)" if len(order) > len(shown) else ""
    fig.suptitle(f"Precision-recall, one vs rest{extra}; dashed: chance", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the suptitle
    return fig
