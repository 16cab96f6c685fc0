"""Image grids: the most confident mistakes (evaluate) and augmented training samples (train)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgcls.evaluation.figures import pyplot, short
from imgcls.task import label_sets


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


def row_names(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Each row's class name, or its label set ("a|b", "(none)") for (N, K) multi-hot labels."""
    if np.ndim(labels) == 2:
        return [name or "(none)" for name in label_sets(labels, classes)]
    return [classes[i] for i in labels]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` (a fixed-size bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def augmentation_grid(
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    transform: Any,
    *,
    rows: int = 8,
    augmented: int = 6,
    seed: int = 0,
    tile: int = 96,
) -> Image.Image:
    """Rows of training samples: the original, then `augmented` draws of the train transform.

    Pure Pillow (no matplotlib) because it runs in the train stage, whose wall time tracking
    must barely change.
    """
    rng = np.random.default_rng(seed)
    names = np.asarray(row_names(labels, classes), dtype=object)
    per_class = max(1, rows // max(1, len(np.unique(names))))
    picks: list[int] = []
    for c in np.unique(names):  # spread the rows over the classes (label sets for multi-label)
        members = np.flatnonzero(names == c)
        picks.extend(rng.choice(members, min(per_class, len(members)), replace=False).tolist())
    picks = picks[:rows]
    if transform is not None and len(transform):
        transform.set_random_seed(seed)
    label_w, head_h, pad = 130, 22, 4
    width = label_w + (augmented + 1) * (tile + pad)
    height = head_h + len(picks) * (tile + pad)
    canvas = Image.new("RGB", (width, max(height, head_h + tile)), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    draw.text((label_w, 3), "original", fill="black", font=font)
    for j in range(augmented):
        draw.text(
            (label_w + (j + 1) * (tile + pad), 3), f"augmented {j + 1}", fill="black", font=font
        )
    for r, i in enumerate(picks):
        y = head_h + r * (tile + pad)
        draw.text((4, y + tile // 2 - 8), short(names[i], 16), fill="black", font=font)
        original = np.asarray(images[i])
        for j in range(augmented + 1):
            img = original
            if j and transform is not None and len(transform):
                img = transform(image=original)["image"]
            canvas.paste(_to_tile(img, tile), (label_w + j * (tile + pad), y))
    if not picks:
        draw.text((4, head_h + 4), "no training images", fill="black", font=font)
    return canvas


def _to_tile(img: np.ndarray, tile: int) -> Image.Image:
    """(S, S, C) uint8 -> an RGB tile of `tile` px, upscaled without smoothing."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    pil = Image.fromarray(arr).convert("RGB")
    return pil.resize((tile, tile), Image.Resampling.NEAREST)
