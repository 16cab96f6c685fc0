"""Predict splits with a saved model and build the evaluation report (no file writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from imgcls.config import EvaluateConfig
from imgcls.errors import ImgclsError
from imgcls.evaluation.figures import plot_confusion, plot_pr_curves
from imgcls.evaluation.gallery import confident_mistakes, mistakes_table, plot_mistakes
from imgcls.evaluation.metrics import classification_metrics, confusion, confusion_long
from imgcls.models.bundle import ImageClassifier
from imgcls.training.run import SplitData


@dataclass
class SplitEvaluation:
    """Predictions and metrics of one split."""

    split: str
    y_true: np.ndarray  # (N,)
    probs: np.ndarray  # (N, K)
    metrics: dict[str, Any]
    confusion: np.ndarray  # (K, K)

    @property
    def y_pred(self) -> np.ndarray:
        """Top-1 predictions."""
        return self.probs.argmax(1)


@torch.no_grad()
def predict_probs(clf: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, S, S, C) uint8 -> (N, K) probabilities, batch by batch on the CPU."""
    out = [
        clf(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate_split(
    clf: ImageClassifier,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    top_k: int = 3,
    batch_size: int = 256,
) -> SplitEvaluation:
    """Metrics and confusion matrix of one split."""
    probs = predict_probs(clf, images, batch_size)
    metrics = classification_metrics(labels, probs, classes, top_k)
    return SplitEvaluation(
        split, labels, probs, metrics, confusion(labels, probs.argmax(1), len(classes))
    )


def flat_metrics(results: dict[str, SplitEvaluation]) -> dict[str, Any]:
    """`metrics/eval.json`: test keys bare (`accuracy`), other splits prefixed (`val_accuracy`)."""
    flat: dict[str, Any] = {}
    for split, res in results.items():
        prefix = "" if split == "test" else f"{split}_"
        flat.update({f"{prefix}{k}": v for k, v in res.metrics.items()})
    return flat


def mlflow_metrics(flat: dict[str, Any]) -> dict[str, float]:
    """The same numbers as run metrics, every key labelled with its split (`test_f1_rock`)."""
    return {
        (k if k.startswith(("val_", "train_")) else f"test_{k}"): float(v) for k, v in flat.items()
    }


@dataclass
class Report:
    """Everything the evaluate stage writes, still in memory."""

    main: SplitEvaluation  # the split the figures describe (test if evaluated)
    metrics: dict[str, Any]  # flat, for metrics/eval.json
    confusion_rows: pd.DataFrame  # (actual, predicted) per sample, for `dvc plots`
    figures: dict[str, Any]  # file name -> matplotlib figure
    tables: dict[str, Any]  # file name -> JSON-able data


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
        prefix = "" if split == name else f"{split}_"
        figures[f"{prefix}confusion_matrix.png"] = plot_confusion(
            res.confusion, classes, f"{split}: counts (rows: true class)"
        )
        figures[f"{prefix}confusion_matrix_normalized.png"] = plot_confusion(
            res.confusion, classes, f"{split}: row-normalised (recall on the diagonal)", True
        )
        tables[f"{prefix}confusion_matrix.json"] = {
            "split": split,
            "classes": classes,
            "rows": "true class",
            "columns": "predicted class",
            "counts": res.confusion.tolist(),
        }
    idx = confident_mistakes(main.y_true, main.probs, gallery_size)
    figures["misclassified.png"] = plot_mistakes(
        images[name], main.y_true, main.probs, classes, idx, f"{name}: most confident mistakes"
    )
    tables["misclassified.json"] = mistakes_table(
        idx, main.y_true, main.probs, classes, paths[name]
    )
    figures["pr_curves.png"] = plot_pr_curves(main.y_true, main.probs, classes)
    return Report(
        main,
        flat_metrics(results),
        confusion_long(main.y_true, main.y_pred, classes),
        figures,
        tables,
    )


def evaluate_data(
    clf: ImageClassifier, data: SplitData, cfg: EvaluateConfig, where: str = "splits.csv"
) -> Report:
    """Predict every split in `evaluate.splits` that has rows and build the report."""
    results, images, paths = {}, {}, {}
    for split in cfg.splits:
        images[split], labels = data.part(split)
        if len(labels):
            results[split] = evaluate_split(
                clf,
                split,
                images[split],
                labels,
                data.classes,
                top_k=cfg.top_k,
                batch_size=cfg.batch_size,
            )
            paths[split] = data.frame.loc[data.frame["split"] == split, "path"].tolist()
    if not results:
        raise ImgclsError(
            f"{where}: no rows in the splits {cfg.splits} (evaluate.splits); "
            "check the split fractions in params.yaml"
        )
    return build_report(results, data.classes, images, paths, cfg.gallery_size)
