"""Evaluation of binary and multi-label heads: hand-checked metrics, figures, report, stage."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from _datasets import REPO, with_splits, write_pattern_dataset
from imgcls.config import EvaluateConfig
from imgcls.data.dataset import load_split_data
from imgcls.errors import ImgclsError
from imgcls.evaluation.evaluate import (
    build_report,
    check_thresholds,
    evaluate_data,
    flat_metrics,
    mlflow_metrics,
    predict_probs,
    score_split,
    summary_line,
)
from imgcls.evaluation.figures import plot_binary_pr_curve, plot_multilabel_confusion, pyplot
from imgcls.evaluation.gallery import confident_mistakes, mistakes_table, plot_mistakes
from imgcls.evaluation.metrics import (
    binary_metrics,
    confusion_long_multilabel,
    multilabel_metrics,
)
from imgcls.models.bundle import ImageClassifier, save_bundle
from imgcls.models.registry import create_model
from imgcls.task import label_sets, row_names, tune_threshold
from imgcls.training.figures import augmentation_grid

# ----------------------------------------------------------------------------- binary

BIN_CLASSES = ["ok", "defect"]  # [negative, positive]
BIN_Y = np.array([0, 0, 0, 1, 1, 1])
BIN_P1 = np.array([0.1, 0.2, 0.4, 0.3, 0.6, 0.9])  # p(defect)
BIN_PROBS = np.stack([1 - BIN_P1, BIN_P1], axis=1)


def test_binary_metrics_use_the_threshold_not_the_argmax() -> None:
    # At 0.5: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 0.8. At 0.3 the defect scored 0.3 is caught
    # and the ok image scored 0.4 becomes a false alarm: TP 3, FP 1 -> P 3/4, R 1, F1 6/7.
    at_half = binary_metrics(BIN_Y, BIN_PROBS, BIN_CLASSES, 0.5)
    assert at_half["precision_at_threshold"] == pytest.approx(1.0)
    assert at_half["recall_at_threshold"] == pytest.approx(2 / 3)
    assert at_half["f1_at_threshold"] == pytest.approx(0.8)
    m = binary_metrics(BIN_Y, BIN_PROBS, BIN_CLASSES, 0.3)
    assert m["threshold"] == 0.3
    assert m["precision_at_threshold"] == pytest.approx(0.75)
    assert m["recall_at_threshold"] == pytest.approx(1.0)
    assert m["f1_at_threshold"] == pytest.approx(6 / 7)
    assert m["f1_defect"] == m["f1_at_threshold"] and m["support_defect"] == 3
    assert m["recall_ok"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    # threshold-free: AP = (1/1 + 2/2 + 3/4) / 3; AUC = 8 of 9 (pos, neg) pairs ranked right
    assert m["average_precision"] == pytest.approx(2.75 / 3)
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert m["f1_macro"] == pytest.approx((6 / 7 + 0.8) / 2)  # ok: P 1, R 2/3 -> F1 0.8
    assert not any(k.startswith("top") for k in m)
    assert all(isinstance(v, int | float) for v in m.values())


def test_binary_split_decides_at_the_tuned_threshold() -> None:
    t = tune_threshold(BIN_Y == 1, BIN_P1, "f1")
    assert t == pytest.approx(0.3)  # the F1-best operating point of this toy case
    res = score_split("test", BIN_Y, BIN_PROBS, BIN_CLASSES, task="binary", thresholds=[t])
    assert res.y_pred.tolist() == [0, 0, 1, 1, 1, 1]  # arg-max would give [0, 0, 0, 0, 1, 1]
    assert res.confusion.tolist() == [[2, 1], [0, 3]]
    assert summary_line(res) == (
        "test accuracy 0.8333, macro F1 0.8286, F1 0.8571 at threshold 0.300"
    )


def test_binary_without_positives_leaves_out_the_undefined_metrics() -> None:
    m = binary_metrics(np.zeros(3, int), BIN_PROBS[:3], BIN_CLASSES, 0.5)
    assert "roc_auc" not in m and "average_precision" not in m
    assert m["recall_at_threshold"] == 0.0 and m["accuracy"] == 1.0


def test_binary_pr_curve_marks_the_operating_point(tmp_path: Path) -> None:
    fig = plot_binary_pr_curve(BIN_Y, BIN_PROBS, BIN_CLASSES, 0.3)
    fig.savefig(tmp_path / "pr.png")
    ax = fig.axes[0]
    (point,) = [line for line in ax.lines if line.get_marker() == "o"]
    assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx((1.0, 0.75))
    assert "threshold 0.300" in ax.texts[0].get_text()
    assert "defect" in ax.get_title()
    pyplot().close(fig)


# ----------------------------------------------------------------------------- multi-label

ML_CLASSES = ["cat", "dog", "fox"]
ML_Y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], np.float32)
ML_PROBS = np.array(
    [[0.4, 0.9, 0.1], [0.8, 0.6, 0.2], [0.1, 0.7, 0.8], [0.2, 0.3, 0.6]], np.float32
)
ML_T = [0.3, 0.5, 0.7]
# Decisions at ML_T: [cat dog], [cat dog] (dog wrong), [dog fox], [] (fox missed).
# At 0.5 instead, image 0 would lose `cat` (a miss) and image 3 would gain `fox` (a hit).


def test_multilabel_metrics_by_hand() -> None:
    m = multilabel_metrics(ML_Y, ML_PROBS, ML_CLASSES, ML_T)
    assert "accuracy" not in m
    assert m["subset_accuracy"] == pytest.approx(2 / 4)
    assert m["hamming_loss"] == pytest.approx(2 / 12)
    # per label: cat TP 2 -> F1 1; dog TP 2 FP 1 -> P 2/3, F1 0.8; fox TP 1 FN 1 -> R 1/2, F1 2/3
    assert m["f1_cat"] == pytest.approx(1.0)
    assert (m["precision_dog"], m["recall_dog"], m["f1_dog"]) == pytest.approx((2 / 3, 1, 0.8))
    assert (m["precision_fox"], m["recall_fox"], m["f1_fox"]) == pytest.approx((1, 0.5, 2 / 3))
    assert (m["support_cat"], m["support_dog"], m["support_fox"]) == (2, 2, 2)
    assert m["f1_micro"] == pytest.approx(5 / 6)  # TP 5, FP 1, FN 1
    assert m["f1_macro"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx(m["f1_macro"])  # equal supports
    assert m["threshold_fox"] == 0.7 and m["threshold_cat"] == 0.3
    assert m["average_precision_cat"] == pytest.approx(1.0)  # both cats score highest
    # every label's positives outrank its negatives (AP 1 each); pooled, one negative dog (0.6)
    # ties a positive fox (0.6) and sits above a positive cat (0.4): by hand, sklearn's step AP
    # is 4/6 * 1 + 1/6 * 5/6 + 1/6 * 6/7
    assert m["average_precision_macro"] == pytest.approx(1.0)
    assert m["average_precision_micro"] == pytest.approx(4 / 6 + 5 / 36 + 1 / 7)
    at_half = multilabel_metrics(ML_Y, ML_PROBS, ML_CLASSES, None)
    assert at_half["threshold_dog"] == 0.5
    assert (at_half["recall_cat"], at_half["recall_fox"]) == pytest.approx((0.5, 1.0))


def test_multilabel_confusion_per_label_and_rows_for_dvc_plots() -> None:
    res = score_split("test", ML_Y, ML_PROBS, ML_CLASSES, task="multilabel", thresholds=ML_T)
    assert res.y_pred.tolist() == [
        [True, True, False],
        [True, True, False],
        [False, True, True],
        [False, False, False],
    ]
    # sklearn layout [[TN, FP], [FN, TP]] per label
    assert res.confusion.tolist() == [[[2, 0], [0, 2]], [[1, 1], [0, 2]], [[2, 0], [1, 1]]]
    rows = confusion_long_multilabel(ML_Y, res.y_pred, ML_CLASSES)
    assert list(rows.columns) == ["actual", "predicted"] and len(rows) == 12
    assert rows.iloc[3 * 3 + 2].tolist() == ["fox", "not fox"]  # image 3, label fox: missed
    assert rows.iloc[1 * 3 + 1].tolist() == ["not dog", "dog"]  # image 1, label dog: false alarm
    assert (rows["actual"] == rows["predicted"]).sum() == 10
    assert summary_line(res) == ("test subset accuracy 0.5000, micro F1 0.8333, macro F1 0.8222")


def test_multilabel_gallery_ranks_images_by_their_most_confident_wrong_label(
    tmp_path: Path,
) -> None:
    pred = score_split("t", ML_Y, ML_PROBS, ML_CLASSES, task="multilabel", thresholds=ML_T).y_pred
    idx = confident_mistakes(ML_Y, ML_PROBS, 16, pred)
    assert idx.tolist() == [1, 3]  # dog said yes at 0.6 beats fox said no at 1 - 0.6
    table = mistakes_table(
        idx, ML_Y, ML_PROBS, ML_CLASSES, ["a.png", "b.png", "c.png", "d.png"], pred
    )
    assert table[0] == {
        "path": "b.png",
        "true": "cat",
        "predicted": "cat|dog",
        "confidence": 0.6,
        "wrong": {"dog": 0.6},
    }
    assert table[1]["predicted"] == "(none)" and table[1]["confidence"] == pytest.approx(0.4)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    fig = plot_mistakes(images, ML_Y, ML_PROBS, ML_CLASSES, idx, y_pred=pred)
    fig.savefig(tmp_path / "gallery.png")
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles == ["true: cat\npred: cat|dog\nconf 0.60", "true: fox\npred: (none)\nconf 0.40"]
    pyplot().close(fig)


def test_augmentation_grid_takes_multi_hot_labels() -> None:
    labels = np.repeat(ML_Y, 3, axis=0)  # 12 rows, 4 label sets
    assert row_names(labels[:4], ML_CLASSES) == ["cat|dog"] * 3 + ["cat"]
    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 1), dtype=np.uint8)
    grid = augmentation_grid(images, labels, ML_CLASSES, None, rows=4, augmented=1)
    assert grid.size[1] == 22 + 4 * (96 + 4)  # one row per label set


def test_label_sets_are_canonical() -> None:
    assert label_sets(ML_Y, ML_CLASSES) == ["cat|dog", "cat", "dog|fox", "fox"]
    assert label_sets(np.zeros((1, 3)), ML_CLASSES) == [""]
    assert row_names(np.zeros((1, 3)), ML_CLASSES) == ["(none)"]


def _overlaps(fig, texts) -> int:
    """Number of pairs of non-empty text artists whose boxes overlap by more than half a pixel."""
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
    return sum(
        min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )


@pytest.mark.parametrize("k", [3, 30])
@pytest.mark.parametrize("normalize", [False, True])
def test_multilabel_confusion_grid_is_readable(k: int, normalize: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cms = rng.integers(0, 5000, (k, 2, 2))  # 4-digit counts
    names = [f"a_rather_long_label_name_{i}" if i % 4 == 0 else f"l{i}" for i in range(k)]
    fig = plot_multilabel_confusion(cms, names, "test", normalize)
    fig.savefig(tmp_path / "cm.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == k
    assert _overlaps(fig, [ax.title for ax in panels]) == 0
    texts = [t for ax in panels for t in ax.texts]
    assert len(texts) == 4 * k and _overlaps(fig, texts) == 0
    renderer = fig.canvas.get_renderer()
    for ax in panels:  # every number fits inside its cell
        cell_w = (ax.transData.transform((1, 0)) - ax.transData.transform((0, 0)))[0]
        assert max(t.get_window_extent(renderer).width for t in ax.texts) < cell_w
    with Image.open(tmp_path / "cm.png") as img:
        assert img.size >= ((600, 280) if k == 3 else (1000, 1000))
    pyplot().close(fig)


# ----------------------------------------------------------------------------- thresholds


def test_thresholds_must_fit_the_task() -> None:
    assert check_thresholds("multiclass", [0.3], 3) is None
    assert check_thresholds("binary", None, 2) is None
    assert check_thresholds("multilabel", np.array([0.1, 0.2]), 2) == [0.1, 0.2]
    with pytest.raises(ImgclsError, match=r"models/model.pt: 2 decision threshold.*expected 3"):
        check_thresholds("multilabel", [0.5, 0.5], 3, "models/model.pt")
    with pytest.raises(ImgclsError, match="expected 1"):
        check_thresholds("binary", [0.5, 0.5], 2)


# ----------------------------------------------------------------------------- report


def _report(task: str, tmp_path: Path):
    """A report from fixed probabilities for `task` (test + val), figures rendered to disk."""
    if task == "binary":
        y, probs, classes, t = BIN_Y, BIN_PROBS, BIN_CLASSES, [0.3]
    else:
        y, probs, classes, t = ML_Y, ML_PROBS, ML_CLASSES, ML_T
    results = {
        s: score_split(s, y, probs, classes, task=task, thresholds=t) for s in ("test", "val")
    }
    images = {s: np.zeros((len(y), 8, 8, 1), np.uint8) for s in results}
    paths = {s: [f"{s}/{i}.png" for i in range(len(y))] for s in results}
    report = build_report(results, classes, images, paths, gallery_size=4)
    for name, fig in report.figures.items():
        fig.savefig(tmp_path / name)
        pyplot().close(fig)
    return report


def test_binary_report(tmp_path: Path) -> None:
    report = _report("binary", tmp_path)
    assert set(report.figures) == {
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "val_confusion_matrix.png",
        "val_confusion_matrix_normalized.png",
        "misclassified.png",
        "pr_curves.png",
    }
    assert report.metrics["threshold"] == report.metrics["val_threshold"] == 0.3
    cm = report.tables["confusion_matrix.json"]
    assert cm["counts"] == [[2, 1], [0, 3]] and cm["positive_class"] == "defect"
    pr = report.tables["pr_curve.json"]
    assert pr["threshold"] == 0.3 and len(pr["precision"]) == len(pr["thresholds"]) + 1
    assert [r["path"] for r in report.tables["misclassified.json"]] == ["test/2.png"]
    assert report.confusion_rows["predicted"].tolist()[2:4] == ["defect", "defect"]
    assert "test_f1_at_threshold" in mlflow_metrics(report.metrics, report.classes)
    assert all((tmp_path / name).stat().st_size > 1000 for name in report.figures)


def test_multilabel_report(tmp_path: Path) -> None:
    report = _report("multilabel", tmp_path)
    assert {"confusion_matrix.png", "misclassified.png", "pr_curves.png"} <= set(report.figures)
    assert "accuracy" not in report.metrics and "val_subset_accuracy" in report.metrics
    cm = report.tables["confusion_matrix.json"]
    assert np.array(cm["counts"]).shape == (3, 2, 2) and cm["thresholds"] == ML_T
    assert len(report.confusion_rows) == 12
    assert [r["path"] for r in report.tables["misclassified.json"]] == ["test/1.png", "test/3.png"]
    flat = flat_metrics({"test": report.main})
    tracked = mlflow_metrics(flat, report.classes)
    assert tracked["test_subset_accuracy"] == 0.5 and "test_threshold_per_class/fox" in tracked
    preds = report.predictions  # label sets per image, as the gallery's tiles name them
    assert preds is not None and len(preds) == 4 and preds["correct"].sum() == 2
    assert all(isinstance(v, float) for v in tracked.values())


# ----------------------------------------------------------------------------- real model


class _Stripes(nn.Module):
    """A fixed (untrained) "network": vertical minus horizontal stripe energy, per output unit."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(1.0, 2.0, units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, units) logits."""
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
        return (dx - dy).unsqueeze(1) * self.scale


