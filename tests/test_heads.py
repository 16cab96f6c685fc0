"""Binary and multi-label heads: task resolution, losses, thresholds, training, saved models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _datasets import manifest_row, two_feature_image, with_splits, write_pattern_dataset
from imgcls.config import parse_params
from imgcls.inference.predict import InputFile, Predictor, iter_predictions
from imgcls.models.bundle import load_bundle, save_bundle
from imgcls.task import (
    TaskError,
    decide,
    decided_labels,
    encode_labels,
    join_labels,
    label_classes,
    order_classes,
    probs_from_logits,
    resolve_task,
    split_labels,
    tune_threshold,
    tune_thresholds,
)
from imgcls.training.imbalance import ImbalanceError, SigmoidBCE, label_pos_weights
from imgcls.training.loop import count_correct, cross_entropy_from_logits
from imgcls.training.train import load_training_data, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(model: dict | None = None, data: dict | None = None, **train) -> object:
    base = {"epochs": 5, "batch_size": 16, "lr": 0.01, "image_size": 16, "device": "cpu"}
    return parse_params(
        {
            "data": data or {},
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}, **(model or {})},
            "train": {**base, **train},
            "augment": {"train": [], "eval": []},
        }
    )


def _write_splits(root: Path, df: pd.DataFrame) -> Path:
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(splits, index=False)
    return splits


# ----------------------------------------------------------------------------- task rules


def test_labels_round_trip_and_classes() -> None:
    assert join_labels(["dog", "cat", "dog"]) == "cat|dog"
    assert split_labels("cat|dog") == ["cat", "dog"]
    assert label_classes(["cat|dog", "bird"], "multilabel") == ["bird", "cat", "dog"]
    assert label_classes(["cat|dog", "bird"], "multiclass") == ["bird", "cat|dog"]
    hot = encode_labels(["cat|dog", "bird"], ["bird", "cat", "dog"], "multilabel")
    assert hot.tolist() == [[0, 1, 1], [1, 0, 0]] and hot.dtype == np.float32


def test_resolve_task_and_clear_misfits() -> None:
    assert resolve_task("auto", False, ["a", "b"]) == "multiclass"
    assert resolve_task("auto", True, ["a", "b", "c"]) == "multilabel"
    assert resolve_task("binary", False, ["no", "yes"]) == "binary"
    with pytest.raises(TaskError, match="exactly 2 classes, the data has 3"):
        resolve_task("binary", False, ["a", "b", "c"])
    with pytest.raises(TaskError, match="model.head: multilabel"):
        resolve_task("softmax", True, ["a", "b"])
    assert order_classes(["sick", "healthy"], "binary", "sick") == ["healthy", "sick"]
    with pytest.raises(TaskError, match="not one of the classes"):
        order_classes(["a", "b"], "binary", "c")


def test_probabilities_per_task() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    assert torch.allclose(probs_from_logits("multiclass", logits).sum(1), torch.ones(2))
    binary = probs_from_logits("binary", torch.tensor([[0.0], [2.0]]))
    assert binary.shape == (2, 2) and torch.allclose(binary.sum(1), torch.ones(2))
    assert binary[1, 1] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    multi = probs_from_logits("multilabel", logits)
    assert torch.allclose(multi, torch.sigmoid(logits))  # independent, need not sum to 1


def test_threshold_tuning_maximises_the_metric() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])
    # F1 is best predicting the top 4 (P 3/4, R 1): threshold = the 4th highest score.
    assert tune_threshold(y, s, "f1") == pytest.approx(0.35)
    # F0.5 favours precision: only the two sure positives.
    assert tune_threshold(y, s, "f0.5") == pytest.approx(0.8)
    assert tune_threshold(np.zeros(4), s[:4]) == 0.5  # nothing to trade off
    probs = np.stack([1 - s, s], 1)
    assert decide("binary", probs, [0.35]).tolist() == [0, 1, 1, 1, 1, 0]
    assert decide("binary", probs, None).tolist() == [0, 0, 0, 1, 1, 0]  # 0.5 by default
    multi = tune_thresholds("multilabel", np.stack([y, 1 - y], 1), np.stack([s, 1 - s], 1))
    assert multi == pytest.approx([0.35, 0.6])


def test_decided_labels_report_threshold_and_sets() -> None:
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert decided_labels("binary", probs, ["no", "yes"], [0.25]) == [
        ("yes", pytest.approx(0.3)),
        ("yes", pytest.approx(0.8)),
    ]
    multi = decided_labels("multilabel", np.array([[0.9, 0.6], [0.1, 0.2]]), ["a", "b"], [0.5, 0.7])
    assert multi == [("a", None), ("", None)]


# ----------------------------------------------------------------------------- losses


def test_sigmoid_bce_matches_the_formula() -> None:
    logits = torch.tensor([[0.5], [-1.0]])
    target = torch.tensor([1, 0])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    assert SigmoidBCE()(logits, target).item() == pytest.approx(plain.item())
    weighted = SigmoidBCE(weight=torch.tensor([1.0, 3.0]))(logits, target)
    each = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], target.float(), reduction="none"
    )
    assert weighted.item() == pytest.approx(((each * torch.tensor([3.0, 1.0])).mean()).item())
    smooth = SigmoidBCE(label_smoothing=0.2)(logits, target)
    soft = torch.tensor([0.9, 0.1])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], soft)
    assert smooth.item() == pytest.approx(expected.item())
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert count_correct(torch.tensor([[2.0, -1.0], [-1.0, 3.0]]), y).item() == 1  # exact match
    assert cross_entropy_from_logits(np.array([[0.5], [-1.0]]), np.array([1, 0])) == pytest.approx(
        plain.item()
    )


def test_label_pos_weights() -> None:
    targets = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    assert label_pos_weights("balanced", targets, ["a", "b"]).tolist() == [1 / 3, 3.0]
    assert label_pos_weights({"b": 5.0}, targets, ["a", "b"]).tolist() == [1.0, 5.0]
    assert label_pos_weights("none", targets, ["a", "b"]) is None
    with pytest.raises(ImbalanceError, match=r"\['b'\] have none"):
        label_pos_weights("balanced", targets[:2], ["a", "b"])


# ----------------------------------------------------------------------------- training


def test_binary_head_trains_tunes_a_threshold_and_saves(tmp_path: Path) -> None:
    df = with_splits(write_pattern_dataset(tmp_path, 30, ("horizontal", "vertical")))
    splits = _write_splits(tmp_path, df)
    params = _params({"head": "binary", "positive_class": "horizontal"})
    data = load_training_data(params, splits, tmp_path, tmp_path / "cache", progress=False)
    assert data.task == "binary" and data.classes == ["vertical", "horizontal"]
    assert data.labels.dtype == np.int64
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    assert result.model(torch.zeros(2, 1, 16, 16)).shape == (2, 1)  # one logit
    assert max(h["val_accuracy"] for h in result.history) >= 0.8
    assert meta["task"] == "binary" and meta["threshold_metric"] == "f1"
    (threshold,) = meta["thresholds"]
    save_bundle(tmp_path / "model.pt", result.model, meta)
    clf, loaded = load_bundle(tmp_path / "model.pt")
    # the saved threshold is the one that maximises F1 on *val* for the kept weights (a model
    # saved with 0.5, or tuned on the test split, fails here)
    xv, yv = data.part("val")
    val_scores = clf(torch.from_numpy(np.ascontiguousarray(xv))).detach().numpy()[:, 1]
    assert threshold == pytest.approx(tune_threshold(yv == 1, val_scores), abs=1e-4)
    x, y = data.part("test")
    probs = clf(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()
    assert probs.shape == (len(y), 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (decide("binary", probs, loaded["thresholds"]) == y).mean() >= 0.8


def test_binary_head_rejects_three_classes(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    with pytest.raises(TaskError, match="exactly 2 classes"):
        load_training_data(_params({"head": "binary"}), splits, root, root / "c", progress=False)


def write_multilabel_dataset(root: Path, per_combo: int = 24, seed: int = 0) -> pd.DataFrame:
    """Real PNGs with the label sets {bright}, {striped}, {bright, striped}: splits-shaped rows."""
    rng = np.random.default_rng(seed)
    rows = []
    combos = [("bright",), ("striped",), ("bright", "striped")]
    for c, combo in enumerate(combos):
        folder = root / "data/raw/two" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_combo):
            path = folder / f"{i:03d}.png"
            img = two_feature_image("bright" in combo, "striped" in combo, rng)
            Image.fromarray(img).save(path)
            rows.append(manifest_row(root, path, join_labels(combo)))
    return pd.DataFrame(rows)


def test_multilabel_head_learns_both_labels(tmp_path: Path) -> None:
    splits = _write_splits(tmp_path, with_splits(write_multilabel_dataset(tmp_path)))
    params = _params(data={"multi_label": True}, epochs=8, class_weights="balanced")
    data = load_training_data(params, splits, tmp_path, tmp_path / "cache", progress=False)
    assert data.task == "multilabel" and data.classes == ["bright", "striped"]
    assert data.labels.shape == (72, 2) and data.labels.dtype == np.float32
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    best = max(result.history, key=lambda h: h["val_f1_macro"])
    assert best["val_f1_macro"] >= 0.9 and "val_f1_micro" in best
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == 2
    save_bundle(tmp_path / "model.pt", result.model, meta)
    clf, loaded = load_bundle(tmp_path / "model.pt")
    x, y = data.part("test")
    probs = clf(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()
    assert probs.shape == (len(y), 2)
    exact = (decide("multilabel", probs, loaded["thresholds"]) == (y > 0.5)).all(1).mean()
    assert exact >= 0.8
    # The predict CLI's engine reports the label set, not the top-1 label.
    predictor = Predictor(clf, loaded, torch.device("cpu"), "model.pt")
    inputs = [InputFile(str(tmp_path / p)) for p in data.frame["path"][:6]]
    preds = list(iter_predictions(predictor, inputs, progress=False, top_k=2))
    labels = {p.label for p in preds}
    assert labels <= {"bright", "striped", "bright|striped", ""} and preds[0].probability is None


def test_multilabel_rejects_the_balanced_sampler(tmp_path: Path) -> None:
    splits = _write_splits(tmp_path, with_splits(write_multilabel_dataset(tmp_path, 8)))
    params = _params(data={"multi_label": True}, epochs=1, sampler="balanced")
    data = load_training_data(params, splits, tmp_path, tmp_path / "cache", progress=False)
    with pytest.raises(ImbalanceError, match="train.sampler: balanced"):
        train_model(params, data, checkpoint_path=None, progress=False)


def test_softmax_default_is_unchanged(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    params = _params(epochs=1)
    data = load_training_data(params, splits, root, root / "cache", progress=False)
    assert data.task == "multiclass"
    _, meta = train_model(params, data, checkpoint_path=None, progress=False)
    assert meta["task"] == "multiclass" and meta["thresholds"] is None


def test_lr_finder_runs_the_multilabel_loss(tmp_path: Path) -> None:
    from imgcls.training.lr_finder import find_lr

    splits = _write_splits(tmp_path, with_splits(write_multilabel_dataset(tmp_path, 12)))
    params = _params(data={"multi_label": True}, class_weights="balanced")
    data = load_training_data(params, splits, tmp_path, tmp_path / "cache", progress=False)
    result = find_lr(params, data, start=1e-5, end=1.0, iters=12, progress=False)
    assert len(result.losses) >= 2 and np.isfinite(result.losses).all()
    # An untrained sigmoid costs ln 2 per term; balanced positive weights (negatives / positives
    # = 0.5 for both labels, each on 2 of 3 images) scale the positive terms: 2/3 * 0.5 + 1/3.
    assert result.losses[0] == pytest.approx((2 / 3 * 0.5 + 1 / 3) * np.log(2), abs=0.05)


@pytest.mark.parametrize(
    ("task", "classes"), [("binary", ["no", "yes"]), ("multilabel", list("abc"))]
)
def test_binary_and_multilabel_models_export(task: str, classes: list[str], tmp_path: Path) -> None:
    from imgcls.inference.export import ATOL, export_model, verify_export
    from imgcls.models.bundle import ImageClassifier
    from imgcls.models.registry import create_model
    from imgcls.task import output_units

    units = output_units(task, len(classes))
    net = create_model("simple_cnn", in_chans=1, num_classes=units, image_size=16, widths=[8, 16])
    clf = ImageClassifier(net, [0.5], [0.25], task).eval()
    meta = {"arch": "simple_cnn", "classes": classes, "image_size": 16, "channels": 1}
    meta |= {"task": task, "thresholds": [0.3] * (1 if task == "binary" else len(classes))}
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    probs = clf(torch.from_numpy(images)).detach().numpy()
    assert probs.shape == (3, len(classes))
    for fmt in ("onnx", "torchscript"):
        path = export_model(clf, meta, fmt, tmp_path / f"m.{fmt}")
        assert verify_export(clf, path, fmt, images) <= ATOL  # same probabilities, same head
