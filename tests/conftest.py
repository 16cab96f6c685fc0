"""Shared fixtures: tiny but real image datasets written to tmp_path."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Undo `mlflow.set_tracking_uri` after each test: it also exports MLFLOW_TRACKING_URI."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # resets the global and unsets the env var
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one torch thread, above all on a shared, loaded 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture
def pattern_splits(tmp_path: Path) -> tuple[Path, Path]:
    """(root, splits.csv) of a 3-class, 90-image real PNG dataset."""
    df = with_splits(write_pattern_dataset(tmp_path))
    splits = tmp_path / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    df.to_csv(splits, index=False)
    return tmp_path, splits