def _two_class_splits(root: Path) -> Path:
    """splits.csv of a real 2-class PNG dataset (horizontal vs vertical stripes)."""
    df = with_splits(write_pattern_dataset(root, 20, ("horizontal", "vertical")))
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    df.to_csv(splits, index=False)
    return splits


def test_evaluate_data_binary_with_a_real_classifier(tmp_path: Path) -> None:
    splits = _two_class_splits(tmp_path)
    data = load_split_data(splits, tmp_path, 16, "auto", tmp_path / "cache", progress=False)
    clf = ImageClassifier(_Stripes(1), [0.5], [0.25], task="binary").eval()
    test_images, test_y = data.part("test")
    p1 = predict_probs(clf, test_images)[:, 1]
    t = float(np.sort(p1)[1])  # a threshold that calls all but the lowest-scored image positive
    cfg = EvaluateConfig(splits=["test", "val"], gallery_size=4)
    report = evaluate_data(clf, data, cfg, thresholds=[t])  # task: the classifier's own
    assert report.main.task == "binary"
    assert report.metrics["threshold"] == pytest.approx(t)
    assert report.main.y_pred.sum() == len(test_y) - 1
    expected = binary_metrics(test_y, predict_probs(clf, test_images), data.classes, t)
    assert report.metrics["f1_at_threshold"] == pytest.approx(expected["f1_at_threshold"])
    assert np.array(report.tables["confusion_matrix.json"]["counts"]).sum() == len(test_y)
    for row in report.tables["misclassified.json"]:
        assert row["true"] != row["predicted"] and (tmp_path / row["path"]).is_file()
    for fig in report.figures.values():
        pyplot().close(fig)


