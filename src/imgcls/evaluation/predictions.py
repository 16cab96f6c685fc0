"""The per-image predictions table of a split: what `imgcls compare` diffs (fixed / broken)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgcls.task import row_names


def predictions_table(
    y_true: np.ndarray,
    probs: np.ndarray,
    y_pred: np.ndarray,
    classes: list[str],
    paths: list[str],
) -> pd.DataFrame:
    """One row per image of a split: path, label, predicted, confidence, correct.

    Single-label: `confidence` is the probability of the predicted class. Multi-label: label
    sets ("a|b", "(none)") and the confidence of the least sure label decision.
    """
    if np.ndim(y_pred) == 2:  # multi-label decisions
        sure = np.where(np.asarray(y_pred) > 0.5, probs, 1.0 - probs)
        confidence = sure.min(1, initial=1.0)
    else:
        confidence = probs[np.arange(len(y_pred)), y_pred]
    label, predicted = row_names(y_true, classes), row_names(y_pred, classes)
    return pd.DataFrame(
        {
            "path": paths,
            "label": label,
            "predicted": predicted,
            "confidence": np.round(confidence.astype(float), 6),
            "correct": [a == b for a, b in zip(label, predicted, strict=True)],
        }
    )
