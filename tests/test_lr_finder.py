"""LR range test: the curve's shape, the suggestion, no leaks into training, the CLI and MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imgcls.cli import main
from imgcls.config import Params, parse_params
from imgcls.data.dataset import SplitData, load_split_data
from imgcls.training.lr_finder import (
    LrFindError,
    dvc_command,
    find_lr,
    format_lr,
    lr_ramp,
    smooth,
    suggest,
)
from imgcls.training.train import train_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params_dict(**train) -> dict:
    return {
        "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
        "augment": {"train": [], "eval": []},
        "train": {
            "epochs": 6,
            "batch_size": 16,
            "lr": 0.01,
            "image_size": 16,
            "device": "cpu",
            **train,
        },
        "tracking": {"experiment": "lr-find-test"},
    }


def _data(pattern_splits: tuple[Path, Path]) -> SplitData:
    root, splits = pattern_splits
    return load_split_data(splits, root, 16, "auto", root / "cache", progress=False)


def test_ramp_smoothing_and_formatting() -> None:
    lrs = lr_ramp(1e-6, 1.0, 61)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.1)  # geometric: equal steps on a log axis
    for start, end, iters in [(0.0, 1.0, 50), (1.0, 0.1, 50), (1e-5, 1.0, 3)]:
        with pytest.raises(LrFindError):
            lr_ramp(start, end, iters)
    assert smooth(np.array([2.0, 2.0, 2.0])) == pytest.approx([2.0, 2.0, 2.0])  # no start-up bias
    for lr in (1e-5, 2.5e-4, 0.0012, 0.03, 3.0):
        text = format_lr(lr)
        assert isinstance(yaml.safe_load(text), int | float)  # DVC's -S must read a number
        assert float(text) == pytest.approx(lr, rel=0.05)
    assert format_lr(1e-5) == "1.0e-05"
    assert dvc_command(0.0012) == "dvc exp run -S train.lr=0.0012"


def test_suggestion_on_a_known_curve() -> None:
    lrs = np.geomspace(1e-6, 10, 200)
    x = np.log10(lrs)
    # Falls fastest at 1e-3 (a logistic step), bottoms out, then blows up after 1e-1.
    loss = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) ** 2 * 8, 0)
    steepest, min_lr, falls = suggest(lrs, loss)
    assert falls
    assert steepest == pytest.approx(1e-3, rel=0.15)
    assert min_lr == pytest.approx(lrs[np.argmin(loss)])
    flat_then_up = np.linspace(1.0, 3.0, 50)
    _, _, falls = suggest(np.geomspace(1e-3, 1, 50), flat_then_up)
    assert not falls


def test_range_test_falls_then_diverges(pattern_splits: tuple[Path, Path]) -> None:
    params = parse_params(_params_dict())
    result = find_lr(params, _data(pattern_splits), start=1e-5, end=10, iters=100, progress=False)
    s = result.smoothed
    assert result.diverged and result.falls
    assert len(result.lrs) < 100  # stopped at the divergence, before the ramp's end
    assert s.min() < 0.5 * s[0]  # the loss fell ...
    assert s[-1] > 2 * s.min()  # ... then blew up
    assert int(np.argmin(s)) < len(s) - 1
    assert result.suggestion in result.lrs  # a learning rate that was actually tried
    # ... where the smoothed loss was falling (a sign error, picking the steepest *rise*, fails)
    i = list(result.lrs).index(result.suggestion)
    assert s[min(i + 2, len(s) - 1)] < s[max(i - 2, 0)]
    assert result.suggestion <= result.min_loss_lr
    frame = result.frame()
    assert list(frame.columns) == ["step", "lr", "loss", "smoothed_loss"]
    assert len(frame) == len(result.lrs)
    # Training with the suggestion learns.
    tuned = params.model_copy(deep=True)
    tuned.train.lr = result.suggestion
    trained, _ = train_model(tuned, _data(pattern_splits), checkpoint_path=None, progress=False)
    assert trained.history[-1]["train_loss"] < 0.5 * trained.history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in trained.history) >= 0.8


def test_range_test_leaks_nothing_into_training(pattern_splits: tuple[Path, Path]) -> None:
    root, _ = pattern_splits
    params = parse_params(_params_dict(epochs=2, deterministic=True))
    before = params.model_dump()
    data = _data(pattern_splits)
    plain, _ = train_model(params, data, checkpoint_path=None, progress=False)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    find_lr(params, data, start=1e-4, end=1.0, iters=20, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream goes on as is
    assert params.model_dump() == before  # train.lr and friends untouched
    after, _ = train_model(params, data, checkpoint_path=None, progress=False)
    for a, b in zip(after.history, plain.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert not list(root.rglob("*.pt"))  # no checkpoint, no model file


def test_empty_train_split_is_an_error(pattern_splits: tuple[Path, Path]) -> None:
    data = _data(pattern_splits)
    data.frame["split"] = "val"
    with pytest.raises(LrFindError, match="train split is empty"):
        find_lr(Params(), data, progress=False)


def _project(pattern_splits: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the dataset's root, next to a params.yaml (as from a repository root)."""
    root, _ = pattern_splits
    (root / "params.yaml").write_text(yaml.safe_dump(_params_dict()))
    monkeypatch.chdir(root)
    return root


def _suggested(out: str) -> float:
    """The LR from the printed `dvc exp run -S train.lr=...` line."""
    line = next(ln for ln in out.splitlines() if "dvc exp run -S train.lr=" in ln)
    return float(line.split("train.lr=")[1])


def test_cli_writes_the_plot_and_prints_the_command(
    pattern_splits: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _project(pattern_splits, monkeypatch)
    main(["lr-find", "--start", "1e-5", "--iters", "80", "--plot", "figs/lr.png"])
    out = capsys.readouterr().out
    plot = root / "figs/lr.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 200
    # the command to run carries the suggested (steepest-descent) rate, not the other rule's
    steepest = re.search(r"steepest descent of the smoothed loss:\s+lr = (\S+)", out)
    min_rule = re.search(r"minimum of the smoothed loss / 10:\s+lr = (\S+)", out)
    assert steepest and min_rule, out
    assert _suggested(out) == float(steepest.group(1))
    assert 1e-5 <= _suggested(out) <= 10  # inside the swept range (--start .. default end)
    assert not list(root.rglob(".*.tmp"))


def test_cli_rejects_a_bad_range(
    pattern_splits: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _project(pattern_splits, monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["lr-find", "--start", "1", "--end", "0.1"])
    assert info.value.code == 1
    assert "0 < start < end" in capsys.readouterr().err


def test_cli_logs_a_run_to_mlflow(
    pattern_splits: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    root = _project(pattern_splits, monkeypatch)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    main(["lr-find", "--start", "1e-5", "--iters", "40", "--plot", "lr.png", "--mlflow"])
    suggested = _suggested(capsys.readouterr().out)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lr-find-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "lr-find"
    assert run.data.metrics["lr_find.suggested_lr"] == pytest.approx(suggested, rel=0.05)
    assert run.data.params["train.optimizer"] == "adamw"
    assert run.data.params["lr_find.iters"] == "40"
    assert run.data.tags["lr_find.command"].startswith("dvc exp run -S train.lr=")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}
    assert artifacts == {"lr_find/lr.png", "lr_find/curve.csv"}
