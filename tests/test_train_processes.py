"""The train stage as real processes: SIGKILL mid-epoch then resume, and torchrun DDP on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tests.conftest import REPO, with_splits, write_pattern_dataset

TIMING_COLUMNS = ["epoch_time_s", "images_per_s"]


def _project(root: Path, model: dict, train: dict, augment: list, per_class: int) -> None:
    """A pattern dataset, its splits.csv and a params.yaml, laid out like a repository."""
    df = with_splits(write_pattern_dataset(root, per_class=per_class))
    (root / "data/processed").mkdir(parents=True)
    df.to_csv(root / "data/processed/splits.csv", index=False)
    params = {
        "model": model,
        "augment": {"train": augment, "eval": []},
        "train": {"image_size": 16, "device": "cpu", "deterministic": True, **train},
        "tracking": {"enabled": False},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _env() -> dict[str, str]:
    """One thread per process: deterministic and fast on a shared 2-core box."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(root: Path, *launcher: str) -> subprocess.CompletedProcess:
    """Run pipeline/train.py (optionally under a launcher such as torchrun) in `root`."""
    cmd = [*launcher] if launcher else [sys.executable]
    return subprocess.run(
        [*cmd, str(REPO / "pipeline/train.py")],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _history(root: Path) -> pd.DataFrame:
    """plots/train.csv without the wall-clock columns."""
    return pd.read_csv(root / "plots/train.csv").drop(columns=TIMING_COLUMNS)


def _metrics(root: Path) -> dict:
    """metrics/train.json without the wall-clock figures."""
    data = json.loads((root / "metrics/train.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING_COLUMNS}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    model = {"name": "simple_cnn", "kwargs": {"widths": [16, 32], "dropout": 0.2}}
    # Augmentation through DataLoader workers: a resumed run must augment exactly alike.
    train = {"epochs": 4, "batch_size": 16, "lr": 0.01, "num_workers": 1}
    augment = [{"name": "Affine", "rotate": [-10, 10], "p": 0.7}]
    full, killed = tmp_path / "full", tmp_path / "killed"
    for root in (full, killed):
        _project(root, model, train, augment, per_class=80)

    done = _train(full)
    assert done.returncode == 0, done.stderr
    assert "no checkpoint at models/checkpoints/last.pt: starting fresh" in done.stderr

    ckpt = killed / "models/checkpoints/last.pt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipeline/train.py")],
        cwd=killed,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # right after epoch 1's checkpoint: inside epoch 2
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(ckpt, weights_only=True)
    assert 1 <= state["epoch"] < 4 and not state["complete"]
    assert not (killed / "models/model.pt").exists()  # the stage never got to write its outputs
    assert not list(ckpt.parent.glob(".*.tmp"))  # no half-written checkpoint left behind

    resumed = _train(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from models/checkpoints/last.pt: {state['epoch']} of 4 epochs" in (
        resumed.stderr
    )
    pd.testing.assert_frame_equal(_history(killed), _history(full), rtol=1e-6)
    assert _metrics(killed) == pytest.approx(_metrics(full), rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    # No BatchNorm or dropout: with the global batch split evenly over 2 ranks, DDP's averaged
    # gradient equals the single-process one, so the metrics must agree to rounding.
    model = {"name": "mlp", "kwargs": {"hidden": [32], "dropout": 0.0}}
    train = {"epochs": 3, "batch_size": 16, "lr": 0.01}
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        _project(root, model, train, [], per_class=30)

    single = _train(one)
    assert single.returncode == 0, single.stderr
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    ddp = _train(two, *launcher, "--nproc_per_node=2")
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stderr.count("epoch 3/3") == 1  # only rank 0 logs
    assert ddp.stdout.count("train: best epoch") == 1
    assert (two / "models/model.pt").is_file() and (two / "models/run.json").is_file()
    assert not list((two / "models").rglob(".*.tmp"))
    pd.testing.assert_frame_equal(
        _history(two).drop(columns=["lr"]), _history(one).drop(columns=["lr"]), rtol=1e-4
    )
    assert _metrics(two)["val_accuracy"] == pytest.approx(_metrics(one)["val_accuracy"])
