"""Predict image files with a trained model: files, folders, globs -> top-k table / CSV / JSON.

Every file is decoded by :func:`imgcls.data.dataset.load_image` with the image size and channel
count stored in the model, and normalised inside the model with the training mean / std, so a
prediction here is exactly what the evaluate stage computes for the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from imgcls.data.dataset import DECODE_ERRORS, load_image
from imgcls.data.imageinfo import DEFAULT_MAX_PIXELS
from imgcls.errors import ImgclsError
from imgcls.inference.decode import decode_error
from imgcls.inference.inputs import InputFile, expand_inputs
from imgcls.inference.logged import load_logged_model
from imgcls.models.bundle import limits_of, load_bundle
from imgcls.task import Task, decide, decided_labels, task_of

# `--model` values read as MLflow model URIs (`models:/<name>@<alias>`, `models:/<name>/<n>`)
MODEL_URI_SCHEMES = ("models:/", "runs:/")
PROGRESS_MIN_FILES = 64  # smaller jobs finish before a bar is worth drawing


class PredictError(ImgclsError):
    """Bad predict arguments: no model, no inputs, unusable device or options."""


# ---------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A model that maps uint8 (B, S, S, C) images to (B, K) probabilities, with its metadata."""

    model: nn.Module
    meta: dict[str, Any]
    device: torch.device
    source: str

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return [str(c) for c in self.meta["classes"]]

    @property
    def task(self) -> Task:
        """multiclass, binary or multilabel (imgcls.task)."""
        return task_of(self.meta)

    @property
    def thresholds(self) -> list[float] | None:
        """Decision thresholds tuned on val (binary / multilabel; None for arg-max)."""
        return self.meta.get("thresholds")

    @property
    def image_size(self) -> int:
        """Side of the square images the model takes."""
        return int(self.meta["image_size"])

    @property
    def channels(self) -> int:
        """1 (grayscale) or 3 (RGB)."""
        return int(self.meta["channels"])

    @property
    def max_pixels(self) -> int:
        """The largest image (width x height, from its header) this model decodes."""
        return limits_of(self.meta)["max_image_pixels"]

    @torch.no_grad()
    def probs(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S, C) uint8 -> (B, K) float32 probabilities."""
        images = np.require(images, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # torch needs both
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        return self.model(x).float().cpu().numpy()


def resolve_device(pref: str) -> torch.device:
    """`auto` -> CUDA, then MPS, then CPU; an explicit device that is not there is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise PredictError(
            f"--device {pref!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {pref!r} but no CUDA GPU is visible; use auto or cpu")
    if device.type == "mps" and not has_mps:
        raise PredictError(f"--device {pref!r} but MPS is not available; use auto or cpu")
    return device


def load_predictor(
    model: Path | str | None = None, model_uri: str | None = None, device: str = "auto"
) -> Predictor:
    """Load `models/model.pt` (or an MLflow `runs:/` / `models:/` URI) onto a device.

    `model` may itself be such a URI (`--model models:/imgcls@champion`): a file name never
    starts with `models:/` or `runs:/`, so there is nothing to confuse.
    """
    if (model is None) == (model_uri is None):
        raise PredictError("give exactly one of --model PATH and --model-uri URI")
    if model is not None and str(model).startswith(MODEL_URI_SCHEMES):
        model, model_uri = None, str(model)
    dev = resolve_device(device)
    if model_uri is not None:
        net, meta = load_logged_model(model_uri)
        source = model_uri
    else:
        net, meta = load_bundle(model)
        source = str(model)
    try:
        net = net.to(dev)
    except Exception as err:  # an exported (torch.export) program may be pinned to its device
        raise PredictError(
            f"{source}: cannot move the model to {dev} ({type(err).__name__}: {err}); "
            "use --device cpu"
        ) from None
    return Predictor(net, meta, dev, source)


# ---------------------------------------------------------------------- inputs


