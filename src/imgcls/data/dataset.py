"""Decoded-image cache, the torch Dataset over a split, and splits.csv as decoded data.

Every image is decoded, converted and resized once into a uint8 array of shape (N, S, S, C)
stored as `.npy` under the cache folder and memory-mapped afterwards, so epochs never
re-decode files. The cache key covers the rows (path + sha256), the size and the channels.
Rows may name members of tar shards (`<shard>.tar/<member>`): `open_image` reads them in place,
each shard opened and indexed once per worker process (chunks are consecutive rows, so a worker
touches few shards).
:class:`SplitData` (from :func:`load_split_data`) is what training and evaluation read: a split's
rows are data, not training.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from imgcls.data.imageinfo import (
    DEFAULT_MAX_PIXELS,
    HIGH_BIT_MODES,
    TOO_LARGE_ERRORS,
    open_image,
    prime_shards,
    rescale_to_uint8,
)
from imgcls.errors import ImgclsError
from imgcls.io import atomic_path, read_csv
from imgcls.task import Task, encode_labels, label_classes, unknown_labels

GRAYSCALE_MODES = frozenset({"1", "L", "LA"} | HIGH_BIT_MODES)
# Every way Pillow / our decoder says "this file cannot be decoded" (none is a bug of ours).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, *TOO_LARGE_ERRORS)


def infer_channels(modes: pd.Series) -> int:
    """1 if every image is grayscale, else 3."""
    return 1 if set(modes.astype(str)) <= GRAYSCALE_MODES else 3


def _to_uint8(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to L or RGB, scaling high-bit-depth data and flattening alpha."""
    if img.mode in HIGH_BIT_MODES:
        img = rescale_to_uint8(img, subtract_min=False)  # [0, max] -> [0, 255], bounded memory
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)  # transparent pixels become white
    return img.convert("L" if channels == 1 else "RGB")


def load_image(
    path: Path | IO[bytes], size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file to a (size, size, channels) uint8 array.

    Raises what :func:`imgcls.data.imageinfo.open_image` raises (format, pixel limit from the
    header) or one of `DECODE_ERRORS` for a broken file.
    """
    with open_image(path, max_pixels) as img:
        img = ImageOps.exif_transpose(img)
        img = _to_uint8(img, channels)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(size, size, channels)


class DecodeError(ImgclsError):
    """An image listed in splits.csv that can no longer be read."""


def _load_chunk(args: tuple[str, int, list[str], int, int, list[int]]) -> int:
    """Worker: decode a chunk of files straight into rows `start:` of the cache file."""
    target, start, paths, size, channels, limits = args
    block = np.empty((len(paths), size, size, channels), np.uint8)
    for j, p in enumerate(paths):
        try:
            block[j] = load_image(Path(p), size, channels, limits[j])
        except TOO_LARGE_ERRORS as err:
            raise DecodeError(
                f"{p}: {err}; the file is not the one validated (it changed after ingest?). "
                "Re-run `dvc repro` from ingest"
            ) from None
        except (*DECODE_ERRORS, UnidentifiedImageError) as err:  # Pillow's ways of saying "broken"
            raise DecodeError(
                f"{p}: cannot decode ({type(err).__name__}: {err}); the file changed after "
                "validation? re-run `dvc repro` from ingest"
            ) from None
    out = np.load(target, mmap_mode="r+")  # (N, S, S, C): each worker writes its own rows
    out[start : start + len(paths)] = block
    out.flush()
    return len(paths)


def cache_key(df: pd.DataFrame, size: int, channels: int) -> str:
    """Hash of the rows' paths and content digests, the size and the channels."""
    h = hashlib.sha256(f"v1|{size}|{channels}|".encode())
    for path, digest in zip(df["path"], df["sha256"], strict=True):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:20]


def npy_bytes(shape: tuple[int, ...]) -> int:
    """Size of the uint8 `.npy` file of `shape`: header plus pixels."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(np.uint8))
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return len(header.getvalue()) + int(np.prod(shape, dtype=np.int64))


def _reserve(path: Path, nbytes: int) -> None:
    """Allocate the disk blocks of `path`'s first `nbytes` now, so a full disk is ENOSPC here.

    `open_memmap` makes a sparse file: without this, running out of space while the workers
    write through the memory map (another process filling the disk after the free-space
    check) kills them with SIGBUS instead of raising an error.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    with open(path, "r+b") as fh:
        try:
            fallocate(fh.fileno(), 0, nbytes)
        except OSError as err:
            # ENOSPC goes up to `atomic_path`, which names the target; a filesystem that
            # cannot reserve space leaves the free-space check as the only guard.
            if err.errno not in {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}:
                raise


