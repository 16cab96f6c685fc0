"""Imbalanced classes: loss weights, the balanced sampler, and a real 20:1 digits dataset."""

from __future__ import annotations

import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from _datasets import REPO, manifest_row, with_splits, write_pattern_dataset
from _trainrun import run_train, train_history, train_project
from imgcls.config import ConfigError, parse_params
from imgcls.data.augment import build_transform
from imgcls.data.dataset import load_split_data
from imgcls.data.sources import digits_images
from imgcls.models.bundle import load_bundle
from imgcls.training.batches import epoch_permutation, make_batches, rank_batches, set_epoch
from imgcls.training.imbalance import (
    ImbalanceError,
    WeightedCrossEntropy,
    balanced_class_weights,
    loss_class_weights,
    sample_weights,
)
from imgcls.training.train import train_model

RARE = "8"  # the digit made rare; often confused with 1, 3 and 9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_20_to_1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, splits.csv): scikit-learn's digits as real PNGs, digit 8 rare 1:20 in train.

    Only the train split is thinned: the val split keeps all of its ~35 eights, so the rare
    class's recall is measured on enough images to mean something.
    """
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits_images()
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        path = root / "data/raw/digits" / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        rows.append(manifest_row(root, path, label, size=8))
    df = with_splits(pd.DataFrame(rows))
    train = df[df["split"] == "train"]
    others = train[train["label"] != RARE]["label"].value_counts()
    rare = train[train["label"] == RARE]
    keep = rare.sample(n=int(others.min()) // 20, random_state=0).index
    df = df.drop(index=rare.index.difference(keep))
    counts = df[df["split"] == "train"]["label"].value_counts()
    assert counts.min() * 20 <= counts.max() and counts.idxmin() == RARE  # really 20:1
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    df.to_csv(splits, index=False)
    return root, splits


def _digit_params(seed: int, **train) -> dict:
    """A small MLP on the 8x8 digits: seconds per run on one CPU thread."""
    return {
        "base": {"seed": seed},
        "model": {"name": "mlp", "kwargs": {"hidden": [64], "dropout": 0.0}},
        "augment": {"train": [], "eval": []},
        "train": {
            "epochs": 8,
            "batch_size": 64,
            "lr": 0.003,
            "image_size": 8,
            "device": "cpu",
            **train,
        },
    }


# ----------------------------------------------------------------------------- loss weights


def test_balanced_weights_match_scikit_learn() -> None:
    labels = np.array([0] * 100 + [1] * 5 + [2] * 45)
    weights = balanced_class_weights(labels, ["a", "b", "c"])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert weights == pytest.approx(expected)
    assert weights[1] == pytest.approx(150 / (3 * 5))  # n / (k * count)
    # Every class then carries the same total weight.
    totals = weights * np.bincount(labels)
    assert totals == pytest.approx(np.full(3, totals[0]))
    assert loss_class_weights("none", labels, ["a", "b", "c"]) is None


def test_weight_mapping_names_classes_and_rejects_unknown_ones() -> None:
    labels = np.array([0, 1, 2, 2])
    classes = ["cat", "dog", "eel"]
    assert list(loss_class_weights({"dog": 3.0}, labels, classes)) == [1.0, 3.0, 1.0]
    with pytest.raises(ImbalanceError) as info:
        loss_class_weights({"Dog": 2.0, "cow": 1.5, "cat": 1.0}, labels, classes)
    message = str(info.value)
    assert "['Dog', 'cow']" in message and "train.class_weights" in message
    assert "['cat', 'dog', 'eel']" in message  # and says what the classes are


def test_weighted_loss_is_a_per_image_mean_that_splits_over_ranks() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 1, 2, 2])
    weight = torch.tensor([0.5, 4.0, 2.0])
    loss = WeightedCrossEntropy(weight, label_smoothing=0.1)
    plain = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)(logits, target)
    assert loss(logits, target) == pytest.approx(float((plain * weight[target]).mean()))
    ones = WeightedCrossEntropy(torch.ones(3), label_smoothing=0.1)
    assert ones(logits, target) == pytest.approx(float(plain.mean()))
    # DDP averages the ranks' losses: with equal shares that must equal the whole batch's loss
    # (torch's weighted CrossEntropyLoss divides by each share's weight sum and does not).
    halves = [loss(logits[r::2], target[r::2]) for r in (0, 1)]
    assert float(sum(halves) / 2) == pytest.approx(float(loss(logits, target)))
    torch_loss = torch.nn.CrossEntropyLoss(weight=weight)
    torch_halves = [torch_loss(logits[r::2], target[r::2]) for r in (0, 1)]
    assert float(sum(torch_halves) / 2) != pytest.approx(float(torch_loss(logits, target)))


def test_balanced_weights_need_every_class_in_train() -> None:
    with pytest.raises(ImbalanceError, match=r"\['eel'\] have none in the train split"):
        balanced_class_weights(np.array([0, 1, 1]), ["cat", "dog", "eel"])


def test_config_accepts_the_three_forms_and_rejects_typos() -> None:
    assert parse_params({}).train.class_weights == "none"
    assert parse_params({}).train.sampler == "shuffle"
    assert parse_params({"train": {"class_weights": "balanced"}}).train.class_weights == "balanced"
    # Digit class names come out of YAML as numbers; labels are strings.
    weights = yaml.safe_load("train: {class_weights: {8: 20, 3: 1.5}}")
    assert parse_params(weights).train.class_weights == {"8": 20.0, "3": 1.5}
    for bad, message in [
        ({"class_weights": "balance"}, "must be none, balanced or a mapping"),
        ({"class_weights": None}, "must be none, balanced or a mapping"),
        ({"class_weights": {"a": 0}}, "numbers > 0"),
        ({"class_weights": {"a": -1.0}}, "numbers > 0"),
        ({"sampler": "weighted"}, "train.sampler"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_params({"train": bad})


def test_default_params_file_keeps_plain_training() -> None:
    from imgcls.config import load_params

    cfg = load_params(REPO / "params.yaml").train
    assert cfg.class_weights == "none" and cfg.sampler == "shuffle"


# ----------------------------------------------------------------------------- sampler


def test_balanced_sampler_draws_every_class_equally_and_is_seeded() -> None:
    labels = np.array([0] * 400 + [1] * 20 + [2] * 80)
    probs = sample_weights(labels, 3)
    order = epoch_permutation(len(labels), shuffle=True, seed=7, probs=probs)
    assert len(order) == len(labels)  # same epoch length: schedules are unchanged
    share = np.bincount(labels[order.numpy()], minlength=3) / len(order)
    assert share == pytest.approx([1 / 3] * 3, abs=0.06)
    assert len(set(order.tolist())) < len(labels)  # with replacement: repeats, some left out
    again = epoch_permutation(len(labels), shuffle=True, seed=7, probs=probs)
    assert torch.equal(order, again)  # a resumed epoch draws the same images
    assert not torch.equal(order, epoch_permutation(len(labels), shuffle=True, seed=8, probs=probs))


def test_balanced_sampler_ranks_share_the_global_batches() -> None:
    labels = np.array([0] * 30 + [1] * 3)  # 33 samples: padded to 34 for two ranks
    probs = sample_weights(labels, 2)
    single = list(rank_batches(epoch_permutation(33, shuffle=True, seed=3, probs=probs), 8, 0, 1))
    order = epoch_permutation(33, shuffle=True, seed=3, world=2, probs=probs)
    assert len(order) == 34
    r0, r1 = list(rank_batches(order, 8, 0, 2)), list(rank_batches(order, 8, 1, 2))
    assert len(r0) == len(r1) == len(single) == 5
    for a, b, whole in zip(r0, r1, single, strict=True):
        assert len(a) == len(b)
        # The same draws as one process (the last batch carries one wrapped-around extra).
        assert Counter(a.tolist() + b.tolist()) >= Counter(whole.tolist())


def test_balanced_sampler_in_both_batch_paths() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0] * 55 + [1] * 5)
    probs = sample_weights(labels, 2)
    augment = build_transform(
        parse_params({"augment": {"train": [{"name": "HorizontalFlip", "p": 0.5}]}}).augment.train
    )
    # in-memory slicing, the DataLoader path, and in-memory slicing with whole-batch flips
    for transform, batched in ((None, True), (augment, False), (augment, True)):
        batches = make_batches(
            images,
            labels,
            transform,
            20,
            shuffle=True,
            device=torch.device("cpu"),
            num_workers=0,
            sample_probs=probs,
            batched_augment=batched,
        )
        seen = []
        for epoch in range(10):
            set_epoch(batches, 1, epoch)
            seen += [y for _, y in batches]
        drawn = torch.cat(seen).numpy()
        assert len(drawn) == 600
        assert 0.35 < drawn.mean() < 0.65  # the 1-in-12 class is now drawn about half the time


# ----------------------------------------------------------------------------- training


def test_resume_with_weights_and_sampler_matches_uninterrupted(tmp_path: Path) -> None:
    df = with_splits(write_pattern_dataset(tmp_path, per_class=30))
    df = df.drop(index=df[(df["label"] == "diagonal") & (df["split"] == "train")].index[4:])
    splits = tmp_path / "splits.csv"
    df.to_csv(splits, index=False)
    data = load_split_data(splits, tmp_path, 16, "auto", tmp_path / "cache", progress=False)
    params = parse_params(
        {
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "augment": {"train": [], "eval": []},
            "train": {
                "epochs": 4,
                "batch_size": 16,
                "lr": 0.01,
                "image_size": 16,
                "device": "cpu",
                "deterministic": True,
                "class_weights": {"diagonal": 4.0},
                "sampler": "balanced",
            },
        }
    )
    full, meta = train_model(params, data, checkpoint_path=tmp_path / "full.pt", progress=False)
    assert meta["class_weights"] == {"diagonal": 4.0, "horizontal": 1.0, "vertical": 1.0}
    assert meta["sampler"] == "balanced"

    class Crash(Exception):
        pass

    def crash_after_two(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Crash

    ckpt = tmp_path / "part.pt"
    with pytest.raises(Crash):
        train_model(
            params, data, checkpoint_path=ckpt, on_epoch_end=crash_after_two, progress=False
        )
    resumed, _ = train_model(params, data, checkpoint_path=ckpt, progress=False)
    assert resumed.resumed_from == 2
    for a, b in zip(resumed.history, full.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_recall_diagonal"] == pytest.approx(b["val_recall_diagonal"])
    # The sampler is part of the config: a checkpoint of a shuffled run is not resumed.
    shuffled = params.model_copy(deep=True)
    shuffled.train.sampler = "shuffle"
    other, _ = train_model(shuffled, data, checkpoint_path=ckpt, progress=False)
    assert other.resumed_from == 0


def test_balanced_weighting_raises_the_rare_class_recall(
    digits_20_to_1: tuple[Path, Path],
) -> None:
    root, splits = digits_20_to_1
    data = load_split_data(splits, root, 8, "auto", root / "cache", progress=False)
    recall: dict[str, list[float]] = {"none": [], "balanced": [], "sampler": []}
    for seed in (0, 1):  # the same seeds for each setting: only the weighting differs
        for name, train in [
            ("none", {}),
            ("balanced", {"class_weights": "balanced"}),
            ("sampler", {"sampler": "balanced"}),
        ]:
            result, _ = train_model(
                parse_params(_digit_params(seed, **train)),
                data,
                checkpoint_path=None,
                progress=False,
            )
            best = result.history[result.best_epoch - 1]
            assert all(f"val_recall_{RARE}" in row for row in result.history)
            recall[name].append(best[f"val_recall_{RARE}"])
    # Unweighted, 5 eights among ~1000 images are drowned out; weighted, most are found.
    assert np.mean(recall["balanced"]) >= np.mean(recall["none"]) + 0.3, recall
    assert np.mean(recall["sampler"]) >= np.mean(recall["none"]) + 0.3, recall


def _stage_project(root: Path, splits: Path, class_weights: str) -> None:
    """A repository-like folder: the digits, their splits.csv and a params.yaml."""
    (root / "data/processed").mkdir(parents=True)
    (root / "data/raw").symlink_to(splits.parents[2] / "data/raw")
    (root / "data/processed/splits.csv").write_bytes(splits.read_bytes())
    params = _digit_params(0, class_weights=class_weights, deterministic=True)
    params["tracking"] = {"enabled": False}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_train_stage_records_show_the_rare_class(
    digits_20_to_1: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, splits = digits_20_to_1
    records = {}
    for weights in ("none", "balanced"):
        root = tmp_path / weights
        _stage_project(root, splits, weights)
        # The stage's own entry point as DVC runs it (in this process: no second torch import).
        monkeypatch.chdir(root)
        monkeypatch.setattr(sys, "argv", ["pipeline/train.py"])
        runpy.run_path(str(REPO / "pipeline/train.py"), run_name="__main__")
        history = pd.read_csv(root / "plots/train.csv")
        assert {f"val_recall_{d}" for d in "0123456789"} <= set(history.columns)
        metrics = json.loads((root / "reports/train_details.json").read_text())
        _, meta = load_bundle(root / "models/model.pt")
        records[weights] = (history, metrics, meta)
    none, balanced = records["none"], records["balanced"]
    assert balanced[1][f"val_recall_{RARE}"] > none[1][f"val_recall_{RARE}"] + 0.3
    assert balanced[0][f"val_recall_{RARE}"].max() > none[0][f"val_recall_{RARE}"].max()
    assert balanced[2]["class_weights"][RARE] > 15 * balanced[2]["class_weights"]["0"]
    assert set(none[2]["class_weights"].values()) == {1.0}


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_weights_and_sampler(tmp_path: Path) -> None:
    # As in test_train_processes: no BatchNorm or dropout, so DDP's averaged gradient equals
    # the single-process one, and the weighted loss and drawn batches must agree too.
    model = {"name": "mlp", "kwargs": {"hidden": [32], "dropout": 0.0}}
    train = {
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.01,
        "class_weights": {"diagonal": 3.0},
        "sampler": "balanced",
    }
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        train_project(root, model, train, [], per_class=30)
    single = run_train(one)
    assert single.returncode == 0, single.stderr
    ddp = run_train(
        two, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"
    )
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stderr.count("imbalance: class_weights") == 1  # only rank 0 logs
    pd.testing.assert_frame_equal(
        train_history(two).drop(columns=["lr"]), train_history(one).drop(columns=["lr"]), rtol=1e-4
    )
