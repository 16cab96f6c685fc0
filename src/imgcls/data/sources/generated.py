"""Generated sources: scikit-learn's `digits` and IDX files (MNIST-style), written as PNG files.

The PNGs are written once into data/raw/<name>/ and rewritten only when their input (recorded
in a marker file) changes.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.imageinfo import write_png_chunk
from imgcls.data.sources.archive import swap_into_place
from imgcls.data.sources.common import SPLIT_DIRS, SourceError, under, walk_files, worker_count
from imgcls.data.sources.presets import FASHION_BASE, fetch_fashion
from imgcls.io import explain_disk_full

log = logging.getLogger(__name__)

MARKER = ".imgcls-source.json"  # in a generated folder: what it was generated from
PARALLEL_WRITE_MIN = 5000  # fewer generated images are written in-process
GENERATOR_VERSION = 1  # bump when digits / IDX -> PNG writing changes, to regenerate


def _generated_is_current(target: Path, fingerprint: dict[str, Any]) -> bool:
    """True if `target` was generated from exactly this input and still has all its files."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("fingerprint") != fingerprint:
        return False
    count = sum(1 for _ in walk_files(target))
    return count == marker.get("files")


def _write_all(tmp: Path, names: list[str], images: np.ndarray, workers: int) -> None:
    """Write the PNGs, in worker processes when there are many (file creation dominates)."""
    if workers <= 1 or len(names) < PARALLEL_WRITE_MIN:
        write_png_chunk(tmp, names, images)
        return
    step = max(500, len(names) // (workers * 8))
    ctx = multiprocessing.get_context("spawn")  # see manifest.inspect_all for why not fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        jobs = [
            pool.submit(write_png_chunk, tmp, names[i : i + step], images[i : i + step])
            for i in range(0, len(names), step)
        ]
        for job in jobs:
            job.result()


def write_pngs(
    images: np.ndarray,
    labels: list[str],
    target: Path,
    fingerprint: dict[str, Any],
    splits: list[str] | None = None,
    workers: int = 1,
) -> None:
    """Write uint8 images (N, H, W) as PNGs `<target>/[<split>/]<label>/<index>.png`, atomically."""
    if _generated_is_current(target, fingerprint):
        return
    tmp = target.parent / f".{target.name}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(4, len(str(len(images) - 1)))
    names = [
        f"{splits[i]}/{label}/{i:0{width}d}.png" if splits else f"{label}/{i:0{width}d}.png"
        for i, label in enumerate(labels)
    ]
    try:
        with explain_disk_full(target):
            _write_all(tmp, names, images, workers)
            marker = {"fingerprint": fingerprint, "files": len(images)}
            (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
            swap_into_place(tmp, target)  # the previous folder survives a failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def digits_images() -> tuple[np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 digits as uint8 images (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    return images, [str(int(t)) for t in bunch.target]


def digits_source(spec: SourceSpec, raw_dir: Path) -> Path:
    """Write the digits as PNG files (once) and return their folder."""
    import sklearn

    target = under(raw_dir, str(spec.name), spec)
    fingerprint = {
        "generator": "digits",
        "version": GENERATOR_VERSION,
        "n": 1797,
        "sklearn": sklearn.__version__.split(".")[0],
    }
    if not _generated_is_current(target, fingerprint):
        images, labels = digits_images()
        write_pngs(images, labels, target, fingerprint)
    return target


# ----------------------------------------------------------------------------- IDX


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), the MNIST container format."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise SourceError(f"{path}: cannot read IDX file ({err}); is it complete?") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise SourceError(
            f"{path}: IDX header says {dims} but the file holds {len(data) - offset} data bytes "
            f"instead of {expected}; the file is truncated or damaged"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def find_idx_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """Pair `<prefix>-images-idx3-ubyte[.gz]` with `<prefix>-labels-idx1-ubyte[.gz]`."""
    pairs = []
    for images in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images.name.split("-images-idx3-ubyte")[0]
        suffix = images.name.split("-images-idx3-ubyte")[1]
        labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if not labels.is_file():
            raise SourceError(f"{images}: no matching labels file {labels.name} next to it")
        split = "test" if prefix in ("t10k", "test") else SPLIT_DIRS.get(prefix, "train")
        pairs.append((split, images, labels))
    if not pairs:
        raise SourceError(
            f"{folder}: no `*-images-idx3-ubyte[.gz]` files; an IDX source is a folder holding "
            "e.g. train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz"
        )
    return pairs


def _idx_fingerprint(pairs: list[tuple[str, Path, Path]], classes: list[str] | None) -> dict:
    """Identify IDX inputs by name, size and mtime (cheap) plus the class names used."""
    files = []
    for _, images, labels in pairs:
        for p in (images, labels):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    return {"generator": "idx", "version": GENERATOR_VERSION, "files": files, "classes": classes}


def idx_source(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, progress: bool
) -> Path:
    """Write IDX images as PNG files `<name>/<split>/<label>/<index>.png` (once)."""
    workers = worker_count(cfg.workers)
    if spec.path:
        folder = root / spec.path
    elif spec.url == FASHION_BASE:  # only the fashion-mnist preset has digests for its files
        folder = fetch_fashion(spec, raw_dir, progress, cfg.max_download_bytes)
    else:
        raise SourceError(f"data.source {spec.name!r}: an idx source needs `path` (a folder)")
    pairs = find_idx_pairs(folder)
    target = under(raw_dir, str(spec.name), spec)
    fingerprint = _idx_fingerprint(pairs, spec.classes)
    if _generated_is_current(target, fingerprint):
        return target
    all_images, all_labels, all_splits = [], [], []
    for split, images_path, labels_path in pairs:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise SourceError(
                f"{images_path}: expected N x H x W uint8 images matching {len(labels)} labels, "
                f"got shape {images.shape} {images.dtype}"
            )
        names = [_class_name(int(v), spec.classes, labels_path) for v in labels]
        all_images.append(images)
        all_labels += names
        all_splits += [split] * len(images)
    log.info("writing %d IDX images as PNG files under %s", len(all_labels), target)
    images = np.concatenate(all_images)
    write_pngs(images, all_labels, target, fingerprint, all_splits, workers=workers)
    return target


def _class_name(index: int, classes: list[str] | None, where: Path) -> str:
    """Label index -> class name (the index itself when no names are configured)."""
    if classes is None:
        return str(index)
    if not 0 <= index < len(classes):
        raise SourceError(f"{where}: label {index} has no entry in the source's `classes` list")
    return classes[index]


# ----------------------------------------------------------------------------- dispatch
