"""Imbalanced classes: loss weights per class and the balanced (weighted) epoch sampler.

Both are computed from the train split's labels only, so that the validation and test splits
stay an honest picture of the data the model will meet.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imgcls.errors import ImgclsError


class ImbalanceError(ImgclsError):
    """`train.class_weights` / `train.sampler` cannot be applied to this data."""


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class index, (K,) int64 (classes without images count 0)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def _empty_classes(counts: np.ndarray, classes: list[str]) -> list[str]:
    """Names of the classes that have no train image."""
    return [classes[i] for i in np.flatnonzero(counts == 0)]


def balanced_class_weights(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """scikit-learn's "balanced" weights n / (k * count_c): every class adds the same total."""
    counts = class_counts(labels, len(classes))
    missing = _empty_classes(counts, classes)
    if missing:
        raise ImbalanceError(
            f"train.class_weights: balanced needs train images of every class, but {missing} "
            "have none in the train split; fix the split (split.train) or give explicit weights"
        )
    return counts.sum() / (len(classes) * counts.astype(np.float64))


def loss_class_weights(
    spec: str | dict[str, float], labels: np.ndarray, classes: list[str]
) -> np.ndarray | None:
    """Per-class loss weights for `train.class_weights` (None for `none`: plain mean loss)."""
    if spec == "none":
        return None
    if spec == "balanced":
        return balanced_class_weights(labels, classes)
    assert isinstance(spec, dict)  # the config schema allows nothing else
    unknown = sorted(set(spec) - set(classes))
    if unknown:
        raise ImbalanceError(
            f"train.class_weights names classes {unknown} that are not in the data; "
            f"the classes are {classes} (names are case-sensitive)"
        )
    return np.array([float(spec.get(name, 1.0)) for name in classes])


def sample_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image draw probability that makes every present class equally likely, (N,) float64."""
    counts = class_counts(labels, num_classes)
    weights = 1.0 / counts[np.asarray(labels, dtype=np.int64)]
    return weights / weights.sum()


def balanced_order(probs: np.ndarray, seed: int) -> torch.Tensor:
    """One epoch of `len(probs)` indices drawn with replacement, seeded (the same on every rank).

    NumPy's generator, unlike torch.multinomial, has no 2**24 category limit.
    """
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(len(probs), size=len(probs), replace=True, p=probs))


def describe_weights(weights: np.ndarray | None, classes: list[str]) -> dict[str, float]:
    """{class: weight} for logs and run records (all 1.0 when unweighted)."""
    if weights is None:
        return {name: 1.0 for name in classes}
    return {name: round(float(w), 6) for name, w in zip(classes, weights, strict=True)}


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with each image's loss scaled by its class's weight, averaged over images.

    `nn.CrossEntropyLoss(weight=...)` divides by the batch's weight sum instead; then the mean
    of the per-rank losses under DDP is not the one-process loss. Dividing by the image count
    keeps DDP exact (Keras' `class_weight` does the same), and balanced weights average 1 over
    the train split, so the loss keeps its usual scale.
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())  # (K,)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, K) logits, (B,) class indices -> scalar loss."""
        loss = nn.functional.cross_entropy(
            logits, target, reduction="none", label_smoothing=self.label_smoothing
        )  # (B,)
        return (loss * self.weight[target]).mean()


def label_pos_weights(
    spec: str | dict[str, float], targets: np.ndarray, classes: list[str]
) -> np.ndarray | None:
    """Multi-label loss weights: each label's positive-example weight in its BCE term (K,).

    `balanced` gives negatives / positives per label on the train split (PyTorch's `pos_weight`
    recipe: a rare label's few positives count as much as its many negatives); a mapping sets a
    label's positive weight directly (unnamed labels 1).
    """
    if spec == "none":
        return None
    if spec == "balanced":
        pos = np.asarray(targets, dtype=np.float64).sum(0)
        missing = [classes[i] for i in np.flatnonzero(pos == 0)]
        if missing:
            raise ImbalanceError(
                f"train.class_weights: balanced needs train images of every label, but "
                f"{missing} have none in the train split; fix the split or give explicit weights"
            )
        return (len(targets) - pos) / pos
    return loss_class_weights(spec, np.zeros(0, np.int64), classes)


class SigmoidBCE(nn.Module):
    """Binary cross-entropy on logits for a binary head (B, 1) or multi-label head (B, K).

    Binary: `weight` (2,) scales each image's loss by its class's weight, averaged over images
    (like :class:`WeightedCrossEntropy`). Multi-label: `pos_weight` (K,) weighs each label's
    positive term. Label smoothing moves the 0 / 1 targets towards 0.5.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        pos_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.float())
        self.register_buffer("pos_weight", None if pos_weight is None else pos_weight.float())
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Binary: (B, 1) logits and (B,) 0/1 labels; multi-label: (B, K) and (B, K) -> loss."""
        binary = target.ndim == 1
        x = logits[:, 0] if binary else logits
        y = target.float()
        soft = y * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        loss = nn.functional.binary_cross_entropy_with_logits(
            x.float(), soft, pos_weight=self.pos_weight, reduction="none"
        )
        if binary and self.weight is not None:
            loss = loss * self.weight[target.long()]
        return loss.mean()
