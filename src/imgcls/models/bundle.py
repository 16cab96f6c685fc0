"""The model file (`models/model.pt`): weights plus how to preprocess like training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.models.registry import ModelError, create_model
from imgcls.task import Task, output_units, probs_from_logits, task_of
from imgcls.training import checkpoint
from imgcls.training.loop import Preprocess


class ImageClassifier(nn.Module):
    """uint8 images (B, H, W, C) -> class probabilities (B, K); preprocessing built in.

    Probabilities per task (imgcls.task): softmax, `[1 - p, p]` for a binary head, or one
    independent sigmoid per label for multi-label.
    """

    def __init__(
        self, net: nn.Module, mean: list[float], std: list[float], task: Task = "multiclass"
    ) -> None:
        super().__init__()
        self.net = net
        self.prep = Preprocess(mean, std)
        self.task: Task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, K) float32 probabilities."""
        x = images.permute(0, 3, 1, 2)  # (B, C, H, W)
        return probs_from_logits(self.task, self.net(self.prep(x)))


def save_bundle(path: Path | str, net: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights + metadata atomically (loadable with weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    checkpoint.save(path, {"format": "imgcls-model/1", "state_dict": state, "meta": meta})


def load_bundle(path: Path | str) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the classifier from a model file written by :func:`save_bundle`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (run `dvc repro train` first)")
    payload = checkpoint.load(path)
    if payload.get("format") != "imgcls-model/1":
        raise ModelError(f"{path}: not an imgcls model file")
    meta = payload["meta"]
    task = task_of(meta)
    net = create_model(
        meta["arch"],
        in_chans=meta["channels"],
        num_classes=output_units(task, len(meta["classes"])),
        image_size=meta["image_size"],
        **meta.get("model_kwargs", {}),
    )
    net.load_state_dict(payload["state_dict"])
    clf = ImageClassifier(net, meta["mean"], meta["std"], task).eval()
    return clf, meta
