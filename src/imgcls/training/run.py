"""splits.csv decoded into arrays: `SplitData` and its loaders (moving to imgcls.data.dataset).

Kept here until the data half of issue 16 lands; training's own code is in
:mod:`imgcls.training.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imgcls.data.dataset import cache_key, decode_images, infer_channels
from imgcls.errors import ImgclsError
from imgcls.io import read_csv
from imgcls.task import Task, encode_labels, label_classes, unknown_labels


@dataclass
class SplitData:
    """Decoded images of every row in splits.csv, with encoded labels and split names."""

    frame: pd.DataFrame
    images: np.ndarray  # (N, S, S, C) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64 indices into `classes`; (N, K) float32 multi-hot if multilabel
    classes: list[str]  # binary: [negative, positive]
    channels: int
    key: str  # cache key: rows + size + channels
    task: Task = "multiclass"

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of one split."""
        mask = (self.frame["split"] == split).to_numpy()
        return self.images[mask], self.labels[mask]


def read_splits(splits_csv: Path) -> pd.DataFrame:
    """splits.csv with string labels; an empty file is an error that says where to look."""
    frame = read_csv(splits_csv)
    if frame.empty:
        raise ImgclsError(f"{splits_csv}: no rows; check the data source and the validate report")
    frame["label"] = frame["label"].astype(str)
    return frame


def load_split_data(
    splits_csv: Path,
    root: Path,
    image_size: int,
    channels: str | int,
    cache_dir: Path,
    *,
    classes: list[str] | None = None,
    task: Task = "multiclass",
    progress: bool = True,
    max_pixels: int | None = None,
) -> SplitData:
    """Read splits.csv and decode its images once (cached across epochs and stages).

    `classes` fixes the label order (a saved model's); by default the sorted labels found.
    `max_pixels` bounds every decoded image (a model's `limits.max_image_pixels` when
    evaluating it); None: see :func:`imgcls.data.dataset.pixel_limits`.
    """
    frame = read_splits(splits_csv)
    return _split_data(
        frame,
        splits_csv,
        root,
        image_size,
        channels,
        cache_dir,
        classes,
        task,
        progress,
        max_pixels,
    )


def _split_data(
    frame: pd.DataFrame,
    splits_csv: Path,
    root: Path,
    image_size: int,
    channels: str | int,
    cache_dir: Path,
    classes: list[str] | None,
    task: Task,
    progress: bool,
    max_pixels: int | None = None,
) -> SplitData:
    """Decode the rows of splits.csv and encode their labels for `task`."""
    classes = classes or label_classes(frame["label"], task)
    unknown = unknown_labels(frame["label"], classes, task)
    if unknown:
        raise ImgclsError(
            f"{splits_csv}: labels {unknown} are not classes the model knows ({classes})"
        )
    n_channels = infer_channels(frame["mode"]) if channels == "auto" else int(channels)
    images = decode_images(
        frame, root, image_size, n_channels, cache_dir, progress=progress, max_pixels=max_pixels
    )
    labels = encode_labels(frame["label"].tolist(), classes, task)
    return SplitData(
        frame,
        images,
        labels,
        list(classes),
        n_channels,
        cache_key(frame, image_size, n_channels),
        task,
    )
