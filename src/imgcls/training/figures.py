"""The train stage's own figure: training samples next to draws of the train augmentation.

Pure Pillow (no matplotlib): it is drawn in the train stage, whose wall time tracking must
barely change. (It lived in imgcls.evaluation.gallery, which still re-exports it; training must
not import evaluation.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgcls.task import row_names


def short(label: str, width: int = 18) -> str:
    """Shorten a long class name in the middle ('class_w…name_14'): ends tell classes apart."""
    label = str(label)
    if len(label) <= width:
        return label
    head = (width - 1) // 2
    return label[:head] + "…" + label[-(width - 1 - head) :]


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
    """Rows of training samples: the original, then `augmented` draws of the train transform."""
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
