"""Fashion-MNIST with the real train stage: test accuracy on the official 10k set, and wall time.

Setup (not timed): the Debian package's IDX files (`apt-get install dataset-fashion-mnist`) are
written out as 70,000 PNGs with a splits.csv (official 60k train -> 55k train + 5k stratified
val; the official 10k test set as test) in a throwaway project folder. Timed: the train stage
itself, `python pipeline/train.py` (decode into the uint8 cache, training, validation,
checkpoints, model file; MLflow off). Then the saved model file is scored on the test split.

    .venv/bin/python bench/bench_train_fashion.py                    # the custom-CNN recipe
    .venv/bin/python bench/bench_train_fashion.py --recipe timm      # a small timm model
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip

# Each recipe is the `model`, `augment` and `train` sections of a params.yaml.
RECIPES: dict[str, dict] = {
    "cnn": {
        # One conv at 28x28 (where convs cost most), two at 14x14 and 7x7: ~22M MACs / image.
        "model": {
            "name": "simple_cnn",
            "kwargs": {"widths": [32, 64, 128], "convs_per_stage": [1, 2, 2], "dropout": 0.2},
        },
        "augment": [
            {"name": "HorizontalFlip", "p": 0.5},
            {"name": "PadIfNeeded", "min_height": 32, "min_width": 32, "border_mode": 0},
            {"name": "RandomCrop", "height": 28, "width": 28},
        ],
        "train": {
            "epochs": 13,  # 93.0 % test in 353 s on a quiet 2-core box (bench/RESULTS.md)
            "batch_size": 128,
            "optimizer": "adamw",
            "lr": 0.004,
            "weight_decay": 0.05,
            "scheduler": "onecycle",
            "label_smoothing": 0.1,
            "precision": "bf16",  # AMX / AVX-512-BF16 autocast with channels-last
            "cpu_threads": 2,  # on a quiet box; use --threads 1 when other jobs share the CPU
            "monitor": "val_accuracy",
        },
    },
    "timm": {
        "model": {"name": "resnet18", "kwargs": {}},
        "augment": [{"name": "HorizontalFlip", "p": 0.5}],
        "train": {
            "epochs": 3,
            "batch_size": 128,
            "optimizer": "adamw",
            "lr": 0.003,
            "weight_decay": 0.05,
            "scheduler": "onecycle",
            "label_smoothing": 0.1,
            "precision": "bf16",
            "cpu_threads": 1,
            "monitor": "val_accuracy",
        },
    },
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write(args: tuple[str, str, np.ndarray, np.ndarray, int]) -> list[dict]:
    """Worker: write one chunk of images as PNGs; return their rows."""
    root, part, images, labels, start = args
    rows = []
    for j, (img, lab) in enumerate(zip(images, labels, strict=True)):
        rel = f"data/raw/fashion/{part}/{CLASSES[lab]}/{start + j:05d}.png"
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rows.append(
            {
                "path": rel,
                "label": CLASSES[lab],
                "group": rel,
                "source_split": part,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "width": 28,
                "height": 28,
                "mode": "L",
                "format": "PNG",
                "phash": "",
                "error": "",
            }
        )
    return rows


def prepare(root: Path, val_size: int, seed: int) -> Path:
    """Write the PNGs and splits.csv once (reused when they already exist)."""
    splits = root / "data/processed/splits.csv"
    if splits.is_file():
        return splits
    jobs = []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(IDX_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(IDX_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        for s in range(0, len(labels), 5000):
            jobs.append((str(root), part, images[s : s + 5000], labels[s : s + 5000], s))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        df = pd.DataFrame([r for rows in pool.map(_write, jobs) for r in rows])
    df["split"] = df["source_split"]
    rng = np.random.default_rng(seed)
    train_idx = df.index[df["split"] == "train"]
    per_class = val_size // len(CLASSES)
    for label in CLASSES:  # stratified: the same number of val images per class
        idx = train_idx[df.loc[train_idx, "label"] == label]
        df.loc[rng.choice(idx, per_class, replace=False), "split"] = "val"
    splits.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(splits, index=False)
    return splits


def test_accuracy(root: Path, splits: Path) -> float:
    """Accuracy of models/model.pt on the official test set (images from the stage's cache)."""
    sys.path.insert(0, str(REPO / "src"))
    from imgcls.models.bundle import load_bundle
    from imgcls.training.run import load_split_data

    clf, meta = load_bundle(root / "models/model.pt")
    data = load_split_data(
        splits,
        root,
        meta["image_size"],
        meta["channels"],
        root / "data/cache",
        classes=meta["classes"],
        progress=False,
    )
    x, y = data.part("test")
    preds = []
    with torch.no_grad():
        for i in range(0, len(y), 1000):
            preds.append(clf(torch.from_numpy(np.asarray(x[i : i + 1000]))).argmax(1).numpy())
    return float((np.concatenate(preds) == y).mean())


def main() -> None:
    """Prepare, run the train stage under a stopwatch, score the test set, print a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="cnn")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgcls-fashion"))
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--threads", type=int, default=None, help="train.cpu_threads")
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    root = args.workdir
    t0 = time.perf_counter()
    splits = prepare(root, args.val_size, args.seed)
    print(f"prepared {splits} in {time.perf_counter() - t0:.0f}s", flush=True)
    recipe = RECIPES[args.recipe]
    train = {**recipe["train"], "image_size": 28, "device": "cpu"}
    if args.epochs:
        train["epochs"] = args.epochs
    if args.threads:
        train["cpu_threads"] = args.threads
    params = {
        "base": {"seed": args.seed},
        "model": recipe["model"],
        "augment": {"train": recipe["augment"], "eval": []},
        "train": train,
        "tracking": {"enabled": False},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("models/checkpoints/last.pt", "models/model.pt"):
        (root / stale).unlink(missing_ok=True)  # time a fresh run, not a resume
    for cache in (root / "data/cache").glob("*.npy"):
        cache.unlink()  # the decode into the cache is part of the stage's time

    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline/train.py")],
        cwd=root,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    print(proc.stderr[-3000:], flush=True)
    if proc.returncode:
        sys.exit(proc.returncode)
    metrics = json.loads((root / "metrics/train.json").read_text())
    history = pd.read_csv(root / "plots/train.csv")
    report = {
        "recipe": args.recipe,
        "params": params,
        "train_stage_wall_s": round(wall, 1),
        "epochs": int(history["epoch"].max()),
        "best_epoch": metrics["best_epoch"],
        "val_accuracy": round(metrics["val_accuracy"], 4),
        "test_accuracy": round(test_accuracy(root, splits), 4),
        "train_img_s_median": round(float(history["images_per_s"].median()), 1),
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