def pixel_limits(df: pd.DataFrame, max_pixels: int | None) -> list[int]:
    """Each row's pixel limit: `max_pixels`, else the default or the size ingest recorded.

    Ingest already checked every image against `data.max_image_pixels` and wrote its width and
    height to the manifest; a file that now claims more pixels than that is not the one checked.
    """
    if max_pixels is not None:
        return [max_pixels] * len(df)
    if not {"width", "height"} <= set(df.columns):
        return [DEFAULT_MAX_PIXELS] * len(df)
    area = pd.to_numeric(df["width"], errors="coerce") * pd.to_numeric(
        df["height"], errors="coerce"
    )
    return [DEFAULT_MAX_PIXELS if pd.isna(a) else max(DEFAULT_MAX_PIXELS, int(a)) for a in area]


def decode_images(
    df: pd.DataFrame,
    root: Path,
    size: int,
    channels: int,
    cache_dir: Path,
    *,
    workers: int = 0,
    progress: bool = True,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Return the (N, S, S, C) uint8 images of `df`'s rows, from the cache when possible.

    `max_pixels` (e.g. `data.max_image_pixels`) bounds every image; None allows each row the
    larger of Pillow's default limit and the size ingest recorded for it (see `pixel_limits`).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"images-{cache_key(df, size, channels)}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    paths = [str(root / p) for p in df["path"]]
    limits = pixel_limits(df, max_pixels)
    workers = workers or os.cpu_count() or 1
    # Small chunks keep every worker busy to the end; each writes into the memory-mapped file,
    # so no decoded pixels travel back through a pipe and memory stays flat for big datasets.
    chunk = max(64, min(1024, len(paths) // (workers * 8) or 1))
    shape = (len(paths), size, size, channels)
    needed = npy_bytes(shape)
    # Free space is checked (and then reserved) before decoding: a full disk gives one
    # DiskFullError naming the file, the bytes needed and free, not a SIGBUS in a worker.
    with atomic_path(target, needed=needed) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
        _reserve(tmp, needed)
        bar = tqdm(
            total=len(paths),
            desc="decode",
            unit="img",
            disable=None if progress else True,
            leave=False,
        )
        jobs = [
            (str(tmp), i, paths[i : i + chunk], size, channels, limits[i : i + chunk])
            for i in range(0, len(paths), chunk)
        ]
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(_load_chunk(job))
        else:
            prime_shards(paths)  # tar shards indexed once here; forked workers inherit it
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                for n in pool.map(_load_chunk, jobs):
                    bar.update(n)
    bar.close()
    return np.load(target, mmap_mode="r")


def channel_stats(images: np.ndarray, max_images: int = 20_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images scaled to [0, 1] (a sample keeps it fast)."""
    step = max(1, len(images) // max_images)
    sample = np.asarray(images[::step], dtype=np.float32) / 255.0  # (n, S, S, C)
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)).clip(min=1e-3)
    return [float(m) for m in mean], [float(s) for s in std]


class ImageArrayDataset(Dataset):
    """Items are (uint8 tensor (C, S, S), int label); augmentation runs on HWC uint8 arrays.

    A DataLoader with a batch sampler of `(index, seed)` pairs gets whole batches from
    :meth:`__getitems__`: the augmentation is seeded once per batch (so it does not depend on
    the number of workers) and the batch is stacked without a collate step.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.images = images
        self.labels = label_tensor(labels)
        self.transform = transform if transform is not None and len(transform) else None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """One (S, S, C) uint8 image, augmented if there is a transform."""
        img = np.asarray(self.images[i])
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(self.image(i).transpose(2, 0, 1)))  # (C, S, S)
        return x, self.labels[i]

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[(index, batch_seed), ...] -> (B, C, S, S) uint8 with NHWC strides, (B,) labels."""
        index = [i for i, _ in items]
        if self.transform is not None and items:
            self.transform.set_random_seed(items[0][1])
        first = self.image(index[0])
        out = np.empty((len(index), *first.shape), np.uint8)  # (B, S, S, C)
        out[0] = first
        for j in range(1, len(index)):
            img = self.image(index[j])
            if img.shape != first.shape:
                raise ValueError(
                    f"augmentation produced images of shapes {first.shape} and {img.shape} in one "
                    "batch; end augment.train with a fixed-size transform (e.g. Resize)"
                )
            out[j] = img
        x = torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, C, S, S) view: no copy
        return x, self.labels[torch.as_tensor(index)]


def label_tensor(labels: np.ndarray) -> torch.Tensor:
    """(N,) class indices as int64; (N, K) multi-hot multi-label targets as float32."""
    labels = np.asarray(labels)
    return torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)


# --------------------------------------------------------------------------- splits.csv


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
    return split_data(
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


def split_data(
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
