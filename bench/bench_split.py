"""Split quality and speed: imgcls's group-stratified split vs scikit-learn's StratifiedGroupKFold.

Run: .venv/bin/python bench/bench_split.py [--seeds 5]

Quality = worst per-class share deviation from the 0.70 / 0.15 / 0.15 target, in percentage
points, over every class x split (the issue's target: within 2 pp when groups are small relative
to classes). StratifiedGroupKFold only makes equal folds, so it is used the two usual ways:
"sgkf-2stage" (one of round(1/0.15)=7 folds as test, then one of round(0.85/0.15)=6 folds of the
rest as val) and "sgkf-20fold" (20 folds of 5%: 3 to test, 3 to val, 14 to train).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from imgcls.config import SplitConfig
from imgcls.data.near_duplicates import candidate_pairs
from imgcls.data.split import SPLITS, assign_splits, split_report

CFG = SplitConfig(train=0.7, val=0.15, test=0.15)


def _frame(labels: list[str], groups: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """Manifest-like frame with unique files and random pHashes."""
    n = len(labels)
    return pd.DataFrame(
        {
            "path": [f"data/raw/x/{i:07d}.png" for i in range(n)],
            "label": labels,
            "group": groups,
            "source_split": "",
            "sha256": [f"{i:064x}" for i in range(n)],
            "phash": [f"{v:016x}" for v in rng.integers(0, 2**63, n, dtype=np.int64)],
        }
    )


def small_groups(rng: np.random.Generator) -> pd.DataFrame:
    """10 classes, 4000 single-label groups, geometric sizes (mean 4, many singletons)."""
    labels, groups = [], []
    for g in range(4000):
        lab, size = f"c{rng.integers(10)}", int(rng.geometric(0.25))
        labels += [lab] * size
        groups += [f"g{g}"] * size
    return _frame(labels, groups, rng)


def no_singletons(rng: np.random.Generator) -> pd.DataFrame:
    """10 classes, 1500 single-label groups of 2..20 images (no one-image groups)."""
    labels, groups = [], []
    for g in range(1500):
        lab, size = f"c{rng.integers(10)}", int(rng.integers(2, 21))
        labels += [lab] * size
        groups += [f"g{g}"] * size
    return _frame(labels, groups, rng)


def hands(rng: np.random.Generator) -> pd.DataFrame:
    """Rock-paper-scissors-like: 90 people (groups), each with 5..15 images of all 3 classes."""
    labels, groups = [], []
    for person in range(90):
        for lab in ("rock", "paper", "scissors"):
            size = int(rng.integers(5, 16))
            labels += [lab] * size
            groups += [f"hand{person:03d}"] * size
    return _frame(labels, groups, rng)


def imbalanced(rng: np.random.Generator) -> pd.DataFrame:
    """8 classes of 60..600 images in groups of 1..30 (a rare class has few groups)."""
    labels, groups = [], []
    g = 0
    for c, total in enumerate(np.linspace(60, 600, 8).astype(int)):
        left = int(total)
        while left > 0:
            size = min(left, int(rng.integers(1, 31)))
            labels += [f"c{c}"] * size
            groups += [f"g{g}"] * size
            left -= size
            g += 1
    return _frame(labels, groups, rng)


def mnist_like(rng: np.random.Generator) -> pd.DataFrame:
    """70 000 one-image groups in 10 classes (data.group.by: none on MNIST)."""
    n = 70_000
    labels = [f"c{v}" for v in rng.integers(0, 10, n)]
    return _frame(labels, [f"data/raw/x/{i:07d}.png" for i in range(n)], rng)


def worst_pp(labels: pd.Series, split: pd.Series) -> tuple[float, int]:
    """Worst |share - target| over class x split in pp, and the number of empty class x split."""
    table = pd.crosstab(labels, split).reindex(columns=list(SPLITS), fill_value=0)
    shares = table.div(table.sum(axis=1), axis=0)
    target = pd.Series([CFG.train, CFG.val, CFG.test], index=list(SPLITS))
    return float((shares - target).abs().to_numpy().max() * 100), int((table == 0).sum().sum())


def ours(df: pd.DataFrame, seed: int) -> pd.Series:
    """imgcls assign_splits."""
    return assign_splits(df, CFG, seed=seed)["split"]


def sgkf_two_stage(df: pd.DataFrame, seed: int) -> pd.Series:
    """Test = one of 7 folds, then val = one of 6 folds of the rest."""
    split = pd.Series("train", index=df.index, dtype=object)
    outer = StratifiedGroupKFold(n_splits=round(1 / CFG.test), shuffle=True, random_state=seed)
    rest, test = next(outer.split(df, df["label"], df["group"]))
    split.iloc[test] = "test"
    sub = df.iloc[rest]
    k = round((CFG.train + CFG.val) / CFG.val)
    inner = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    _, val = next(inner.split(sub, sub["label"], sub["group"]))
    split.iloc[rest[val]] = "val"
    return split


def sgkf_20fold(df: pd.DataFrame, seed: int) -> pd.Series:
    """20 folds of 5%: folds 0-2 test, 3-5 val, the rest train."""
    split = pd.Series("train", index=df.index, dtype=object)
    folds = StratifiedGroupKFold(n_splits=20, shuffle=True, random_state=seed)
    for i, (_, idx) in enumerate(folds.split(df, df["label"], df["group"])):
        if i < 6:
            split.iloc[idx] = "test" if i < 3 else "val"
    return split


METHODS: dict[str, Callable[[pd.DataFrame, int], pd.Series]] = {
    "imgcls": ours,
    "sgkf-2stage": sgkf_two_stage,
    "sgkf-20fold": sgkf_20fold,
}
SCENARIOS = {
    "small_groups": small_groups,
    "no_singletons": no_singletons,
    "hands (rps-like)": hands,
    "imbalanced": imbalanced,
}


def quality(seeds: int) -> None:
    """Print mean / max worst deviation and mean time per method and scenario."""
    print(
        "| scenario | rows | groups | method | worst dev pp (mean) | (max) "
        "| empty class x split (total) | time s (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, make in SCENARIOS.items():
        for method, fn in METHODS.items():
            devs, times, empty = [], [], 0
            for seed in range(seeds):
                df = make(np.random.default_rng(seed))
                t0 = time.perf_counter()
                split = fn(df, seed)
                times.append(time.perf_counter() - t0)
                groups_ok = split.groupby(df["group"]).nunique().max() == 1
                assert groups_ok, f"{method} leaked a group"
                dev, missing = worst_pp(df["label"], split)
                devs.append(dev)
                empty += missing
            print(
                f"| {name} | {len(df)} | {df['group'].nunique()} | {method} | "
                f"{np.mean(devs):.2f} | {np.max(devs):.2f} | {empty} | {np.mean(times):.3f} |"
            )


def speed() -> None:
    """Time assign_splits, a stable re-split after 10% growth, and the report on 70k rows."""
    rng = np.random.default_rng(0)
    df = mnist_like(rng)
    t0 = time.perf_counter()
    first = assign_splits(df.iloc[:63_000], CFG, seed=0)
    t1 = time.perf_counter()
    again = assign_splits(df, CFG, seed=0, previous=first)
    t2 = time.perf_counter()
    report = split_report(again, CFG)
    t3 = time.perf_counter()
    moved = (again["split"].iloc[:63_000] != first["split"]).sum()
    print(f"assign_splits 63k singletons: {t1 - t0:.2f} s")
    print(f"assign_splits 70k with previous (stable, +7k new): {t2 - t1:.2f} s, moved {moved}")
    print(f"split_report 70k: {t3 - t2:.2f} s, worst dev {report['worst_deviation_pp']} pp")
    # Clustered pHashes (many near-identical images, as for small grayscale digits): harder
    # for the band index because buckets get crowded.
    centers = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64)
    pick = centers[rng.integers(0, 2000, len(again))]
    flips = np.zeros(len(again), dtype=np.uint64)
    for _ in range(6):
        flips |= np.uint64(1) << rng.integers(0, 64, len(again)).astype(np.uint64)
    t4 = time.perf_counter()
    pairs = candidate_pairs(pick ^ flips, 4)
    t5 = time.perf_counter()
    print(f"candidate_pairs 70k clustered pHashes: {t5 - t4:.2f} s, {len(pairs)} pairs")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    quality(args.seeds)
    speed()


if __name__ == "__main__":
    main()