def _multilabel_splits(root: Path, per_class: int = 12) -> Path:
    """splits.csv of real PNGs labelled with their stripe class, plus "noisy" on every third."""
    df = write_pattern_dataset(root, per_class)
    df["label"] = [lab if i % 3 else f"{lab}|noisy" for i, lab in enumerate(df["label"])]
    df = with_splits(df)
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    df.to_csv(splits, index=False)
    return splits


def test_evaluate_data_multilabel_with_a_real_classifier(tmp_path: Path) -> None:
    splits = _multilabel_splits(tmp_path)
    data = load_split_data(
        splits, tmp_path, 16, "auto", tmp_path / "cache", task="multilabel", progress=False
    )
    assert data.classes == ["diagonal", "horizontal", "noisy", "vertical"]
    clf = ImageClassifier(_Stripes(4), [0.5], [0.25], task="multilabel").eval()
    cfg = EvaluateConfig(splits=["test", "val"], gallery_size=4)
    report = evaluate_data(clf, data, cfg, thresholds=[0.5, 0.6, 0.7, 0.8])
    assert report.main.task == "multilabel" and report.metrics["threshold_vertical"] == 0.8
    n = report.metrics["n"]
    assert len(report.confusion_rows) == 4 * n
    assert np.array(report.tables["confusion_matrix.json"]["counts"]).sum() == 4 * n
    assert {"subset_accuracy", "f1_micro", "val_f1_macro", "support_noisy"} <= set(report.metrics)
    expected = multilabel_metrics(
        data.part("test")[1],
        predict_probs(clf, data.part("test")[0]),
        data.classes,
        [0.5, 0.6, 0.7, 0.8],
    )
    assert report.metrics["f1_micro"] == pytest.approx(expected["f1_micro"])
    for row in report.tables["misclassified.json"]:
        assert row["true"] != row["predicted"] and row["wrong"]
        assert (tmp_path / row["path"]).is_file()
    for fig in report.figures.values():
        pyplot().close(fig)
    single = dataclasses.replace(data, labels=np.zeros(len(data.labels), np.int64))
    with pytest.raises(ImgclsError, match=r"the model is multilabel but the labels have shape"):
        evaluate_data(clf, single, cfg)


