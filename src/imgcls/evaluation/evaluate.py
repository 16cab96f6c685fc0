"""Predict splits with a saved model and build the evaluation report (no file writes).

The model's task (imgcls.task) decides what is reported: multiclass (arg-max decisions, K×K
confusion, top-k), binary (decisions at the threshold tuned on val, the operating point and the
positive class's PR curve) or multi-label (per-label decisions at per-label thresholds, 2×2
confusion per label, subset accuracy and micro / macro F1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import precision_recall_curve

from imgcls.config import EvaluateConfig
from imgcls.data.dataset import SplitData
from imgcls.errors import ImgclsError
from imgcls.evaluation.figures import (
    plot_binary_pr_curve,
    plot_confusion,
    plot_multilabel_confusion,
    plot_pr_curves,
)
from imgcls.evaluation.gallery import confident_mistakes, mistakes_table, plot_mistakes
from imgcls.evaluation.metrics import (
    binary_metrics,
    classification_metrics,
    confusion,
    confusion_long,
    confusion_long_multilabel,
    multilabel_confusion,
    multilabel_metrics,
)
from imgcls.evaluation.predictions import predictions_table
from imgcls.models.bundle import ImageClassifier
from imgcls.task import TASKS, Task, decide, safe_name


@dataclass
class SplitEvaluation:
    """Predictions and metrics of one split."""

    split: str
    y_true: np.ndarray  # (N,) class indices, or (N, K) multi-hot for multi-label
    probs: np.ndarray  # (N, K)
    metrics: dict[str, Any]
    confusion: np.ndarray  # (K, K), or (K, 2, 2) per label for multi-label
    task: Task = "multiclass"
    thresholds: list[float] | None = None  # binary: [t]; multi-label: one per class

    @property
    def y_pred(self) -> np.ndarray:
        """Decisions: top-1 (multiclass), thresholded (binary), (N, K) bool (multi-label)."""
        return decide(self.task, self.probs, self.thresholds)


@torch.no_grad()
def predict_probs(clf: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, S, S, C) uint8 -> (N, K) probabilities, batch by batch on the CPU."""
    out = [
        clf(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def check_thresholds(
    task: Task, thresholds: Sequence[float] | None, n_classes: int, where: str = "the model"
) -> list[float] | None:
    """Thresholds as a list of floats, or a clear error when they do not fit the task."""
    if task not in TASKS:
        raise ImgclsError(f"{where}: unknown task {task!r} (expected one of {TASKS})")
    if task == "multiclass" or thresholds is None:
        return None  # multiclass decides by arg-max; a missing threshold means 0.5 (decide())
    expected = 1 if task == "binary" else n_classes
    values = [float(t) for t in thresholds]
    if len(values) != expected:
        raise ImgclsError(
            f"{where}: {len(values)} decision threshold(s) for a {task} model with "
            f"{n_classes} classes, expected {expected}; retrain (`dvc repro train`) so the "
            "thresholds are tuned again"
        )
    return values


def check_labels(task: Task, labels: np.ndarray, n_classes: int, where: str) -> None:
    """Single-label data needs (N,) indices, multi-label data (N, K) multi-hot rows."""
    want = 2 if task == "multilabel" else 1
    if labels.ndim != want or (want == 2 and labels.shape[1] != n_classes):
        shape = "(N, K) multi-hot" if want == 2 else "(N,) class indices"
        raise ImgclsError(
            f"{where}: the model is {task} but the labels have shape {labels.shape}, not "
            f"{shape} with K={n_classes}; check data.multi_label / model.head in params.yaml "
            "and rerun the pipeline (`dvc repro`)"
        )


def split_metrics(
    task: Task,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    thresholds: list[float] | None,
    top_k: int = 3,
) -> dict[str, Any]:
    """The flat metrics of one split for the model's task."""
    if task == "binary":
        return binary_metrics(y_true, probs, classes, thresholds[0] if thresholds else 0.5)
    if task == "multilabel":
        return multilabel_metrics(y_true, probs, classes, thresholds)
    return classification_metrics(y_true, probs, classes, top_k)


def score_split(
    split: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    task: Task = "multiclass",
    thresholds: Sequence[float] | None = None,
    top_k: int = 3,
) -> SplitEvaluation:
    """Metrics and confusion counts of one split from its probabilities (no model needed)."""
    thresholds = check_thresholds(task, thresholds, len(classes))
    ev = SplitEvaluation(split, y_true, probs, {}, np.zeros((0, 0), np.int64), task, thresholds)
    ev.metrics = split_metrics(task, y_true, probs, classes, thresholds, top_k)
    if task == "multilabel":
        ev.confusion = multilabel_confusion(y_true, ev.y_pred)
    else:
        ev.confusion = confusion(y_true, ev.y_pred, len(classes))
    return ev


def evaluate_split(
    clf: ImageClassifier,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    top_k: int = 3,
    batch_size: int = 256,
    task: Task = "multiclass",
    thresholds: Sequence[float] | None = None,
) -> SplitEvaluation:
    """Predict one split with the model, then :func:`score_split`."""
    probs = predict_probs(clf, images, batch_size)
    return score_split(split, labels, probs, classes, task=task, thresholds=thresholds, top_k=top_k)


def flat_metrics(results: dict[str, SplitEvaluation]) -> dict[str, Any]:
    """Every split's metrics, test keys bare (`accuracy`), others prefixed (`val_accuracy`)."""
    flat: dict[str, Any] = {}
    for split, res in results.items():
        prefix = "" if split == "test" else f"{split}_"
        flat.update({f"{prefix}{k}": v for k, v in res.metrics.items()})
    return flat


# What `metrics/eval.json` keeps for `dvc metrics show / diff` and `dvc exp show`: a few numbers
# per task that fit a terminal. Every other key (per class, weighted, top-k, val's) stays in the
# details file and in MLflow; a key a task does not produce is simply absent.
HEADLINE_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "threshold",  # binary: the operating point and the positive class's numbers at it
    "f1_at_threshold",
    "precision_at_threshold",
    "recall_at_threshold",
    "average_precision",
    "subset_accuracy",  # multi-label
    "f1_micro",
    "hamming_loss",
    "val_f1_macro",
)


def headline_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """The few keys of `flat` (see HEADLINE_KEYS) that `metrics/eval.json` declares to DVC."""
    return {k: flat[k] for k in HEADLINE_KEYS if k in flat}


# Per-class keys of `flat` (`<stem>_<class>`): in MLflow they become `<split>_<stem>_per_class/
# <class>`, because the UI makes one chart section per prefix before a "/": 50 classes then fill
# a few folded sections (`test_f1_per_class`, ...) instead of 200 rows among the headline keys.
PER_CLASS_STEMS = ("precision", "recall", "f1", "support", "threshold", "average_precision")
# The evaluated val numbers get their own prefix (not `val_*`, the per-epoch curves' keys), one
# that sorts after `test_`: MLflow's compare view renders the first metric rows only.
EVAL_VAL_PREFIX = "valsplit_"


def mlflow_key(key: str, classes: Sequence[str] = ()) -> str:
    """A flat key as a run metric: `accuracy` -> `test_accuracy`, `val_accuracy` ->
    `valsplit_accuracy`, `f1_rock` -> `test_f1_per_class/rock` (see PER_CLASS_STEMS)."""
    split, rest = "test", key
    for other in ("val", "train"):
        if key.startswith(f"{other}_"):
            split, rest = other, key[len(other) + 1 :]
    prefix = EVAL_VAL_PREFIX if split == "val" else f"{split}_"
    names = {safe_name(c) for c in classes}
    for stem in PER_CLASS_STEMS:
        name = rest.removeprefix(f"{stem}_")
        if name != rest and name in names:
            return f"{prefix}{stem}_per_class/{name}"
    return f"{prefix}{rest}"


def mlflow_metrics(flat: dict[str, Any], classes: Sequence[str] = ()) -> dict[str, float]:
    """The same numbers as run metrics, every key labelled with its split (:func:`mlflow_key`)."""
    return {mlflow_key(k, classes): float(v) for k, v in flat.items()}


def summary_line(res: SplitEvaluation) -> str:
    """One line for the stage's log: the headline numbers of the task."""
    m = res.metrics
    if res.task == "multilabel":
        return (
            f"{res.split} subset accuracy {m['subset_accuracy']:.4f}, "
            f"micro F1 {m['f1_micro']:.4f}, macro F1 {m['f1_macro']:.4f}"
        )
    line = f"{res.split} accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}"
    if res.task == "binary":
        line += f", F1 {m['f1_at_threshold']:.4f} at threshold {m['threshold']:.3f}"
    return line


@dataclass
class Report:
    """Everything the evaluate stage writes, still in memory."""

    main: SplitEvaluation  # the split the figures describe (test if evaluated)
    metrics: dict[str, Any]  # flat, every key (the details file; eval.json keeps the headline)
    confusion_rows: pd.DataFrame  # (actual, predicted) per sample, for `dvc plots`
    figures: dict[str, Any]  # file name -> matplotlib figure
    tables: dict[str, Any]  # file name -> JSON-able data
    predictions: pd.DataFrame | None = None  # main split: path, label, predicted, confidence
    classes: list[str] = field(default_factory=list)  # the model's, in its order

    @property
    def predictions_name(self) -> str:
        """The predictions table's file name (`predictions_test.csv`)."""
        return f"predictions_{self.main.split}.csv"


def _confusion_outputs(
    res: SplitEvaluation, classes: list[str], prefix: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Counts + row-normalised confusion figures and the JSON counts of one split."""
    split = res.split
    if res.task == "multilabel":
        figures = {
            f"{prefix}confusion_matrix.png": plot_multilabel_confusion(
                res.confusion, classes, f"{split}: per-label counts (rows: true)"
            ),
            f"{prefix}confusion_matrix_normalized.png": plot_multilabel_confusion(
                res.confusion, classes, f"{split}: per label, row-normalised", True
            ),
        }
        table = {
            "split": split,
            "classes": classes,
            "layout": "per label [[TN, FP], [FN, TP]] (rows: true no / yes, columns: predicted)",
            "thresholds": res.thresholds,
            "counts": res.confusion.tolist(),
        }
        return figures, {f"{prefix}confusion_matrix.json": table}
    figures = {
        f"{prefix}confusion_matrix.png": plot_confusion(
            res.confusion, classes, f"{split}: counts (rows: true class)"
        ),
        f"{prefix}confusion_matrix_normalized.png": plot_confusion(
            res.confusion, classes, f"{split}: row-normalised (recall on the diagonal)", True
        ),
    }
    table: dict[str, Any] = {
        "split": split,
        "classes": classes,
        "rows": "true class",
        "columns": "predicted class",
        "counts": res.confusion.tolist(),
    }
    if res.task == "binary":
        table.update(positive_class=classes[1], threshold=res.metrics["threshold"])
    return figures, {f"{prefix}confusion_matrix.json": table}


def _binary_pr_table(res: SplitEvaluation, classes: list[str]) -> dict[str, Any]:
    """The positive class's PR curve as numbers (for comparing runs), with the operating point."""
    positive = res.y_true == 1
    table: dict[str, Any] = {
        "split": res.split,
        "positive_class": classes[1],
        "threshold": res.metrics["threshold"],
        "precision_at_threshold": res.metrics["precision_at_threshold"],
        "recall_at_threshold": res.metrics["recall_at_threshold"],
    }
    if positive.any():
        precision, recall, thr = precision_recall_curve(positive, res.probs[:, 1])
        table.update(
            precision=np.round(precision, 4).tolist(),
            recall=np.round(recall, 4).tolist(),
            thresholds=np.round(thr, 4).tolist(),  # one fewer: the last point has none
        )
    return table


def build_report(
    results: dict[str, SplitEvaluation],
    classes: list[str],
    images: dict[str, np.ndarray],
    paths: dict[str, list[str]],
    gallery_size: int = 16,
) -> Report:
    """Metrics, confusion data and figures for the evaluated splits (figures of test; val's CM)."""
    name = "test" if "test" in results else next(iter(results))
    main = results[name]
    figures: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for split, res in results.items():
        figs, tabs = _confusion_outputs(res, classes, "" if split == name else f"{split}_")
        figures.update(figs)
        tables.update(tabs)
    y_pred = main.y_pred
    idx = confident_mistakes(main.y_true, main.probs, gallery_size, y_pred)
    figures["misclassified.png"] = plot_mistakes(
        images[name],
        main.y_true,
        main.probs,
        classes,
        idx,
        f"{name}: most confident mistakes",
        y_pred,
    )
    tables["misclassified.json"] = mistakes_table(
        idx, main.y_true, main.probs, classes, paths[name], y_pred
    )
    if main.task == "binary":
        figures["pr_curves.png"] = plot_binary_pr_curve(
            main.y_true, main.probs, classes, main.metrics["threshold"]
        )
        tables["pr_curve.json"] = _binary_pr_table(main, classes)
        rows = confusion_long(main.y_true, y_pred, classes)
    elif main.task == "multilabel":
        used = main.thresholds or [0.5] * len(classes)  # decide()'s default
        figures["pr_curves.png"] = plot_pr_curves(main.y_true, main.probs, classes, thresholds=used)
        rows = confusion_long_multilabel(main.y_true, y_pred, classes)
    else:
        figures["pr_curves.png"] = plot_pr_curves(main.y_true, main.probs, classes)
        rows = confusion_long(main.y_true, y_pred, classes)
    predictions = predictions_table(main.y_true, main.probs, y_pred, classes, paths[name])
    return Report(main, flat_metrics(results), rows, figures, tables, predictions, list(classes))


def evaluate_data(
    clf: ImageClassifier,
    data: SplitData,
    cfg: EvaluateConfig,
    where: str = "splits.csv",
    *,
    task: Task | None = None,
    thresholds: Sequence[float] | None = None,
) -> Report:
    """Predict every split in `evaluate.splits` that has rows and build the report.

    `task` defaults to the classifier's own (`clf.task`); `thresholds` come from the model
    metadata (`meta["thresholds"]`), None meaning 0.5 for binary / multi-label heads.
    """
    task = task or getattr(clf, "task", "multiclass")
    thresholds = check_thresholds(task, thresholds, len(data.classes), where)
    results, images, paths = {}, {}, {}
    for split in cfg.splits:
        images[split], labels = data.part(split)
        if len(labels):
            check_labels(task, np.asarray(labels), len(data.classes), where)
            results[split] = evaluate_split(
                clf,
                split,
                images[split],
                labels,
                data.classes,
                top_k=cfg.top_k,
                batch_size=cfg.batch_size,
                task=task,
                thresholds=thresholds,
            )
            paths[split] = data.frame.loc[data.frame["split"] == split, "path"].tolist()
    if not results:
        raise ImgclsError(
            f"{where}: no rows in the splits {cfg.splits} (evaluate.splits); "
            "check the split fractions in params.yaml"
        )
    return build_report(results, data.classes, images, paths, cfg.gallery_size)
