"""Training engine: learning happens, schedules behave, checkpoints resume, failures are clear."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls.config import ConfigError, Params, ProgressiveResize, TrainConfig, parse_params
from imgcls.data.augment import AugmentError, build_transform
from imgcls.data.dataset import DecodeError, decode_images, load_split_data
from imgcls.io import read_csv
from imgcls.models.bundle import Preprocess, load_bundle, save_bundle
from imgcls.training.batches import epoch_permutation, make_batches, rank_batches, set_epoch
from imgcls.training.ema import ModelEma
from imgcls.training.loop import Runtime, epoch_image_size, train_one_epoch, validates_epoch
from imgcls.training.setup import (
    TrainingError,
    make_optimizer,
    make_runtime,
    make_scheduler,
    per_process_batch,
    select_device,
)
from imgcls.training.train import train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    # the kept epoch is the first with the best monitored value (val_f1_macro by default), not
    # merely some epoch in range: keeping the last one, or the worst, fails here
    scores = [h["val_f1_macro"] for h in result.history]
    assert result.best_epoch == 1 + scores.index(max(scores))
    assert result.best_value == pytest.approx(max(scores))


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


def test_parallel_decode_matches_serial_and_names_broken_files(
    pattern_splits: tuple[Path, Path], tmp_path: Path
) -> None:
    root, splits = pattern_splits
    df = read_csv(splits)
    serial = decode_images(df, root, 12, 1, tmp_path / "a", workers=1, progress=False)
    parallel = decode_images(df, root, 12, 1, tmp_path / "b", workers=2, progress=False)
    assert serial.shape == (90, 12, 12, 1)
    assert np.array_equal(serial, parallel)
    broken = df["path"][50]
    (root / broken).write_bytes(b"not a png any more")
    with pytest.raises(DecodeError, match=broken):
        decode_images(df, root, 12, 1, tmp_path / "c", workers=2, progress=False)
    assert not list((tmp_path / "c").iterdir())  # no half-filled cache file left behind


class _Crash(Exception):
    pass


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_matches_uninterrupted_run(
    pattern_splits: tuple[Path, Path], tmp_path: Path, ema_decay: float | None
) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    params = _params(epochs=4, deterministic=True, ema_decay=ema_decay)
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
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
    for k, v in full.model.state_dict().items():
        assert torch.allclose(resumed.model.state_dict()[k].float(), v.float(), atol=1e-6), k


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


def test_ema_averages_weights_with_warmup() -> None:
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # warmup: early updates follow the model
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, start + 0.9)  # moved 1 - 0.1 of the way
    for _ in range(2000):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.99)
    assert torch.allclose(ema.module.weight, model.weight, atol=1e-4)
    assert not any(p.requires_grad for p in ema.module.parameters())
    clone = ModelEma(torch.nn.Linear(3, 2), decay=0.99)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == ema.updates and torch.equal(clone.module.weight, ema.module.weight)


def test_ema_weights_are_validated_and_kept(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    plain, _ = train_model(
        _params(epochs=3, deterministic=True), data, checkpoint_path=None, progress=False
    )
    ema, meta = train_model(
        _params(epochs=3, deterministic=True, ema_decay=0.95),
        data,
        checkpoint_path=None,
        progress=False,
    )
    assert meta["weights"] == "ema"
    # Same training trajectory, different (averaged) weights for validation and the result.
    assert [h["train_loss"] for h in ema.history] == pytest.approx(
        [h["train_loss"] for h in plain.history]
    )
    assert [h["val_loss"] for h in ema.history] != pytest.approx(
        [h["val_loss"] for h in plain.history]
    )
    assert not torch.equal(
        ema.model.state_dict()["0.0.weight"], plain.model.state_dict()["0.0.weight"]
    )


def test_ranks_share_the_global_batches() -> None:
    n, batch = 23, 8
    single = list(rank_batches(epoch_permutation(n, shuffle=True, seed=5), batch, 0, 1))
    order = epoch_permutation(n, shuffle=True, seed=5, world=2)
    assert len(order) == 24  # padded by wrapping so both ranks take equal steps
    r0 = list(rank_batches(order, batch, 0, 2))
    r1 = list(rank_batches(order, batch, 1, 2))
    assert len(r0) == len(r1) == len(single) == 3
    for a, b, whole in zip(r0, r1, single, strict=True):
        assert len(a) == len(b)
        assert set(a.tolist()) | set(b.tolist()) >= set(whole.tolist())
    assert not torch.equal(order, epoch_permutation(n, shuffle=True, seed=6, world=2))


# Runs in its own interpreter: a hung DataLoader worker must fail this test, not the test run.
_FORK_AFTER_OPENCV_POOL = """
import cv2, numpy as np, torch
from imgcls.config import TransformSpec
from imgcls.data.augment import build_transform
from imgcls.training.batches import make_batches
big = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(3):  # what the train stage's augmentation grid does: OpenCV starts its pool
    cv2.warpAffine(big, np.float32([[1, 0.1, 3], [0.1, 1, 2]]), (1500, 1500))
