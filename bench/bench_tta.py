"""Official Fashion-MNIST test accuracy of trained model files under each `model.tta` mode.

The same weights answer with `none`, `hflip` and `hflip_shift` (imgcls.models.bundle), on the
10,000 official test images read straight from Debian's `dataset-fashion-mnist` IDX files; so
each mode's gain is measured on the same model, without retraining.

    .venv/bin/python bench/bench_tta.py /tmp/imgcls-fashion/models/model.pt [more.pt ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from imgcls.data.sources.generated import read_idx
from imgcls.data.sources.presets import FASHION_CLASSES as NAMES  # the IDX label order
from imgcls.data.sources.presets import FASHION_LOCAL_DIRS
from imgcls.models.bundle import TTA_MODES, ImageClassifier, load_bundle

DATA = FASHION_LOCAL_DIRS[0]  # Debian's dataset-fashion-mnist


def accuracy(clf: ImageClassifier, classes: list[str], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of `clf` on uint8 (N, 28, 28, 1) images with IDX labels `y`."""
    want = np.array([classes.index(NAMES[t]) for t in y])
    with torch.no_grad():
        probs = [clf(torch.from_numpy(x[i : i + 1000].copy())) for i in range(0, len(x), 1000)]
    return float((torch.cat(probs).argmax(1).numpy() == want).mean())


def main() -> None:
    """Print each model's accuracy per TTA mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    args = ap.parse_args()
    x = read_idx(DATA / "t10k-images-idx3-ubyte.gz")[..., None]  # (N, 28, 28, 1)
    y = read_idx(DATA / "t10k-labels-idx1-ubyte.gz")
    for path in args.models:
        clf, meta = load_bundle(path)
        row = {}
        for mode in TTA_MODES:
            view = ImageClassifier(clf.net, meta["mean"], meta["std"], clf.task, mode).eval()
            row[mode] = accuracy(view, meta["classes"], x, y)
        print(
            path,
            f"(file: {meta.get('tta', 'none')})",
            "  ".join(f"{k} {v:.4f}" for k, v in row.items()),
        )


if __name__ == "__main__":
    main()
