"""Real image datasets written to disk for tests (importable by any test module).

Shared helpers live in `tests/_*.py` modules, never in a test module or conftest.py: a test module
imported by another runs its module-level code twice under two names, and conftest.py is loaded
by pytest itself (see pyproject.toml's `pythonpath`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def manifest_row(root: Path, path: Path, label: str, mode: str = "L", size: int = 16) -> dict:
    """The manifest / splits.csv row of a PNG written under `root` (its own group)."""
    rel_path = path.relative_to(root).as_posix()
    return {
        "path": rel_path,
        "label": label,
        "group": rel_path,
        "source_split": "",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "width": size,
        "height": size,
        "mode": mode,
        "format": "PNG",
        "phash": "",
        "error": "",
    }


def pattern_image(kind: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy stripe pattern oriented by class: 0 horizontal, 1 vertical, 2 diagonal."""
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.integers(0, 4)
    coord = [yy, xx, xx + yy][kind % 3] + phase
    img = np.where((coord // 2) % 2 == 0, 200, 40).astype(np.float64)
    img += rng.normal(0, 25, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def write_pattern_dataset(
    root: Path,
    per_class: int = 30,
    classes: tuple[str, ...] = ("horizontal", "vertical", "diagonal"),
    seed: int = 0,
    rel: str = "data/raw/patterns",
) -> pd.DataFrame:
    """Write real grayscale PNGs under root/rel/<class>/ and return manifest-shaped rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, label in enumerate(classes):
        folder = root / rel / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:04d}.png"
            Image.fromarray(pattern_image(k, rng)).save(path)
            rows.append(manifest_row(root, path, label))
    return pd.DataFrame(rows)


def with_splits(df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Simple per-class 60/20/20 assignment (the real splitter has its own tests)."""
    rng = np.random.default_rng(seed)
    out = df.copy()
    out["split"] = "train"
    for _, idx in out.groupby("label").groups.items():
        idx = rng.permutation(np.asarray(idx))
        n = len(idx)
        out.loc[idx[: n // 5], "split"] = "val"
        out.loc[idx[n // 5 : 2 * n // 5], "split"] = "test"
    return out


def two_feature_image(bright: bool, striped: bool, rng: np.random.Generator) -> np.ndarray:
    """16 px gray image: `bright` sets the background, `striped` adds vertical stripes."""
    img = np.full((16, 16), 170.0 if bright else 60.0)
    if striped:
        img[:, ::4] += 70.0
        img[:, 1::4] += 70.0
    img += rng.normal(0, 12, img.shape)
    return img.clip(0, 255).astype(np.uint8)
