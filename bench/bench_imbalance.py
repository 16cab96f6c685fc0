"""Imbalanced digits (20:1) and the LR finder: what the corrections buy, and what they cost.

1. scikit-learn's digits as real PNGs, digit 8 thinned to 1/20 of the other digits' count in
   the train split (the val split keeps its eights), trained with `class_weights: none`,
   `balanced` and `sampler: balanced` on the same seeds: rare-class recall, balanced accuracy
   (= macro recall) and accuracy on val at the best epoch, and wall time per run.
2. Cost of the balanced draw vs the plain shuffle for one epoch order (N = 1e6).
3. `find_lr` on the full digits with the default model (wall time, steps, suggestion).

    .venv/bin/python bench/bench_imbalance.py            # ~1-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from imgcls.config import parse_params
from imgcls.data.dataset import load_split_data
from imgcls.data.sources import digits_images
from imgcls.training.batches import epoch_permutation
from imgcls.training.imbalance import sample_weights
from imgcls.training.lr_finder import find_lr, format_lr
from imgcls.training.train import train_model

RARE = "8"
SETTINGS = {
    "none": {},
    "class_weights: balanced": {"class_weights": "balanced"},
    "sampler: balanced": {"sampler": "balanced"},
}


def write_digits(root: Path, rare_ratio: int | None) -> Path:
    """Digits PNGs + a 60/20/20 splits.csv; with `rare_ratio`, digit 8 is thinned in train."""
    images, labels = digits_images()
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        path = root / "data/raw/digits" / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rel = path.relative_to(root).as_posix()
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append({"path": rel, "label": label, "group": rel, "mode": "L", "sha256": sha})
    df = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    df["split"] = "train"
    for _, idx in df.groupby("label").groups.items():
        idx = rng.permutation(np.asarray(idx))
        df.loc[idx[: len(idx) // 5], "split"] = "val"
        df.loc[idx[len(idx) // 5 : 2 * len(idx) // 5], "split"] = "test"
    if rare_ratio:
        train = df[df["split"] == "train"]
        rare = train[train["label"] == RARE]
        n_keep = int(train[train["label"] != RARE]["label"].value_counts().min()) // rare_ratio
        df = df.drop(index=rare.index.difference(rare.sample(n=n_keep, random_state=0).index))
    splits = root / f"splits-{rare_ratio}.csv"
    df.to_csv(splits, index=False)
    return splits


def bench_imbalance(root: Path, seeds: int, model: str) -> None:
    """Table 1: the three settings on the same seeds."""
    splits = write_digits(root, 20)
    data = load_split_data(splits, root, 8, "auto", root / "cache", progress=False)
    frame = data.frame
    counts = frame[frame["split"] == "train"]["label"].value_counts()
    val_rare = int(((frame["split"] == "val") & (frame["label"] == RARE)).sum())
    print(
        f"train split: {counts[RARE]} eights vs {counts.drop(RARE).min()}-{counts.max()} "
        f"of each other digit; val: {val_rare} eights"
    )
    kwargs = {"mlp": {"hidden": [64], "dropout": 0.0}, "simple_cnn": {"widths": [16, 32]}}[model]
    print(f"\n{model}, 8 epochs, seeds 0..{seeds - 1} (mean ± sd over seeds)\n")
    print("| setting | val recall of '8' | balanced accuracy | accuracy | s / run |")
    print("|---|---|---|---|---|")
    for name, extra in SETTINGS.items():
        rec, bal, acc, secs = [], [], [], []
        for seed in range(seeds):
            params = parse_params(
                {
                    "base": {"seed": seed},
                    "model": {"name": model, "kwargs": kwargs},
                    "augment": {"train": [], "eval": []},
                    "train": {"epochs": 8, "lr": 0.003, "image_size": 8, "device": "cpu", **extra},
                }
            )
            t0 = time.perf_counter()
            result, _ = train_model(params, data, checkpoint_path=None, progress=False)
            secs.append(time.perf_counter() - t0)
            best = result.history[result.best_epoch - 1]
            rec.append(best[f"val_recall_{RARE}"])
            bal.append(best["val_recall_macro"])
            acc.append(best["val_accuracy"])
        print(f"| {name} | {_ms(rec)} | {_ms(bal)} | {_ms(acc)} | {statistics.median(secs):.2f} |")


def _ms(values: list[float]) -> str:
    """'mean ± sd' with 3 decimals."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def bench_sampler_cost(n: int = 1_000_000) -> None:
    """Table 2: one epoch order, shuffle vs balanced draw."""
    labels = np.random.default_rng(0).integers(0, 100, n)
    probs = sample_weights(labels, 100)
    for name, kw in (("shuffle", {}), ("balanced", {"probs": probs})):
        t0 = time.perf_counter()
        for epoch in range(5):
            epoch_permutation(n, shuffle=True, seed=epoch, **kw)
        print(f"epoch order, N={n:.0e}, {name}: {(time.perf_counter() - t0) / 5 * 1000:.0f} ms")


def bench_lr_find(root: Path) -> None:
    """Table 3: the range test on the full digits with the default model and optimizer."""
    splits = write_digits(root / "full", None)
    params = parse_params(
        {"train": {"image_size": 16, "device": "cpu"}, "model": {"name": "simple_cnn"}}
    )
    data = load_split_data(splits, root / "full", 16, "auto", root / "cache16", progress=False)
    t0 = time.perf_counter()
    result = find_lr(params, data, progress=False)
    wall = time.perf_counter() - t0
    print(
        f"lr-find (digits, simple_cnn default widths, adamw, batch 64): {len(result.lrs)} steps "
        f"in {wall:.1f} s, suggested {format_lr(result.suggestion)}, "
        f"min/10 {format_lr(result.min_rule)}, diverged {result.diverged}"
    )


def main() -> None:
    """Run the three benchmarks once."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--model", choices=["mlp", "simple_cnn"], default="mlp")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bench_imbalance(Path(tmp), args.seeds, args.model)
        print()
        bench_sampler_cost()
        bench_lr_find(Path(tmp))


if __name__ == "__main__":
    main()
