"""Evaluation: sklearn-backed metrics, readable figures at 3 and 50 classes, the report files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_score,
    top_k_accuracy_score,
)

from _datasets import REPO
from imgcls.config import EvaluateConfig, TrackingConfig, parse_params
from imgcls.data.dataset import load_split_data
from imgcls.errors import ImgclsError
from imgcls.evaluation.evaluate import (
    evaluate_data,
    flat_metrics,
    mlflow_metrics,
    score_split,
    summary_line,
)
from imgcls.evaluation.figures import plot_confusion, plot_pr_curves, pyplot, short
from imgcls.evaluation.gallery import confident_mistakes, plot_mistakes
from imgcls.evaluation.metrics import classification_metrics, confusion, confusion_long
from imgcls.evaluation.stage import ROOT_FIGURES, EvaluatePaths, run_evaluate_stage
from imgcls.inference.logged import load_logged_model
from imgcls.models.bundle import ImageClassifier, save_bundle
from imgcls.models.registry import create_model
from imgcls.tracking import Run
from imgcls.training.figures import augmentation_grid


def _predictions(k: int, n_per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of a noisy classifier that is right most of the time."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    logits = rng.normal(size=(len(y), k))
    logits[np.arange(len(y)), y] += 2.0
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def _classes(k: int) -> list[str]:
    """Short names plus some long ones that share a prefix (the hard case for tick labels)."""
    return [f"a_rather_long_class_name_{i}" if i % 5 == 0 else f"c{i}" for i in range(k)]


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_and_use_flat_per_class_keys() -> None:
    y, p = _predictions(4)
    classes = ["rock", "paper", "scissors", "lizard spock"]
    m = classification_metrics(y, p, classes, top_k=3)
    pred = p.argmax(1)
    assert m["n"] == len(y)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["precision_weighted"] == pytest.approx(precision_score(y, pred, average="weighted"))
    assert m["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, p, k=3))
    assert m["f1_rock"] == pytest.approx(f1_score(y == 0, pred == 0))
    assert m["support_lizard_spock"] == 30  # key made safe for MLflow / dvc
    per_class = [average_precision_score(y == c, p[:, c]) for c in range(p.shape[1])]
    assert m["average_precision_macro"] == pytest.approx(np.mean(per_class))  # one-vs-rest
    assert all(isinstance(v, int | float) for v in m.values())


def test_top_k_is_capped_below_the_number_of_classes() -> None:
    y, p = _predictions(3)
    m = classification_metrics(y, p, ["a", "b", "c"], top_k=5)
    assert "top2_accuracy" in m and "top5_accuracy" not in m  # top-3 of 3 would always be 1


def test_val_split_is_prefixed_and_mlflow_keys_name_their_split() -> None:
    y, p = _predictions(3)
    m = classification_metrics(y, p, ["rock", "paper", "scissors"])

    class Res:
        metrics = m

    flat = flat_metrics({"test": Res(), "val": Res()})
    assert flat["f1_rock"] == flat["val_f1_rock"] == m["f1_rock"]
    tracked = mlflow_metrics(flat, ["rock", "paper", "scissors"])
    # per-class keys group under one "/" prefix (one chart section in MLflow's UI); val's numbers
    # never reuse the per-epoch curves' keys (`val_accuracy` would gain a stray step-0 point)
    assert tracked["test_f1_per_class/rock"] == tracked["valsplit_f1_per_class/rock"]
    assert tracked["test_support_per_class/paper"] == m["support_paper"]
    assert tracked["test_accuracy"] == tracked["valsplit_accuracy"] == m["accuracy"]
    assert tracked["test_f1_macro"] == m["f1_macro"] and "test_f1_per_class/macro" not in tracked
    assert not any(k.startswith("val_") or k.startswith("f1_") for k in tracked)
    assert len(tracked) == len(flat)  # a renaming, nothing merged


def test_multiclass_decides_by_argmax_whatever_the_thresholds() -> None:
    y, p = _predictions(3)
    res = score_split("test", y, p, ["rock", "paper", "scissors"], thresholds=[0.99])
    assert res.task == "multiclass" and res.thresholds is None
    assert np.array_equal(res.y_pred, p.argmax(1))
    assert res.metrics == classification_metrics(y, p, ["rock", "paper", "scissors"])
    m = res.metrics
    assert summary_line(res) == f"test accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}"


def test_confusion_rows_are_one_per_sample_for_dvc_plots() -> None:
    y = np.array([0, 1, 2, 2])
    pred = np.array([0, 2, 2, 1])
    df = confusion_long(y, pred, ["r", "p", "s"])
    assert list(df.columns) == ["actual", "predicted"]
    assert df.values.tolist() == [["r", "r"], ["p", "s"], ["s", "s"], ["s", "p"]]
    assert confusion(y, pred, 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


# ----------------------------------------------------------------------------- figures


def _boxes(fig, texts) -> list:
    """Display-space bounding boxes of matplotlib text artists that have content."""
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()]


def _overlaps(boxes: list) -> int:
    """Number of pairs of boxes that overlap by more than half a pixel."""
    count = 0
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5:
                count += 1
    return count


@pytest.mark.parametrize("k", [3, 50])
@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_png_is_readable(k: int, normalize: bool, tmp_path: Path) -> None:
    y, p = _predictions(k, n_per_class=40 if k == 3 else 12)
    cm = confusion(y, p.argmax(1), k) * (100 if k == 3 else 1)  # 4-digit counts at K=3
    fig = plot_confusion(cm, _classes(k), "test", normalize=normalize)
    fig.savefig(tmp_path / "cm.png")
    ax = fig.axes[0]
    assert _overlaps(_boxes(fig, ax.get_xticklabels())) == 0
    assert _overlaps(_boxes(fig, ax.get_yticklabels())) == 0
    numbers = _boxes(fig, ax.texts)
    assert numbers, "cell values are drawn"
    assert _overlaps(numbers) == 0
    # every number fits inside its own cell
    cell_w = (ax.transData.transform((1, 0)) - ax.transData.transform((0, 0)))[0]
    assert max(b.width for b in numbers) < cell_w
    assert all(len(t.get_text()) <= 19 for t in ax.get_xticklabels())  # long names shortened
    with Image.open(tmp_path / "cm.png") as img:
        w, h = img.size
    assert (w, h) >= ((400, 350) if k == 3 else (1500, 1500))
    pyplot().close(fig)


def test_short_keeps_both_ends_of_long_names() -> None:
    assert short("rock") == "rock"
    s = short("a_rather_long_class_name_15")
    assert len(s) == 18 and s.startswith("a_rat") and s.endswith("_15")


@pytest.mark.parametrize("k", [3, 50])
def test_pr_curves_one_panel_per_class(k: int, tmp_path: Path) -> None:
    y, p = _predictions(k, n_per_class=10)
    fig = plot_pr_curves(y, p, _classes(k))
    if k == 3:  # rendering 50 panels to a file is slow; the layout check below needs no file
        fig.savefig(tmp_path / "pr.png")
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == k
    assert all(" AP " in ax.get_title() for ax in panels)
    assert _overlaps(_boxes(fig, [ax.title for ax in panels])) == 0
    pyplot().close(fig)


def test_pr_curves_show_the_worst_classes_when_there_are_many() -> None:
    y, p = _predictions(80, n_per_class=5)
    fig = plot_pr_curves(y, p, [f"c{i}" for i in range(80)], max_classes=10)
    assert len([ax for ax in fig.axes if ax.lines]) == 10
    assert "10 lowest-AP of 80" in fig.texts[0].get_text()
    pyplot().close(fig)


def test_gallery_shows_the_most_confident_mistakes(tmp_path: Path) -> None:
    y, p = _predictions(3)
    idx = confident_mistakes(y, p, 5)
    pred = p.argmax(1)
    assert len(idx) == 5 and all(pred[i] != y[i] for i in idx)
    conf = p[idx, pred[idx]]
    assert np.all(np.diff(conf) <= 0)  # most confident first
    wrong = np.flatnonzero(pred != y)
    assert conf[0] == pytest.approx(p[wrong, pred[wrong]].max())
    images = np.random.default_rng(0).integers(0, 255, (len(y), 16, 16, 1), dtype=np.uint8)
    classes = ["rock", "paper", "scissors"]
    fig = plot_mistakes(images, y, p, classes, idx)
    fig.savefig(tmp_path / "gallery.png")
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert len(titles) == 5
    i = idx[0]
    assert titles[0] == (
        f"true: {classes[y[i]]}\npred: {classes[pred[i]]}\nconf {p[i, pred[i]]:.2f}"
    )
    pyplot().close(fig)


def test_gallery_without_mistakes_says_so() -> None:
    y = np.array([0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert len(confident_mistakes(y, p, 16)) == 0
    fig = plot_mistakes(np.zeros((2, 8, 8, 3), np.uint8), y, p, ["a", "b"], np.array([], int))
    assert "no misclassified images" in fig.axes[0].texts[0].get_text()
    pyplot().close(fig)


def test_augmentation_grid_draws_augmented_rows() -> None:
    from imgcls.config import TransformSpec
    from imgcls.data.augment import build_transform

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (30, 16, 16, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 10)
    transform = build_transform([TransformSpec(name="HorizontalFlip", p=1.0)])
    grid = augmentation_grid(images, labels, ["a", "b", "c"], transform, rows=6, augmented=2)
    arr = np.asarray(grid)
    assert grid.mode == "RGB" and arr.shape[0] >= 6 * 96
    # column 1 is the flipped original: compare one tile pixel-exactly (nearest upscaling)
    label_w, head_h, pad, tile = 130, 22, 4, 96
    first = arr[head_h : head_h + tile, label_w : label_w + tile, 0]
    flipped = arr[head_h : head_h + tile, label_w + tile + pad : label_w + 2 * tile + pad, 0]
    assert np.array_equal(first[:, ::-1], flipped)


# ----------------------------------------------------------------------------- report + stage


def _bundle(root: Path, splits: Path) -> tuple[ImageClassifier, Path]:
    """An untrained but real model file for the pattern dataset."""
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    net = create_model("simple_cnn", in_chans=1, num_classes=3, image_size=16, widths=[8, 16])
    meta = {
        "arch": "simple_cnn",
        "model_kwargs": {"widths": [8, 16]},
        "classes": data.classes,
        "image_size": 16,
        "channels": 1,
        "mean": [0.5],
        "std": [0.25],
    }
    save_bundle(root / "models/model.pt", net, meta)
    return ImageClassifier(net.eval(), meta["mean"], meta["std"]).eval(), root / "models/model.pt"


def test_report_has_every_figure_and_table(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    clf, _ = _bundle(root, splits)
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    report = evaluate_data(clf, data, EvaluateConfig(splits=["test", "val"], gallery_size=4))
    assert report.main.split == "test" and report.main.task == "multiclass"
    assert {"accuracy", "val_accuracy", "f1_vertical", "val_f1_vertical"} <= set(report.metrics)
    assert set(report.figures) == {
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "val_confusion_matrix.png",
        "val_confusion_matrix_normalized.png",
        "misclassified.png",
        "pr_curves.png",
    }
    cm = report.tables["confusion_matrix.json"]
    assert np.array(cm["counts"]).sum() == report.metrics["n"]
    gallery = report.tables["misclassified.json"]
    assert len(gallery) <= 4
    for row in gallery:
        assert row["true"] != row["predicted"] and (root / row["path"]).is_file()
    assert len(report.confusion_rows) == report.metrics["n"]
    for fig in report.figures.values():
        pyplot().close(fig)


@pytest.mark.slow  # a fresh interpreter importing torch + sklearn + matplotlib: ~10 s
def test_evaluate_stage_writes_its_outputs(pattern_splits: tuple[Path, Path]) -> None:
    root, splits = pattern_splits
    _bundle(root, splits)
    (root / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"gallery_size": 3}}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline/evaluate.py")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    headline = json.loads((root / "metrics/eval.json").read_text())
    metrics = json.loads((root / "reports/eval_details.json").read_text())
    # DVC's tables show the headline only; every number stays in the details file
    assert set(headline) == {"accuracy", "balanced_accuracy", "f1_macro", "val_f1_macro"}
    assert {k: metrics[k] for k in headline} == headline
    assert "val_f1_macro" in metrics and any(k.startswith("support_") for k in metrics)
    rows = (root / "plots/confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == metrics["n"] + 1
    pairs = [r.split(",") for r in rows[1:]]  # the accuracy is the confusion file's diagonal
    assert metrics["accuracy"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))
    for name in ("confusion_matrix.png", "misclassified.png", "pr_curves.png"):
        with Image.open(root / "reports/figures" / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    assert not (root / "mlflow.db").exists()  # no run file: tracking off, nothing logged
    record = json.loads((root / "models/logged_models.json").read_text())
    assert record["run_id"] is None and record["model_uri"] is record["serving_model_uri"] is None


# ----------------------------------------------------------------------------- the stage


def _stage_paths(root: Path, splits: Path) -> EvaluatePaths:
    """The evaluate stage's files under `root` (dvc.yaml's names)."""
    return EvaluatePaths(
        root=root,
        splits=splits,
        cache_dir=root / "cache",
        model=root / "models/model.pt",
        run_file=root / "models/run.json",
        metrics=root / "metrics/eval.json",
        details=root / "reports/eval_details.json",
        confusion_csv=root / "plots/confusion.csv",
        figures=root / "reports/figures",
        logged_models=root / "models/logged_models.json",
    )


def _train_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Run, str]:
    """A RUNNING run in a real SQLite store and the run file the train stage would write."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over this store
    run = Run.start(TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t"))
    (root / "models").mkdir(exist_ok=True)
    info = {"run_id": run.run_id, "tracking_uri": run.uri}
    (root / "models/run.json").write_text(json.dumps(info))
    return run, f"evaluated-{root.name}"  # unique: other tests in this process register too


def test_stage_logs_and_registers_the_model_after_evaluating_it(
    pattern_splits: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, splits = pattern_splits
    clf, _ = _bundle(root, splits)
    run, name = _train_run(root, monkeypatch)
    params = parse_params({"evaluate": {"gallery_size": 2}, "tracking": {"register_model": name}})
    report = run_evaluate_stage(_stage_paths(root, splits), params)

    record = json.loads((root / "models/logged_models.json").read_text())
    assert record["run_id"] == run.run_id and record["not_logged"] == []
    assert record["registered_model"] == {"name": name, "version": 1, "alias": "challenger"}
    client = MlflowClient(run.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["test_accuracy"] == pytest.approx(report.metrics["accuracy"])
    assert not any(k.startswith("val_") for k in got.data.metrics)  # evaluate's are valsplit_*
    # the key figures at the artifact root (MLflow's compare view lines up only root files)
    root_files = {a.path for a in client.list_artifacts(run.run_id) if not a.is_dir}
    assert set(ROOT_FIGURES) <= root_files
    # the per-image predictions, as written locally and logged
    local = pd.read_csv(root / "reports/figures/predictions_test.csv")
    dl = client.download_artifacts(run.run_id, "evaluation/predictions_test.csv", str(root / "dl"))
    pd.testing.assert_frame_equal(pd.read_csv(dl), local)
    assert list(local.columns) == ["path", "label", "predicted", "confidence", "correct"]
    assert local["correct"].mean() == pytest.approx(report.metrics["accuracy"])
    assert (local["label"] == local["predicted"]).tolist() == local["correct"].tolist()
    # the registered version is the serving model this stage logged, on the evaluated run
    version = client.get_model_version(name, "1")
    assert version.run_id == run.run_id
    assert version.source == record["serving_model_uri"], version
    assert record["model_uri"] != record["serving_model_uri"]
    # both logged models hold exactly the evaluated weights
    images = np.asarray(load_split_data(splits, root, 16, "auto", root / "cache").images[:4])
    want = clf(torch.from_numpy(images)).detach().numpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", run.uri)
        registered = (f"models:/{name}/1", f"models:/{name}@challenger")
        for uri in (record["model_uri"], record["serving_model_uri"], *registered):
            logged, _ = load_logged_model(uri)
            got_probs = logged(torch.from_numpy(images)).detach().numpy()
            np.testing.assert_allclose(got_probs, want, atol=1e-6)


def test_a_failed_evaluation_logs_no_model_and_fails_the_run(
    pattern_splits: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, splits = pattern_splits
    _bundle(root, splits)
    only_train = root / "train_only.csv"  # nothing to evaluate in test / val: the stage fails
    frame = pd.read_csv(splits).assign(split="train")
    frame.to_csv(only_train, index=False)
    run, name = _train_run(root, monkeypatch)
    params = parse_params({"tracking": {"register_model": name}})
    with pytest.raises(ImgclsError, match="no rows in the splits"):
        run_evaluate_stage(_stage_paths(root, only_train), params)

    client = MlflowClient(run.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.search_model_versions(f"name='{name}'") == []
    experiment = client.get_run(run.run_id).info.experiment_id
    assert client.search_logged_models(experiment_ids=[experiment]) == []
    assert not (root / "models/logged_models.json").exists()
    assert not (root / "metrics/eval.json").exists()


def test_log_model_false_logs_the_report_but_no_model(
    pattern_splits: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, splits = pattern_splits
    _bundle(root, splits)
    run, _ = _train_run(root, monkeypatch)
    params = parse_params({"evaluate": {"gallery_size": 0}, "tracking": {"log_model": False}})
    run_evaluate_stage(_stage_paths(root, splits), params)

    record = json.loads((root / "models/logged_models.json").read_text())
    assert record["run_id"] == run.run_id
    assert record["model_uri"] is record["serving_model_uri"] is record["registered_model"] is None
    client = MlflowClient(run.uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and "test_accuracy" in got.data.metrics
    assert client.search_logged_models(experiment_ids=[got.info.experiment_id]) == []