def read_image(
    path: str, size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file like training; raises ValueError with a short reason."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        return load_image(p, size, channels, max_pixels)
    except DECODE_ERRORS as err:
        raise ValueError(decode_error(err)) from None
    except Exception as err:  # any other decoder failure is this file's, not the whole run's
        raise ValueError(decode_error(err)) from None


# ---------------------------------------------------------------------- predicting


@dataclass
class Prediction:
    """The decided label and top-k (class, probability) of one input, or why it failed.

    `label` is the model's decision: the top-1 class, the class on its side of a binary
    model's tuned threshold, or a multi-label model's label set ("a|b", "" for none).
    """

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    decision: str | None = None
    decision_probability: float | None = None  # None for multi-label sets
    label_probabilities: list[float] = field(default_factory=list)  # multi-label: per label

    @property
    def label(self) -> str | None:
        """The decided label (None for an error row)."""
        if self.decision is not None:
            return self.decision
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> float | None:
        """The probability of `label` (None for errors and multi-label sets)."""
        if self.decision is not None:
            return self.decision_probability
        return self.top[0][1] if self.top else None


def _decode_batch(
    pool: ThreadPoolExecutor, batch: list[InputFile], predictor: Predictor
) -> list[Future[np.ndarray] | str]:
    """Start decoding a batch; an input that already failed keeps its reason."""
    shape = (predictor.image_size, predictor.channels, predictor.max_pixels)
    return [
        item.error if item.error else pool.submit(read_image, item.path, *shape) for item in batch
    ]


def iter_predictions(
    predictor: Predictor,
    inputs: Sequence[InputFile],
    *,
    batch_size: int = 64,
    top_k: int = 3,
    workers: int = 0,
    progress: bool = True,
) -> Iterator[Prediction]:
    """Predict inputs batch by batch, decoding the next batch while the model runs."""
    if batch_size < 1 or top_k < 1:
        raise PredictError("--batch-size and --top-k must be at least 1")
    k = min(top_k, len(predictor.classes))
    batches = [list(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    bar = tqdm(
        total=len(inputs),
        desc="predict",
        unit="img",
        disable=None if progress and len(inputs) >= PROGRESS_MIN_FILES else True,
    )
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        pending = _decode_batch(pool, batches[0], predictor) if batches else []
        for i, batch in enumerate(batches):
            current = pending
            if i + 1 < len(batches):  # overlap decoding of the next batch with this one
                pending = _decode_batch(pool, batches[i + 1], predictor)
            rows, images = [], []
            for item, job in zip(batch, current, strict=True):
                if isinstance(job, str):
                    rows.append(Prediction(item.path, error=job))
                    continue
                try:
                    images.append(job.result())
                    rows.append(Prediction(item.path))
                except ValueError as err:
                    rows.append(Prediction(item.path, error=str(err)))
            if images:
                probs = predictor.probs(np.stack(images))  # (b, K)
                order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                decided = decided_labels(
                    predictor.task, probs, predictor.classes, predictor.thresholds
                )
                chosen = decide(predictor.task, probs, predictor.thresholds)  # multi-label: (b, K)
                ok = iter(range(len(images)))
                for row in rows:
                    if row.error is None:
                        j = next(ok)
                        row.top = [(predictor.classes[c], float(probs[j, c])) for c in order[j]]
                        row.decision, row.decision_probability = decided[j]
                        if predictor.task == "multilabel":  # in the label set's (class) order
                            on = np.flatnonzero(chosen[j])
                            row.label_probabilities = [float(probs[j, c]) for c in on]
            bar.update(len(batch))
            yield from rows
    bar.close()


def predict_paths(
    predictor: Predictor, specs: Sequence[str | Path], **kwargs: Any
) -> list[Prediction]:
    """Expand files / folders / globs and predict them all (see :func:`iter_predictions`)."""
    inputs = expand_inputs(specs)
    if not inputs:
        raise PredictError("no inputs: give image files, folders or glob patterns")
    return list(iter_predictions(predictor, inputs, **kwargs))


# ---------------------------------------------------------------------- output


def to_frame(preds: Sequence[Prediction], top_k: int) -> pd.DataFrame:
    """CSV shape: path, label, probability, label_2, probability_2, ..., error."""
    names = [("label", "probability")] + [
        (f"label_{i}", f"probability_{i}") for i in range(2, top_k + 1)
    ]
    rows = []
    for p in preds:
        row: dict[str, Any] = {"path": p.path}
        for i, (lab, prob) in enumerate(names):
            has = i < len(p.top)
            row[lab] = p.top[i][0] if has else ""
            row[prob] = round(p.top[i][1], 6) if has else None
        if not p.error:  # the decision (threshold / label set) may differ from the top-1 class
            row["label"] = p.label
            row["probability"] = None if p.probability is None else round(p.probability, 6)
        row["error"] = p.error or ""
        rows.append(row)
    columns = ["path", *[c for pair in names for c in pair], "error"]
    return pd.DataFrame(rows, columns=columns)


def to_records(preds: Sequence[Prediction]) -> list[dict[str, Any]]:
    """JSON shape: one object per input with its top-k list and error (null when fine)."""
    return [
        {
            "path": p.path,
            "label": p.label,
            "probability": None if p.probability is None else round(p.probability, 6),
            "top_k": [{"label": lab, "probability": round(v, 6)} for lab, v in p.top],
            "error": p.error,
        }
        for p in preds
    ]


def format_table(preds: Sequence[Prediction]) -> str:
    """A readable fixed-width table: path, label, probability, the other top-k classes."""
    header = ["path", "label", "prob", "next"]
    lines = []
    for p in preds:
        if p.error:
            lines.append([p.path, "ERROR", "", p.error])
        else:
            rest = ", ".join(f"{lab} {v:.3f}" for lab, v in p.top[1:])
            prob = "" if p.probability is None else f"{p.probability:.3f}"
            if p.label_probabilities:  # a label set: each label's own probability, same order
                prob = "|".join(f"{v:.3f}" for v in p.label_probabilities)
            lines.append([p.path, p.label or "(none)", prob, rest])
    if not any(row[3] for row in lines):
        header, lines = header[:3], [row[:3] for row in lines]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *lines]
    ]
    return "\n".join(text) + "\n"
