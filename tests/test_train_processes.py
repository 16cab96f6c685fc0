"""The train stage as real processes: SIGKILL mid-epoch then resume, and torchrun DDP on CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from _datasets import REPO
from _trainrun import (
    one_thread_env,
    run_stage,
    run_train,
    train_history,
    train_metrics,
    train_project,
)


def start_and_sigkill_after_first_checkpoint(
    root: Path, ready: Callable[[], bool] | None = None
) -> dict:
    """Start pipeline/train.py in `root`, SIGKILL it right after a checkpoint is written.

    With `ready`, the process is first stopped (SIGSTOP) at that checkpoint, and killed once
    `ready()` holds (e.g. its MLflow logger, a separate process, has created the run): however
    fast the training, the kill then lands mid-training with the run in the store.
    """
    ckpt = root / "models/checkpoints/last.pt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipeline/train.py")],
        cwd=root,
        env=one_thread_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if ready is not None and proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # right after epoch 1's checkpoint: inside epoch 2
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return torch.load(ckpt, weights_only=True)


# ~21 s on a loaded 2-core box (two real training processes of 240 images): over the
# ~20 s that `make test-fast` allows a test
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    model = {"name": "simple_cnn", "kwargs": {"widths": [16, 32], "dropout": 0.2}}
    # Augmentation through DataLoader workers: a resumed run must augment exactly alike.
    train = {"epochs": 4, "batch_size": 16, "lr": 0.01, "num_workers": 1}
    augment = [{"name": "Affine", "rotate": [-10, 10], "p": 0.7}]
    full, killed = tmp_path / "full", tmp_path / "killed"
    for root in (full, killed):
        train_project(root, model, train, augment, per_class=80)

    done = run_train(full)
    assert done.returncode == 0, done.stderr
    assert "no checkpoint at models/checkpoints/last.pt: starting fresh" in done.stderr

    ckpt = killed / "models/checkpoints/last.pt"
    state = start_and_sigkill_after_first_checkpoint(killed)
    assert 1 <= state["epoch"] < 4 and not state["complete"]
    assert not (killed / "models/model.pt").exists()  # the stage never got to write its outputs
    assert not list(ckpt.parent.glob(".*.tmp"))  # no half-written checkpoint left behind

    resumed = run_train(killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from models/checkpoints/last.pt: {state['epoch']} of 4 epochs" in (
        resumed.stderr
    )
    pd.testing.assert_frame_equal(train_history(killed), train_history(full), rtol=1e-6)
    assert train_metrics(killed) == pytest.approx(train_metrics(full), rel=1e-6)


# ~40 s: two train processes and the evaluate stage, each starting an MLflow logger
@pytest.mark.slow
def test_sigkilled_then_resumed_training_continues_the_same_mlflow_run(tmp_path: Path) -> None:
    model = {"name": "mlp", "kwargs": {"hidden": [32], "dropout": 0.0}}
    train = {"epochs": 4, "batch_size": 16, "lr": 0.01}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_project(tmp_path, model, train, [], per_class=40, tracking={"uri": uri})
    client = MlflowClient(uri)

    def run_exists() -> bool:
        """The logger created the run (training never waits for it: it may take a few epochs)."""
        exp = client.get_experiment_by_name("imgcls")
        return bool(exp and client.search_runs([exp.experiment_id]))

    state = start_and_sigkill_after_first_checkpoint(tmp_path, ready=run_exists)
    assert 1 <= state["epoch"] < 4 and not state["complete"]
    # The run travels in the checkpoint: its key at once, its id once the logger had reported it.
    tagged = f"tags.`imgcls.train_key` = '{state['run_key']}'"
    deadline = time.monotonic() + 60  # the logger sees the pipe close and marks the run FAILED
    runs: list = []
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("imgcls")
        runs = client.search_runs([exp.experiment_id], tagged) if exp else []
        if runs and runs[0].info.status != "RUNNING":
            break
        time.sleep(0.2)
    (first,) = runs
    run_id = first.info.run_id
    assert first.info.status == "FAILED" and state["run_id"] in (None, run_id)

    resumed = run_train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from models/checkpoints/last.pt: {state['epoch']} of 4" in resumed.stderr
    info = json.loads((tmp_path / "models/run.json").read_text())
    assert info["run_id"] == run_id and info["not_logged"] == []
    assert client.get_run(run_id).info.status == "RUNNING"  # reopened; evaluate closes it
    evaluated = run_stage(tmp_path, "evaluate")
    assert evaluated.returncode == 0, evaluated.stderr

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["train.resumed_from_epoch"] == str(state["epoch"])
    experiment = got.info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]  # one run
    history = train_history(tmp_path)
    for key in ("train_loss", "train_accuracy"):  # (evaluate logs its own val_* at step 0)
        logged = client.get_metric_history(run_id, key)
        assert [m.step for m in logged] == [1, 2, 3, 4], key  # every epoch, once
        expected = history.set_index("epoch")[key]
        assert [m.value for m in logged] == pytest.approx(expected.tolist(), rel=1e-6)
    assert "test_accuracy" in got.data.metrics


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    # No BatchNorm or dropout: with the global batch split evenly over 2 ranks, DDP's averaged
    # gradient equals the single-process one, so the metrics must agree to rounding.
    model = {"name": "mlp", "kwargs": {"hidden": [32], "dropout": 0.0}}
    train = {"epochs": 3, "batch_size": 16, "lr": 0.01}
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        train_project(root, model, train, [], per_class=30)

    single = run_train(one)
    assert single.returncode == 0, single.stderr
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    ddp = run_train(two, *launcher, "--nproc_per_node=2")
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stderr.count("epoch 3/3") == 1  # only rank 0 logs
    assert ddp.stdout.count("train: best epoch") == 1
    assert (two / "models/model.pt").is_file() and (two / "models/run.json").is_file()
    assert not list((two / "models").rglob(".*.tmp"))
    pd.testing.assert_frame_equal(
        train_history(two).drop(columns=["lr"]), train_history(one).drop(columns=["lr"]), rtol=1e-4
    )
    assert train_metrics(two)["val_accuracy"] == pytest.approx(train_metrics(one)["val_accuracy"])


@pytest.mark.slow
def test_torchrun_error_is_said_once_by_rank_zero(tmp_path: Path) -> None:
    # every rank meets the same error (15 images per step cannot split over 2 processes)
    model = {"name": "mlp", "kwargs": {"hidden": [8], "dropout": 0.0}}
    train_project(tmp_path, model, {"epochs": 1, "batch_size": 15}, [], per_class=10)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    ddp = run_train(tmp_path, *launcher, "--nproc_per_node=2")
    assert ddp.returncode != 0
    said = [line for line in ddp.stderr.splitlines() if line.startswith("train failed:")]
    assert len(said) == 1 and "must divide evenly over 2 processes" in said[0], ddp.stderr
    # torchrun's closing summary quotes the message instead of a pointer to its docs
    assert "traceback : train failed:" in ddp.stderr
    assert "To enable traceback see" not in ddp.stderr
