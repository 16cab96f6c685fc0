"""pipeline/train.py as a real process on a small pattern dataset (resume and torchrun tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from _datasets import REPO, with_splits, write_pattern_dataset

TIMING_COLUMNS = ["epoch_time_s", "images_per_s"]


def train_project(
    root: Path,
    model: dict,
    train: dict,
    augment: list,
    per_class: int,
    tracking: dict | None = None,
) -> None:
    """A pattern dataset, its splits.csv and a params.yaml, laid out like a repository.

    Tracking is off unless `tracking` (the params section, e.g. a `uri`) is given.
    """
    df = with_splits(write_pattern_dataset(root, per_class=per_class))
    (root / "data/processed").mkdir(parents=True)
    df.to_csv(root / "data/processed/splits.csv", index=False)
    params = {
        "model": model,
        "augment": {"train": augment, "eval": []},
        "train": {"image_size": 16, "device": "cpu", "deterministic": True, **train},
        "tracking": tracking or {"enabled": False},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def one_thread_env() -> dict[str, str]:
    """One thread per process: deterministic and fast on a shared 2-core box.

    MLFLOW_TRACKING_URI is dropped: runs go where the project's params.yaml says.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_train(root: Path, *launcher: str) -> subprocess.CompletedProcess:
    """Run pipeline/train.py (optionally under a launcher such as torchrun) in `root`."""
    return run_stage(root, "train", *launcher)


def run_stage(root: Path, stage: str, *launcher: str) -> subprocess.CompletedProcess:
    """Run pipeline/<stage>.py (optionally under a launcher such as torchrun) in `root`."""
    cmd = [*launcher] if launcher else [sys.executable]
    return subprocess.run(
        [*cmd, str(REPO / f"pipeline/{stage}.py")],
        cwd=root,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_history(root: Path) -> pd.DataFrame:
    """plots/train.csv without the wall-clock columns."""
    return pd.read_csv(root / "plots/train.csv").drop(columns=TIMING_COLUMNS)


def train_metrics(root: Path) -> dict:
    """The best epoch's figures (reports/train_details.json) without the wall-clock ones."""
    data = json.loads((root / "reports/train_details.json").read_text())
    return {k: v for k, v in data.items() if k not in [*TIMING_COLUMNS, "train_time_s", "timing"]}
