"""GPU throughput of the train engine: in-memory tensors vs the real cache + augmentation path.

Builds a synthetic JPEG dataset (10 classes), decodes it once into the uint8 cache, then trains
the same model three ways for a few epochs and reports steady-state images/s (first epoch =
warm-up, excluded) and mean GPU utilisation sampled with nvidia-smi:

  raw      a minimal hand-written loop over batches already on the GPU (the ceiling)
  memory   `fit()` with no augmentation: the split lives on the GPU, batches are slices
  augment  `fit()` reading the memory-mapped cache through DataLoader workers running the
           albumentations pipeline (RandomResizedCrop + HorizontalFlip), pinned memory

Run on a GPU via `bench/gpu_check.sh`; smoke-test on CPU with
`PYTHONPATH=src .venv/bin/python bench/bench_train_gpu.py --device cpu --images 64 --size 32
--batch 16 --epochs 2 --precision fp32`. `--md` writes the table bench/RESULTS.md keeps.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from common import cpu_name
from imgcls.config import TrainConfig, TransformSpec
from imgcls.data.augment import build_transform
from imgcls.data.dataset import channel_stats, decode_images
from imgcls.models import create_model
from imgcls.models.bundle import Preprocess
from imgcls.training.batches import auto_workers
from imgcls.training.setup import make_runtime, select_device
from imgcls.training.trainer import FitConfig, fit


def _write_chunk(args: tuple[str, int, int, int]) -> list[dict]:
    """Worker: write `count` JPEGs (coloured blobs on noise) starting at index `start`."""
    root, start, count, size = args
    rows = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        label = i % 10
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = size // 6 + label * size // 80
        yy, xx = np.ogrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (25 * label, 255 - 20 * label, 128)
        path = Path(root) / f"c{label}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
        rows.append(
            {
                "path": path.relative_to(root).as_posix(),
                "label": f"c{label}",
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "mode": "RGB",
            }
        )
    return rows


def make_dataset(root: Path, n: int, size: int) -> pd.DataFrame:
    """Write `n` synthetic JPEGs under `root` in parallel; return manifest-like rows."""
    chunk = 256
    jobs = [(str(root), s, min(chunk, n - s), size) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        rows = [r for part in pool.map(_write_chunk, jobs) for r in part]
    return pd.DataFrame(rows)


class GpuSampler:
    """nvidia-smi utilisation samples with timestamps, read by a background thread."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                f"-lms={interval_ms}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.split(",")[0])))
            except ValueError:
                continue

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) between two time.monotonic() stamps."""
        values = [u for t, u in self.samples if start <= t <= end]
        return round(statistics.fmean(values), 1) if values else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def _epoch_done(stamps: list[float], epoch: int, row: dict) -> None:
    """Stamp the epoch's end and say how fast it was (a stalled variant shows where it stalled)."""
    stamps.append(time.monotonic())
    print(f"  epoch {epoch}: {row['images_per_s']:.0f} img/s", flush=True)


def run_fit(name, images, labels, transform, cfg, in_chans, sampler) -> dict:
    """Train with the engine; steady-state images/s and GPU utilisation after epoch 1."""
    mean, std = channel_stats(images)
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=10, image_size=images.shape[1])
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = fit(
        model,
        Preprocess(mean, std),
        (images, labels),
        (np.asarray(images[:256]), labels[:256]),
        10,
        FitConfig(
            cfg,
            seed=0,
            transform=transform,
            on_epoch_end=lambda e, row: _epoch_done(stamps, e, row),
            progress=False,
        ),
    )
    wall = time.perf_counter() - t0
    steady = [h["images_per_s"] for h in result.history[1:]] or [result.history[0]["images_per_s"]]
    return {
        "images_per_s": round(statistics.median(steady), 1),
        "per_epoch": [round(h["images_per_s"], 1) for h in result.history],
        "gpu_util_pct": sampler.mean(stamps[0], stamps[-1]) if len(stamps) > 1 else None,
        "wall_s": round(wall, 1),
        "train_loss_last": round(result.history[-1]["train_loss"], 4),
    }


