"""Predict a split with a saved model and compute its report (no file writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgcls.evaluation.metrics import classification_metrics, confusion
from imgcls.models.bundle import ImageClassifier


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