tf = build_transform([TransformSpec(name="Affine", rotate=(-20, 20), p=1.0)], "augment.train")
x = np.random.default_rng(1).integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
batches = make_batches(x, np.zeros(64, np.int64), tf, 16, shuffle=True,
                       device=torch.device("cpu"), num_workers=2)
print(sum(len(y) for _, y in batches))
"""


def test_workers_forked_after_opencv_started_its_pool_do_not_hang() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _FORK_AFTER_OPENCV_POOL],
        capture_output=True,
        text=True,
        timeout=120,  # it hung forever when the workers called cv2.setNumThreads themselves
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "64"


def test_augmented_batches_do_not_depend_on_workers() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 12, 12, 1), dtype=np.uint8)
    labels = np.arange(40) % 3
    params = parse_params(
        {"augment": {"train": [{"name": "Affine", "rotate": [-30, 30], "p": 1.0}]}}
    )
    transform = build_transform(params.augment.train)

    def epoch(workers: int, epoch: int) -> list[torch.Tensor]:
        batches = make_batches(
            images,
            labels,
            transform,
            16,
            shuffle=True,
            device=torch.device("cpu"),
            num_workers=workers,
        )
        set_epoch(batches, 7, epoch)
        return [x.contiguous() for x, _ in batches]

    first = epoch(0, 0)
    assert [x.shape for x in first] == [(16, 1, 12, 12), (16, 1, 12, 12), (8, 1, 12, 12)]
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 0), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(2, 0), strict=True))
    assert not torch.equal(first[0], epoch(0, 1)[0])


def test_precision_and_batch_checks() -> None:
    cpu = torch.device("cpu")
    assert make_runtime(TrainConfig(precision="bf16"), cpu).autocast_dtype == torch.bfloat16
    assert make_runtime(TrainConfig(), cpu).autocast_dtype is None
    # channels_last auto (unmeasured): NHWC on CPU (fp32 or bf16); true / false are obeyed.
    assert make_runtime(TrainConfig(), cpu).channels_last
    assert make_runtime(TrainConfig(precision="bf16"), cpu).channels_last
    assert make_runtime(TrainConfig(channels_last=True), cpu).channels_last
    assert not make_runtime(TrainConfig(precision="bf16", channels_last=False), cpu).channels_last
    with pytest.raises(ConfigError, match="cpu_threads"):
        parse_params({"train": {"cpu_threads": 0}})
    assert parse_params({"train": {"cpu_threads": "auto"}}).train.cpu_threads == "auto"
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        make_runtime(TrainConfig(precision="fp16"), cpu)
    assert per_process_batch(64, 4) == 16
    with pytest.raises(TrainingError, match="multiple of 3"):
        per_process_batch(64, 3)
    with pytest.raises(ConfigError, match="train.monitor"):
        parse_params({"train": {"monitor": "val_f1"}})
    with pytest.raises(ConfigError, match="train.num_workers"):
        parse_params({"train": {"num_workers": -1}})


def test_fashion_preset_applies_through_dvc_overrides(tmp_path: Path) -> None:
    """params/fashion-mnist.yaml as `dvc exp run -S` flags: DVC applies them, params parse."""
    import importlib.util
    import shutil

    import yaml
    from dvc.utils.hydra import apply_overrides

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fashion", repo / "bench/bench_train_fashion.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    preset = yaml.safe_load((repo / "params/fashion-mnist.yaml").read_text())
    flags = bench.set_flags(bench.overlay(bench.DATA, preset))
    assert all(" " not in f for f in flags)  # one shell word each
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", [f.removeprefix("--set-param=") for f in flags])
    params = parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert (
        params.data.source == "fashion-mnist" and params.train.epochs == preset["train"]["epochs"]
    )
    assert params.model.kwargs == preset["model"]["kwargs"]
    assert [t.name for t in params.augment.train] == [t["name"] for t in preset["augment"]["train"]]
    assert params.train.precision == "auto" and params.split.val == 0.075
    assert params == parse_params(
        bench.overlay(
            yaml.safe_load((repo / "params.yaml").read_text()), bench.overlay(bench.DATA, preset)
        )
    )


def test_progressive_resize_schedule() -> None:
    """Sides grow linearly from start_size, in multiples, to image_size; the last epoch is full."""
    schedule = ProgressiveResize(start_size=16, full_at=0.6)
    sizes = [epoch_image_size(28, e, 13, schedule) for e in range(13)]
    assert sizes == [16, 16, 16, 20, 20, 20, 24, 24, 28, 28, 28, 28, 28]
    assert [epoch_image_size(28, e, 13, None) for e in range(13)] == [28] * 13
    always_small = ProgressiveResize(start_size=8, full_at=1.0, multiple=1)
    assert [epoch_image_size(16, e, 4, always_small) for e in range(4)] == [8, 10, 13, 16]
    assert epoch_image_size(16, 0, 1, always_small) == 16  # one epoch: full size
    with pytest.raises(ConfigError, match="progressive_resize.start_size"):
        parse_params({"train": {"image_size": 16, "progressive_resize": {"start_size": 20}}})


def test_train_one_epoch_trains_at_the_scheduled_size() -> None:
    """The network sees each batch downscaled (antialiased: a flat image stays flat)."""
    seen: list[torch.Tensor] = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    flat = torch.full((4, 1, 16, 16), 200, dtype=torch.uint8)
    batches = [(flat, torch.tensor([0, 1, 2, 0]))] * 2
    net(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer at 8 x 8
    seen.clear()
    stats = train_one_epoch(
        net,
        Preprocess([0.5], [0.25]),
        batches,
        torch.optim.SGD(net.parameters(), lr=0.1),
        None,
        torch.nn.CrossEntropyLoss(),
        Runtime(torch.device("cpu")),
        size=8,
    )
    assert stats.images == 8 and [tuple(x.shape) for x in seen] == [(4, 1, 8, 8)] * 2
    expected = (200 / 255 - 0.5) / 0.25
    assert torch.allclose(seen[0], torch.full_like(seen[0], expected), atol=1e-5)


def test_progressive_resize_trains_and_reports_the_sides(
    pattern_splits: tuple[Path, Path],
) -> None:
    root, splits = pattern_splits
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    schedule = {"start_size": 8, "full_at": 0.5}
    result, _ = train_model(
        _params(epochs=6, progressive_resize=schedule), data, checkpoint_path=None, progress=False
    )
    assert [e["image_size"] for e in result.extra["timing"]] == [8, 8, 12, 16, 16, 16]
    # only the full-size epochs are validated (at 16 px); the small ones train only
    assert ["val_accuracy" in h for h in result.history] == [False] * 3 + [True] * 3
    assert all(e["val_s"] < 0.01 for e in result.extra["timing"][:3])
    assert result.best_epoch >= 4
    assert max(h.get("val_accuracy", 0) for h in result.history) >= 0.8

    every = {**schedule, "validate_small": True}
    result, _ = train_model(
        _params(epochs=6, progressive_resize=every), data, checkpoint_path=None, progress=False
    )
    assert all("val_accuracy" in h for h in result.history)


def test_validated_epochs_follow_the_resize_schedule() -> None:
    plain = TrainConfig(image_size=28, epochs=13)
    assert all(validates_epoch(plain, e) for e in range(13))
    small = {"start_size": 16, "full_at": 0.6}
    resized = TrainConfig(image_size=28, epochs=13, progressive_resize=small)
    assert [validates_epoch(resized, e) for e in range(13)] == [False] * 8 + [True] * 5
    every = TrainConfig(
        image_size=28, epochs=13, progressive_resize={**small, "validate_small": True}
    )
    assert all(validates_epoch(every, e) for e in range(13))


_STEPS = """
import resource, sys, torch
from imgcls.training.setup import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Flatten(),
                          torch.nn.LazyLinear(10))
x, y = torch.randn(64, 1, 28, 28), torch.arange(64) % 10
opt = torch.optim.SGD(net.parameters(), lr=0.01)
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_freed_memory_stops_page_faults_in_every_step() -> None:
    """The same steps fault their buffers in every time by default, not once malloc keeps them."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 1000  # 10 steps re-fault MBs of activations (4 KiB pages)
    assert kept < default / 5
