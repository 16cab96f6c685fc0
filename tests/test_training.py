"""Training engine: learning happens, schedules behave, checkpoints resume, failures are clear."""

from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls.config import Params, TrainConfig, parse_params
from imgcls.data.augment import AugmentError, build_transform
from imgcls.models.bundle import load_bundle, save_bundle
from imgcls.training.run import load_split_data, train_model
from imgcls.training.trainer import TrainingError, make_optimizer, make_scheduler, select_device


def _params(**train) -> Params:
    base = {"epochs": 4, "batch_size": 16, "lr": 0.01, "image_size": 16, "device": "cpu"}
    return parse_params(
        {
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "train": {**base, **train},
            "augment": {"train": [], "eval": []},
        }
    )


def test_training_learns_the_pattern_dataset(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    params = _params(epochs=6)
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    assert data.channels == 1 and data.images.shape[1:] == (16, 16, 1)
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert max(h["val_accuracy"] for h in result.history) >= 0.8
    assert meta["classes"] == sorted(["horizontal", "vertical", "diagonal"])
    assert 1 <= result.best_epoch <= 6


def test_decoded_cache_is_reused(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    a = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    files = list((root / "cache").glob("*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # not rewritten
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))


def test_model_bundle_round_trip(pattern_splits: tuple[Path, Path], tmp_path: Path) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    result, meta = train_model(_params(epochs=1), data, checkpoint_path=None, progress=False)
    save_bundle(tmp_path / "model.pt", result.model, meta)
    clf, meta2 = load_bundle(tmp_path / "model.pt")
    x = torch.from_numpy(np.array(data.images[:4]))
    probs = clf(x)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
    assert meta2["classes"] == meta["classes"]


class _Crash(Exception):
    pass


def test_resume_matches_uninterrupted_run(
    pattern_splits: tuple[Path, Path], tmp_path: Path
) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    params = _params(epochs=4, deterministic=True)
    full, _ = train_model(params, data, checkpoint_path=tmp_path / "full.pt", progress=False)

    def crash_after_two(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise _Crash  # the epoch-2 checkpoint is already on disk, as after a kill

    ckpt = tmp_path / "part.pt"
    with pytest.raises(_Crash):
        train_model(
            params, data, checkpoint_path=ckpt, on_epoch_end=crash_after_two, progress=False
        )
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed, _ = train_model(params, data, checkpoint_path=ckpt, progress=False)
    assert resumed.resumed_from == 2
    assert len(resumed.history) == 4
    for a, b in zip(resumed.history, full.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])


def test_changed_config_starts_fresh(pattern_splits: tuple[Path, Path], tmp_path: Path) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(_Crash):
        train_model(
            _params(epochs=3),
            data,
            checkpoint_path=ckpt,
            progress=False,
            on_epoch_end=lambda e, r: (_ for _ in ()).throw(_Crash()),
        )
    other, _ = train_model(_params(epochs=3, lr=0.02), data, checkpoint_path=ckpt, progress=False)
    assert other.resumed_from == 0 and len(other.history) == 3


def test_schedules_warm_up_and_decay() -> None:
    model = torch.nn.Linear(2, 2)
    for name in ("cosine", "onecycle", "step", "constant"):
        cfg = TrainConfig(epochs=4, lr=0.1, scheduler=name, warmup_epochs=1, step_size=2)
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, steps_per_epoch=10)
        lrs = []
        for _ in range(40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) <= 0.1 + 1e-9
        if name in ("cosine", "onecycle"):
            assert lrs[0] < lrs[10] and lrs[-1] < lrs[10]
        if name == "step":
            assert lrs[25] == pytest.approx(lrs[15] * 0.1)


def test_nan_loss_stops_with_advice(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    with pytest.raises(TrainingError, match="lower train.lr"):
        train_model(
            _params(lr=1e12, optimizer="sgd", epochs=2), data, checkpoint_path=None, progress=False
        )


def test_device_requests() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            select_device("cuda")


def test_augment_entries_are_validated() -> None:
    ok = parse_params({"augment": {"train": [{"name": "HorizontalFlip", "p": 0.5}]}})
    assert len(build_transform(ok.augment.train)) == 1
    for spec, message in [
        ({"name": "HorizontalFlipp"}, "unknown albumentations transform"),
        ({"name": "HorizontalFlip", "probability": 0.5}, "has no argument"),
        ({"name": "Rotate", "limit": "lots"}, "bad arguments"),
        ({"name": "Normalize"}, "imgcls applies normalisation itself"),
    ]:
        params = parse_params({"augment": {"train": [spec]}})
        with pytest.raises(AugmentError, match=message) as info:
            build_transform(params.augment.train)
        assert "augment.train[0]" in str(info.value)
