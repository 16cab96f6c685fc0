"""What a model predicts: one class (softmax), yes / no (binary) or a set of labels (multi-label).

Every stage that turns labels into targets, logits into probabilities or probabilities into
decisions goes through this module, so the three tasks stay consistent from training to serving.

- `multiclass`: K outputs, softmax, cross-entropy; the decision is the arg-max.
- `binary`: exactly two classes `[negative, positive]`, one logit, binary cross-entropy; the
  model's probabilities are `[1 - p, p]` (so everything written for K-class probabilities keeps
  working) and the decision is `p >= threshold`, the threshold tuned on the val split.
- `multilabel`: K independent labels, K sigmoid outputs, binary cross-entropy per label; the
  decision is `p_k >= threshold_k` per label, each threshold tuned on the val split.

Multi-label rows store their labels sorted and joined by `LABEL_SEP` ("cat|dog").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imgcls.errors import ImgclsError

if TYPE_CHECKING:  # the data stages use this module too; they must not pay torch's import
    import torch

Task = Literal["multiclass", "binary", "multilabel"]
TASKS: tuple[Task, ...] = ("multiclass", "binary", "multilabel")
LABEL_SEP = "|"
DEFAULT_THRESHOLD = 0.5
# Beta of the F-score each `train.threshold_metric` maximises (None: balanced accuracy).
_BETA = {"f1": 1.0, "f0.5": 0.5, "f2": 2.0, "balanced_accuracy": None}


def safe_name(label: str) -> str:
    """A class name usable inside a flat metric key (the one rule, train and evaluate alike)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in str(label))


class TaskError(ImgclsError):
    """The configured head does not fit the data (e.g. `binary` with three classes)."""


def split_labels(label: str) -> list[str]:
    """ "cat|dog" -> ["cat", "dog"] (a single-label row gives one label)."""
    return [part for part in str(label).split(LABEL_SEP) if part]


def join_labels(labels: Iterable[str]) -> str:
    """The canonical multi-label cell: unique labels, sorted, joined by `LABEL_SEP`."""
    return LABEL_SEP.join(sorted({str(x) for x in labels if str(x)}))


def label_sets(multi_hot: np.ndarray, classes: Sequence[str]) -> list[str]:
    """(N, K) multi-hot or bool rows -> canonical "a|b" cells ("" for an empty set)."""
    rows = np.asarray(multi_hot) > 0.5
    return [join_labels(c for c, on in zip(classes, row, strict=True) if on) for row in rows]


def label_classes(labels: Iterable[str], task: Task) -> list[str]:
    """Sorted class names found in a label column (individual labels for multi-label)."""
    if task == "multilabel":
        return sorted({part for label in labels for part in split_labels(label)})
    return sorted({str(label) for label in labels})


def resolve_task(head: str, multi_label: bool, classes: Sequence[str]) -> Task:
    """`model.head` + `data.multi_label` + the classes -> the task (clear errors on misfits)."""
    if head == "auto":
        return "multilabel" if multi_label else "multiclass"
    if head == "multilabel":
        return "multilabel"  # also fine for single-label data: one-vs-rest sigmoids
    if multi_label:
        raise TaskError(
            f"model.head is {head!r} but data.multi_label is true (images may have several "
            "labels); use model.head: multilabel (or auto)"
        )
    if head == "binary":
        if len(classes) != 2:
            raise TaskError(
                f"model.head: binary needs exactly 2 classes, the data has {len(classes)} "
                f"({list(classes)[:10]}); use model.head: softmax (or auto) for more"
            )
        return "binary"
    return "multiclass"


def order_classes(classes: Sequence[str], task: Task, positive: str | None) -> list[str]:
    """Binary: `[negative, positive]` (positive defaults to the second name in sorted order)."""
    classes = sorted(classes)
    if task != "binary" or positive is None:
        return classes
    if positive not in classes:
        raise TaskError(
            f"model.positive_class {positive!r} is not one of the classes {classes} "
            "(names are case-sensitive)"
        )
    return [c for c in classes if c != positive] + [positive]


def output_units(task: Task, num_classes: int) -> int:
    """How many logits the network ends in (one for binary)."""
    return 1 if task == "binary" else num_classes


def encode_labels(labels: Sequence[str], classes: Sequence[str], task: Task) -> np.ndarray:
    """Label strings -> (N,) int64 class indices, or (N, K) float32 multi-hot for multi-label."""
    index = {c: i for i, c in enumerate(classes)}
    if task != "multilabel":
        return np.fromiter((index[str(x)] for x in labels), dtype=np.int64, count=len(labels))
    out = np.zeros((len(labels), len(classes)), np.float32)
    for row, label in enumerate(labels):
        for part in split_labels(label):
            out[row, index[part]] = 1.0
    return out


