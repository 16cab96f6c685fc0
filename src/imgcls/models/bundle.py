"""The model file (`models/model.pt`): weights plus how to preprocess like training.

The file is a dict of tensors and plain data, loaded with `torch.load(weights_only=True)`: a
model file from anywhere (a registry, a colleague) can hold no code that runs when it loads.
:func:`save_weights` / :func:`load_weights` are the atomic, weights-only file I/O that training
checkpoints use too.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls.data.imageinfo import DEFAULT_MAX_PIXELS
from imgcls.io import atomic_path
from imgcls.models.registry import ModelError, create_model
from imgcls.task import Task, output_units, probs_from_logits, task_of


def save_weights(path: Path | str, payload: dict[str, Any]) -> None:
    """Serialise in memory, check the free space, write a temp file, then rename over `path`.

    Serialising first tells how many bytes are needed before a byte is written, and a full disk
    then fails in plain file I/O (one DiskFullError) rather than inside torch's C++ writer.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    with atomic_path(path, needed=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # delayed allocation may report ENOSPC only here


def load_weights(path: Path | str) -> dict[str, Any]:
    """Load a model or checkpoint file safely (weights-only: no pickled code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Preprocess(nn.Module):
    """uint8 (B, C, H, W) -> float normalised with the training set's per-channel mean / std."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer(
            "shift", torch.tensor(mean).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, C, H, W) float32."""
        return x.float() * self.scale - self.shift


class ImageClassifier(nn.Module):
    """uint8 images (B, H, W, C) -> class probabilities (B, K); preprocessing built in.

    Probabilities per task (imgcls.task): softmax, `[1 - p, p]` for a binary head, or one
    independent sigmoid per label for multi-label. With `tta="hflip"` the logits are the mean
    of the image's and its mirror image's; `"hflip_shift"` adds both, shifted one pixel
    diagonally either way (`model.tta`).
    """

    tta = "none"  # the class default: instances pickled into MLflow before `tta` existed lack it

    def __init__(
        self,
        net: nn.Module,
        mean: list[float],
        std: list[float],
        task: Task = "multiclass",
        tta: str = "none",
    ) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ModelError(f"test-time augmentation {tta!r} unknown; one of {TTA_MODES}")
        self.net = net
        self.prep = Preprocess(mean, std)
        self.task: Task = task
        self.tta = tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, K) float32 probabilities."""
        x = self.prep(images.permute(0, 3, 1, 2))  # (B, C, H, W)
        return probs_from_logits(self.task, tta_logits(self.net, x, self.tta))


TTA_MODES = ("none", "hflip", "hflip_shift")  # model.tta's values (imgcls.config.ModelConfig)


def _mirror_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean logits of a batch and its mirror image."""
    return (net(x) + net(x.flip(-1))) / 2


def _shifted(x: torch.Tensor, by: int) -> torch.Tensor:
    """(B, C, H, W) moved `by` pixels down and right (negative: up and left), edges repeated."""
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    return pad[..., 1 - by : 1 - by + h, 1 - by : 1 - by + w]


def tta_logits(net: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """The net's logits for a preprocessed (B, C, H, W) batch, averaged over the `tta` views."""
    if tta == "hflip":
        return _mirror_logits(net, x)
    if tta == "hflip_shift":
        # airbench's weighting: the unshifted pair counts as much as both shifted pairs together
        shifted = (_mirror_logits(net, _shifted(x, 1)) + _mirror_logits(net, _shifted(x, -1))) / 2
        return (_mirror_logits(net, x) + shifted) / 2
    return net(x)


class WithTTA(nn.Module):
    """A net that answers with test-time augmentation (for code that calls nets on batches)."""

    def __init__(self, net: nn.Module, tta: str) -> None:
        super().__init__()
        self.net, self.tta = net, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, C, H, W) -> (B, K) logits, averaged over the views."""
        return tta_logits(self.net, x, self.tta)


# What one request / one image may cost the model's users (`imgcls predict`, the serving
# model). Stored in the model's metadata under "limits"; a model file without them (written
# before they existed) gets these.
DEFAULT_LIMITS: dict[str, int] = {
    "max_image_pixels": DEFAULT_MAX_PIXELS,  # width x height, checked from the header
    "max_image_bytes": 32 << 20,  # one encoded image file (after base64 decoding)
    "max_request_bytes": 128 << 20,  # all images of one serving request together
    "max_request_items": 1024,  # images in one serving request
}
# Constructor arguments that would make loading a model file read other files or download.
_LOADING_KWARGS = frozenset(
    {"pretrained", "pretrained_path", "pretrained_cfg", "pretrained_cfg_overlay"}
    | {"checkpoint_path", "cache_dir"}
)


def limits_of(meta: Mapping[str, Any]) -> dict[str, int]:
    """The model's limits (`DEFAULT_LIMITS` for any key the metadata lacks)."""
    given = meta.get("limits") or {}
    out = dict(DEFAULT_LIMITS)
    for key, value in dict(given).items():
        if key in out:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"model metadata limits.{key} = {value!r}: not a positive int")
            out[key] = value
    return out


def save_bundle(path: Path | str, net: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights + metadata atomically (loadable with weights_only=True).

    `meta["limits"]` (see `DEFAULT_LIMITS`) is completed with the defaults for missing keys.
    """
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    meta = {**meta, "limits": limits_of(meta)}
    save_weights(path, {"format": "imgcls-model/1", "state_dict": state, "meta": meta})


def _read_payload(path: Path) -> dict[str, Any]:
    """The file's dict, unpickled weights-only: anything else is refused, never run."""
    try:
        payload = load_weights(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise ModelError(
            f"{path}: not an imgcls model file: it does not load weights-only "
            f"({type(err).__name__}: {first}). It was refused, and nothing in it was run; use "
            "a models/model.pt written by `dvc repro train`"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != "imgcls-model/1":
        raise ModelError(f"{path}: not an imgcls model file")
    return payload


def load_bundle(path: Path | str) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the classifier from a model file written by :func:`save_bundle`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (run `dvc repro train` first)")
    payload = _read_payload(path)
    meta = dict(payload["meta"])
    meta["limits"] = limits_of(meta)  # older files have none
    loading = sorted(_LOADING_KWARGS & set(meta.get("model_kwargs", {})))
    if loading:
        raise ModelError(
            f"{path}: model_kwargs {loading} would load weights from elsewhere; a model file "
            "carries its own weights. Remove them from model.kwargs and retrain"
        )
    task = task_of(meta)
    net = create_model(
        meta["arch"],
        in_chans=meta["channels"],
        num_classes=output_units(task, len(meta["classes"])),
        image_size=meta["image_size"],
        **meta.get("model_kwargs", {}),
    )
    net.load_state_dict(payload["state_dict"])
    tta = meta.get("tta", "none")  # files written before model.tta have none
    if tta not in TTA_MODES:
        raise ModelError(f"{path}: metadata tta {tta!r} unknown; one of {TTA_MODES}")
    clf = ImageClassifier(net, meta["mean"], meta["std"], task, tta).eval()
    return clf, meta
