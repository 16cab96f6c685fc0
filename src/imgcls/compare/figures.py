"""The comparison's figures: the confusion difference heatmap and the changed-image galleries."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GALLERY_CAP = 32  # tiles per gallery; the counts always cover every changed image
ANNOTATE_UP_TO = 15  # classes up to which the difference heatmap prints its cells


def agg_pyplot() -> Any:
    """matplotlib.pyplot on Agg (imported lazily: `imgcls --help` stays fast)."""
    from imgcls.evaluation.figures import pyplot

    return pyplot()


def plot_confusion_difference(diff: np.ndarray, classes: list[str], title: str) -> Any:
    """B − A as a heatmap readable from 2 to 50+ classes.

    Diverging colours centred on 0 (red: more images in that cell with B, blue: fewer); on the
    diagonal red is better, off it worse. Cells are printed up to ANNOTATE_UP_TO classes (zeros
    left blank); beyond that only colours, and tick labels are thinned so they never overlap.
    """
    from imgcls.evaluation.figures import short

    plt = agg_pyplot()
    k = len(classes)
    side = min(max(5.0, 0.3 * k + 3.2), 18.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=100)
    top = max(1, int(np.abs(diff).max()) if diff.size else 1)
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="B − A (images)")
    cell_pt = 72 * (side - 3.2) / max(k, 1)
    fontsize = max(6.0, min(10.0, cell_pt / 2.2))
    step = max(1, math.ceil(fontsize * 1.3 / max(cell_pt, 1e-6)))  # one label per ~1.3 lines
    ticks = list(range(0, k, step))
    names = [short(classes[i]) for i in ticks]
    ax.set_xticks(ticks, names, fontsize=fontsize, rotation=45 if k <= 12 else 90)
    if k <= 12:
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= ANNOTATE_UP_TO:
        for i, j in zip(*np.nonzero(diff), strict=True):
            strong = abs(diff[i, j]) > top / 2
            ax.text(j, i, f"{diff[i, j]:+d}", ha="center", va="center", fontsize=fontsize,
                    color="white" if strong else "black")  # fmt: skip
    shown = "" if step == 1 else f"; every {step}th class labelled"
    ax.set_title(f"{title}\nred: more with B, blue: fewer (diagonal: correct){shown}", fontsize=10)
    fig.tight_layout()
    return fig


def _thumbnail(path: Path) -> np.ndarray | None:
    """The image at `path` as an RGB array, or None when it cannot be read here."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError):
        return None


def plot_changed(rows: pd.DataFrame, root: Path, title: str, cap: int = GALLERY_CAP) -> Any:
    """A gallery of up to `cap` changed images, each titled true / A's / B's prediction."""
    from imgcls.evaluation.figures import short

    plt = agg_pyplot()
    shown = rows.head(cap)
    n = len(shown)
    ncols = min(max(n, 1), 8)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.9 * ncols + 0.2, 2.7 * nrows + 0.5), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown.itertuples(index=False), strict=False):
        img = _thumbnail(root / row.path)
        if img is None:
            ax.text(0.5, 0.5, "image not\nfound here", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(
            f"true: {short(row.label, 16)}\nA: {short(row.predicted_a, 16)}\n"
            f"B: {short(row.predicted_b, 16)} ({row.confidence_b:.2f})",
            fontsize=8,
            loc="left",
        )
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    more = f", showing {n}" if len(rows) > n else ""
    fig.suptitle(f"{title} ({len(rows)}{more})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return fig