# ----------------------------------------------------------------------------- stage


def _stage(root: Path) -> subprocess.CompletedProcess:
    """Run pipeline/evaluate.py in `root` (a fresh interpreter, as `dvc repro` does)."""
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"gallery_size": 3}}))
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline/evaluate.py")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _save(root: Path, net: nn.Module, classes: list[str], task: str, thresholds) -> None:
    """A real model file whose architecture the registry can rebuild (weights from `net`)."""
    meta = {
        "arch": "mlp",
        "model_kwargs": {},
        "classes": classes,
        "image_size": 16,
        "channels": 1,
        "mean": [0.5],
        "std": [0.25],
        "task": task,
        "thresholds": thresholds,
        "threshold_metric": "f1",
    }
    save_bundle(root / "models/model.pt", net, meta)


@pytest.mark.slow  # a fresh interpreter importing torch + sklearn + matplotlib
def test_evaluate_stage_binary(tmp_path: Path) -> None:
    _two_class_splits(tmp_path)
    torch.manual_seed(0)
    net = create_model("mlp", in_chans=1, num_classes=1, image_size=16)
    _save(tmp_path, net, ["horizontal", "vertical"], "binary", [0.42])
    proc = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "at threshold 0.420" in proc.stdout
    metrics = json.loads((tmp_path / "reports/eval_details.json").read_text())
    assert metrics["threshold"] == 0.42 and "val_recall_at_threshold" in metrics
    headline = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert headline["threshold"] == 0.42 and "f1_at_threshold" in headline
    assert "val_recall_at_threshold" not in headline and "f1_horizontal" not in headline
    assert "top2_accuracy" not in metrics
    with Image.open(tmp_path / "reports/figures/pr_curves.png") as img:
        assert img.format == "PNG"
    rows = pd.read_csv(tmp_path / "plots/confusion.csv")
    assert set(rows["actual"]) <= {"horizontal", "vertical"} and len(rows) == metrics["n"]


@pytest.mark.slow
def test_evaluate_stage_multilabel(tmp_path: Path) -> None:
    _multilabel_splits(tmp_path)
    classes = ["diagonal", "horizontal", "noisy", "vertical"]
    torch.manual_seed(0)
    net = create_model("mlp", in_chans=1, num_classes=4, image_size=16)
    _save(tmp_path, net, classes, "multilabel", [0.5, 0.5, 0.4, 0.5])
    proc = _stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "subset accuracy" in proc.stdout
    metrics = json.loads((tmp_path / "reports/eval_details.json").read_text())
    assert "accuracy" not in metrics and metrics["threshold_noisy"] == 0.4
    headline = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert set(headline) == {
        "subset_accuracy",
        "f1_micro",
        "f1_macro",
        "hamming_loss",
        "val_f1_macro",
    }
    rows = pd.read_csv(tmp_path / "plots/confusion.csv")
    assert len(rows) == 4 * metrics["n"] and "not noisy" in set(rows["actual"])