def unknown_labels(labels: Iterable[str], classes: Sequence[str], task: Task) -> list[str]:
    """Labels in the data that are not among `classes` (sorted)."""
    return sorted(set(label_classes(labels, task)) - set(classes))


def probs_from_logits(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """(B, units) logits -> (B, K) probabilities: softmax, [1 - p, p], or per-label sigmoid."""
    import torch

    logits = logits.float()
    if task == "multiclass":
        return torch.softmax(logits, dim=1)
    p = torch.sigmoid(logits)
    if task == "binary":
        return torch.cat([1.0 - p[:, :1], p[:, :1]], dim=1)
    return p


def probs_numpy(task: Task, logits: np.ndarray) -> np.ndarray:
    """:func:`probs_from_logits` for numpy arrays."""
    import torch

    return probs_from_logits(task, torch.from_numpy(np.asarray(logits))).numpy()


def decide(task: Task, probs: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
    """Probabilities -> decisions: (N,) class indices, or (N, K) bool for multi-label."""
    probs = np.asarray(probs)
    if task == "multiclass":
        return probs.argmax(1)
    if task == "binary":
        t = thresholds[0] if thresholds else DEFAULT_THRESHOLD
        return (probs[:, 1] >= t).astype(np.int64)
    t = np.asarray(thresholds if thresholds else [DEFAULT_THRESHOLD] * probs.shape[1])
    return probs >= t.reshape(1, -1)


def tune_threshold(y_true: np.ndarray, scores: np.ndarray, metric: str = "f1") -> float:
    """The threshold on `scores` that maximises `metric` for 0/1 `y_true` (0.5 if undefined).

    Candidates are the observed scores (every distinct operating point); ties go to the highest
    threshold, i.e. the fewest positive predictions with the same score.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(y_true) == 0 or y_true.all() or not y_true.any():
        return DEFAULT_THRESHOLD  # one class only: no trade-off to tune
    beta = _BETA[metric]
    if beta is None:
        fpr, tpr, thr = roc_curve(y_true, scores)
        value = (tpr + 1.0 - fpr) / 2.0
        ok = np.isfinite(thr)  # roc_curve's first threshold is +inf (predict nothing)
        value, thr = value[ok], thr[ok]
    else:
        precision, recall, thr = precision_recall_curve(y_true, scores)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        b2 = beta * beta
        denom = b2 * precision + recall
        value = np.where(denom > 0, (1 + b2) * precision * recall / np.maximum(denom, 1e-12), 0)
    best = np.flatnonzero(value >= value.max() - 1e-12)
    return float(thr[best].max())


def tune_thresholds(
    task: Task, y_true: np.ndarray, probs: np.ndarray, metric: str = "f1"
) -> list[float] | None:
    """Decision thresholds tuned on validation data (None for multiclass: arg-max needs none)."""
    if task == "multiclass":
        return None
    if task == "binary":
        return [tune_threshold(np.asarray(y_true) == 1, probs[:, 1], metric)]
    y = np.asarray(y_true)
    return [tune_threshold(y[:, k] > 0.5, probs[:, k], metric) for k in range(y.shape[1])]


def task_of(meta: dict[str, Any]) -> Task:
    """The task a saved model was trained for (models from before heads existed: multiclass)."""
    task = meta.get("task", "multiclass")
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r} in the model metadata (expected one of {TASKS})")
    return task


def decided_labels(
    task: Task, probs: np.ndarray, classes: Sequence[str], thresholds: Sequence[float] | None
) -> list[tuple[str, float | None]]:
    """Per image: the decided label and its probability, as predict / serving report them.

    Multi-label: the joined set of labels at or above their thresholds ("" for none) and no
    single probability (each label has its own, independent one).
    """
    decisions = decide(task, probs, thresholds)
    if task == "multilabel":
        return [(labels, None) for labels in label_sets(decisions, classes)]
    return [(str(classes[k]), float(p[k])) for k, p in zip(decisions, probs, strict=True)]


def row_names(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Each row's class name, or its label set ("a|b", "(none)") for (N, K) multi-hot labels."""
    if np.ndim(labels) == 2:
        return [name or "(none)" for name in label_sets(labels, classes)]
    return [classes[i] for i in labels]
