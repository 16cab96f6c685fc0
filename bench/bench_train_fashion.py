"""Fashion-MNIST through the whole product: `dvc repro`, ingest -> ... -> evaluate, timed.

The way a user runs it: a fresh project (the repository's params.yaml, dvc.yaml and stages in a
throw-away git repo), `data.source: fashion-mnist` (Debian's `dataset-fashion-mnist` IDX files),
split 0.85 / 0.075 / 0.075 with the official test set kept as the test split, the recipe's
model / augment / train sections, tracking on (the project's own mlflow.db). Each stage is run
with `dvc repro <stage>` in order and timed. Reported: test accuracy from the evaluate stage's
`reports/eval_details.json` (checked to be the official 10,000 test images), the split's and
validate's key figures (largest merged group, rows kept out as test leaks, class shares) and
stage times.

    .venv/bin/python bench/bench_train_fashion.py                    # the custom-CNN recipe
    .venv/bin/python bench/bench_train_fashion.py --recipe timm      # a small timm model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import REPO, bench_env, commit, copy_project

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")

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


STAGES = ("ingest", "validate", "split", "train", "evaluate")


def write_params(project: Path, recipe: dict, epochs: int | None, threads: int | None, seed: int):
    """The repository's params.yaml with the preset, the split and the recipe filled in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["seed"] = seed
    params["data"]["source"] = "fashion-mnist"
    params["split"].update({"train": 0.85, "val": 0.075, "test": 0.075})
    params["model"] = {**params["model"], **recipe["model"]}
    params["augment"] = {"train": recipe["augment"], "eval": []}
    train = {**params["train"], **recipe["train"], "image_size": 28}
    if epochs:
        train["epochs"] = epochs
    if threads:
        train["cpu_threads"] = threads
    params["train"] = train
    params["tracking"]["enabled"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_stages(project: Path) -> dict[str, float]:
    """`dvc repro <stage>` for each stage in order; wall seconds per stage."""
    times = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["dvc", "repro", stage], cwd=project, env=bench_env(), capture_output=True, text=True
        )
        times[stage] = round(time.perf_counter() - t0, 1)
        print(f"{stage}: {times[stage]} s", flush=True)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
            sys.exit(proc.returncode)
    return times


def data_figures(project: Path) -> dict:
    """What the data stages wrote: test set size, leaks kept out, merged groups, class shares."""
    splits = pd.read_csv(project / "data/processed/splits.csv", dtype=str, keep_default_na=False)
    test = splits[splits["split"] == "test"]
    shares = pd.crosstab(splits["label"], splits["split"], normalize="index")
    validation = json.loads((project / "reports/validation.json").read_text())["summary"]
    split = json.loads((project / "reports/split.json").read_text())
    return {
        "rows_per_split": splits["split"].value_counts().to_dict(),
        "test_is_official_10k": bool(
            len(test) == 10_000 and (test["source_split"] == "test").all()
        ),
        "excluded_as_test_leaks": split["excluded"]["rows"],
        "largest_group": int(splits.groupby("group").size().max()),
        "largest_merged_group": validation["largest_merged_group"],
        "merged_groups": validation["merged_groups"],
        "class_share_spread_pp": {
            s: round(float(shares[s].max() - shares[s].min()) * 100, 2) for s in shares.columns
        },
        "worst_deviation_pp": split["worst_deviation_pp"],
    }


def main() -> None:
    """Fresh project, dvc repro stage by stage, then the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="cnn")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgcls-fashion"))
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--threads", type=int, default=None, help="train.cpu_threads")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not IDX_DIR.is_dir():
        sys.exit(f"{IDX_DIR} not found: apt-get install dataset-fashion-mnist")
    shutil.rmtree(args.workdir, ignore_errors=True)
    project = copy_project(args.workdir)
    params = write_params(project, RECIPES[args.recipe], args.epochs, args.threads, args.seed)
    commit(project)
    times = run_stages(project)
    metrics = json.loads((project / "reports/eval_details.json").read_text())  # every key
    train = json.loads((project / "reports/train_details.json").read_text())
    report = {
        "recipe": args.recipe,
        "model": params["model"],
        "train": params["train"],
        "stage_wall_s": times,
        "total_wall_s": round(sum(times.values()), 1),
        "test_accuracy": round(metrics["accuracy"], 4),
        "test_images": metrics["n"],
        "test_f1_macro": round(metrics["f1_macro"], 4),
        "val_accuracy": round(train["val_accuracy"], 4),
        "best_epoch": train["best_epoch"],
        "train_img_s": round(float(train["images_per_s"]), 1),
        **data_figures(project),
        "cpus": os.cpu_count(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
