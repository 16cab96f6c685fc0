"""Prediction throughput on CPU: images/s for the default model and a timm model, batch 1 and 64.

Run: .venv/bin/python bench/bench_predict.py [--seconds 2] [--repeats 3] [--threads 1,2]

Two measurements per model and batch size:
- "model": uint8 images already in memory -> probabilities (`Predictor.probs`), the ceiling;
- "files": `imgcls predict`'s path: PNG / JPEG files on disk -> decode + resize (`load_image`,
  decoding threads overlapping the model) -> probabilities (`predict_paths`).
Each figure is the median of `--repeats` runs of at least `--seconds` each (untrained weights:
throughput does not depend on them). Every case runs with each torch CPU thread count in
`--threads` (`imgcls predict --threads N`): on a small shared CPU, torch's default of one thread
per core can be far slower than one thread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls.inference.predict import load_predictor, predict_paths
from imgcls.models.bundle import save_bundle
from imgcls.models.registry import create_model

# name, create_model kwargs, image size, channels, (file width, height, format)
MODELS = [
    ("simple_cnn (default params.yaml)", "simple_cnn", {"widths": [32, 64, 128], "dropout": 0.2},
     16, 1, (8, 8, "PNG")),
    ("timm resnet18", "resnet18", {}, 128, 3, (200, 150, "JPEG")),
]  # fmt: skip


def rate(fn: Callable[[], int], seconds: float, repeats: int) -> float:
    """Median images/s of `fn` (returns images done), each repeat lasting >= `seconds`."""
    fn()  # warm-up: allocator, thread pool, first-call overheads
    rates = []
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            done += fn()
        rates.append(done / elapsed)
    return statistics.median(rates)


def write_files(folder: Path, n: int, size: tuple[int, int, str], channels: int) -> list[str]:
    """`n` random-noise image files of the given size and format."""
    w, h, fmt = size
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        shape = (h, w) if channels == 1 else (h, w, 3)
        path = folder / f"{i:05d}.{fmt.lower()}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)
        paths.append(str(path))
    return paths


def bench_model(
    tmp: Path, spec: tuple, seconds: float, repeats: int, threads: list[int]
) -> list[tuple]:
    """Rows (model, input, batch, threads, in-memory images/s, from-files images/s)."""
    label, arch, kwargs, size, channels, file_spec = spec
    net = create_model(arch, in_chans=channels, num_classes=3, image_size=size, **kwargs)
    meta = {
        "arch": arch,
        "model_kwargs": kwargs,
        "classes": ["a", "b", "c"],
        "image_size": size,
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
    }
    model_path = tmp / f"{arch}.pt"
    save_bundle(model_path, net, meta)
    predictor = load_predictor(model_path, device="cpu")
    files = write_files(tmp / arch, 256, file_spec, channels)
    rows = []
    for batch, n_threads in ((b, t) for b in (1, 64) for t in threads):
        torch.set_num_threads(n_threads)
        images = np.random.default_rng(1).integers(0, 256, (batch, size, size, channels), np.uint8)

        def in_memory(images: np.ndarray = images) -> int:
            predictor.probs(images)
            return len(images)

        n_files = 64 if batch == 1 else 256

        def from_files(batch: int = batch, n_files: int = n_files) -> int:
            preds = predict_paths(predictor, files[:n_files], batch_size=batch, progress=False)
            assert all(p.error is None for p in preds)
            return len(preds)

        mem, disk = rate(in_memory, seconds, repeats), rate(from_files, seconds, repeats)
        rows.append((label, f"{size}x{size}x{channels}", batch, n_threads, mem, disk))
        print(f"{label:34s} batch {batch:3d} threads {n_threads}: {mem:9.1f} {disk:9.1f} img/s")
    return rows


def main() -> None:
    """Every model x batch size x thread count; prints a Markdown table for bench/RESULTS.md."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="torch CPU thread counts to try (1,2)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            row
            for spec in MODELS
            for row in bench_model(Path(tmp), spec, args.seconds, args.repeats, threads)
        ]
    print("\n| model | input | batch | torch threads | in memory (img/s) | from files (img/s) |")
    print("|---|---|---|---|---|---|")
    for name, shape, batch, n_threads, mem, disk in rows:
        print(f"| {name} | {shape} | {batch} | {n_threads} | {mem:,.0f} | {disk:,.0f} |")


if __name__ == "__main__":
    main()