def run_raw(name, images, labels, cfg, in_chans, sampler) -> dict:
    """A minimal hand-written loop on batches that already sit on the device."""
    device = select_device(cfg.device)
    rt = make_runtime(cfg, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    mean, std = channel_stats(images)
    prep = Preprocess(mean, std).to(device)
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, num_classes=10, image_size=images.shape[1])
    model.to(device)
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x_all = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
    x_all = x_all.to(device).contiguous(memory_format=fmt)  # (N, C, S, S) uint8
    y_all = torch.as_tensor(labels, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    rates, t_start = [], 0.0
    for epoch in range(cfg.epochs):
        if epoch == 1:
            t_start = time.monotonic()
        perm = torch.randperm(len(y_all), device=device)
        t = time.perf_counter()
        for i in range(0, len(y_all), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            with rt.autocast():
                loss = loss_fn(model(prep(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(y_all) / (time.perf_counter() - t))
    return {
        "images_per_s": round(statistics.median(rates[1:] or rates), 1),
        "per_epoch": [round(r, 1) for r in rates],
        "gpu_util_pct": sampler.mean(t_start, time.monotonic()) if t_start else None,
    }


def markdown_table(report: dict) -> str:
    """The figures as the Markdown table bench/RESULTS.md keeps (plus one line of context)."""

    def util(row: dict) -> str:
        return "–" if row.get("gpu_util_pct") is None else f"{row['gpu_util_pct']:.0f} %"

    def rate(row: dict) -> str:
        return f"{row['images_per_s']:.0f}" if "images_per_s" in row else "not finished"

    def ratio(key: str) -> str:
        return f"{report[key]:.3f}" if key in report else "–"

    raw, mem, aug = (report.get(k, {}) for k in ("raw", "memory", "augment"))
    lines = [
        f"{report['device']}, torch {report['torch']}, {report['cpus']} CPUs ({report['cpu']}); "
        f"{report['model']} {report['size']} px, {report['images']} images, batch "
        f"{report['batch']}, {report['epochs']} epochs (median of epochs 2+), "
        f"{report['precision']} + channels_last, DataLoader workers {report['workers']}",
        "",
        "| variant | img/s | GPU util | ratio |",
        "|---|---|---|---|",
        f"| raw hand loop, tensors on GPU | {rate(raw)} | {util(raw)} | – |",
        f"| `fit()`, in-memory tensors | {rate(mem)} | {util(mem)} "
        f"| engine/raw {ratio('engine_over_raw')} |",
        f"| `fit()`, cache + augmentation | {rate(aug)} | {util(aug)} "
        f"| augment/memory {ratio('augment_over_memory')} (target >= 0.9) |",
    ]
    if "memory_compiled" in report:
        comp = report["memory_compiled"]
        lines.append(f"| `fit()`, in-memory, torch.compile | {rate(comp)} | {util(comp)} | – |")
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path | None, md: Path | None) -> None:
    """Write the figures so far (after every variant: a later stall still leaves these)."""
    if "raw" in report and "memory" in report:
        report["engine_over_raw"] = round(
            report["memory"]["images_per_s"] / report["raw"]["images_per_s"], 3
        )
    if "memory" in report and "augment" in report:
        report["augment_over_memory"] = round(
            report["augment"]["images_per_s"] / report["memory"]["images_per_s"], 3
        )
    for path, text in ((out, json.dumps(report, indent=2) + "\n"), (md, markdown_table(report))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def main() -> None:
    """Build the data, run the three variants, print and save the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the JPEGs and cache go")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    ap.add_argument("--md", type=Path, default=None, help="write the Markdown table here")
    args = ap.parse_args()
    # Stopped by gpu_check.sh's timeout: say where every thread was (timeout -k kills after).
    faulthandler.register(signal.SIGTERM, all_threads=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgcls-gpu-"))
    t0 = time.perf_counter()
    df = make_dataset(work / "raw", args.images, int(args.size * 8 / 7))  # 256 px for 224
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = decode_images(df, work / "raw", args.size, 3, work / "cache", progress=False)
    decode_s = time.perf_counter() - t0
    labels = df["label"].str[1:].astype(int).to_numpy()
    workers = args.workers if args.workers == "auto" else int(args.workers)
    cfg = TrainConfig(
        image_size=args.size,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=1e-3,
        scheduler="constant",
        warmup_epochs=0,
        monitor="train_loss",
        device=args.device,
        precision=args.precision,
        channels_last=True,
        num_workers=workers,
    )
    augment = build_transform(
        [
            TransformSpec(name="RandomResizedCrop", size=[args.size, args.size], scale=[0.35, 1]),
            TransformSpec(name="HorizontalFlip", p=0.5),
        ]
    )
    sampler = GpuSampler()
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "epochs": args.epochs,
        "precision": args.precision,
        "channels_last": True,
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "workers": workers
        if workers != "auto"
        else f"auto = {auto_workers(torch.device(args.device))}",
        "generate_jpegs_s": round(gen_s, 1),
        "decode_to_cache_img_s": round(args.images / decode_s, 1),
    }
    try:
        print(json.dumps(report), flush=True)
        in_memory = np.ascontiguousarray(np.asarray(images))  # (N, S, S, 3) uint8 in RAM
        report["raw"] = run_raw(args.model, in_memory, labels, cfg, 3, sampler)
        print("raw", report["raw"], flush=True)
        save(report, args.out, args.md)
        report["memory"] = run_fit(args.model, in_memory, labels, None, cfg, 3, sampler)
        print("memory", report["memory"], flush=True)
        save(report, args.out, args.md)
        report["augment"] = run_fit(args.model, images, labels, augment, cfg, 3, sampler)
        print("augment", report["augment"], flush=True)
        if args.compile:
            compiled = cfg.model_copy(update={"compile": True})
            report["memory_compiled"] = run_fit(
                args.model, in_memory, labels, None, compiled, 3, sampler
            )
            print("memory_compiled", report["memory_compiled"], flush=True)
    finally:
        sampler.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    save(report, args.out, args.md)
    print(json.dumps(report, indent=2))
    print(markdown_table(report))
    ok = report["augment_over_memory"] >= 0.9
    print(f"cache+augmentation / in-memory = {report['augment_over_memory']:.3f} (target >= 0.9)")
    sys.exit(0 if ok or args.device != "cuda" else 2)


if __name__ == "__main__":
    main()
