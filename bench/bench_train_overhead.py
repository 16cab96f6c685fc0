"""Train-engine overhead: `fit()` throughput / a minimal hand-written PyTorch loop, one run.

Same model, initial weights, batch size, optimizer and in-memory uint8 data on both sides. The
engine adds what makes it worth using (per-step NaN check, loss / accuracy bookkeeping, LR
schedule, validation, atomic checkpoint with RNG state every epoch); the hand loop does only
forward, backward and step. The two alternate (hand, engine, hand, engine, ...) so that load
from other jobs on a shared machine hits both alike; figures are medians over rounds.

    .venv/bin/python bench/bench_train_overhead.py            # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgcls.config import TrainConfig
from imgcls.data.dataset import channel_stats
from imgcls.models import create_model
from imgcls.models.bundle import Preprocess
from imgcls.training.trainer import FitConfig, fit


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy stripe images of 10 orientations / frequencies: (N, S, S, 1) uint8, (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 1), np.uint8)
    for i, k in enumerate(labels):
        coord = [yy, xx, xx + yy, xx - yy, 2 * yy][k % 5] + rng.integers(0, 4)
        period = 2 + k // 5
        img = np.where((coord // period) % 2 == 0, 200.0, 40.0) + rng.normal(0, 30, (size, size))
        images[i, :, :, 0] = img.clip(0, 255)
    return images, labels


def new_model(args: argparse.Namespace) -> torch.nn.Module:
    """The benchmark model, with the same initial weights every time."""
    torch.manual_seed(0)
    kwargs = {"widths": args.widths} if args.model in {"simple_cnn", "small_resnet"} else {}
    return create_model(args.model, in_chans=1, num_classes=10, image_size=args.size, **kwargs)


def hand_loop(args, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The minimal loop: shuffle, slice, normalise, forward, loss, backward, step."""
    mean, std = channel_stats(x)
    prep = Preprocess(mean, std)
    model = new_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 1, S, S)
    yt = torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    rates = []
    t_all = time.perf_counter()
    for _ in range(args.epochs):
        t = time.perf_counter()
        perm = torch.randperm(len(yt), generator=g)
        model.train()
        for i in range(0, len(yt), args.batch):
            idx = perm[i : i + args.batch]
            loss = loss_fn(model(prep(xt[idx])), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(yt) / (time.perf_counter() - t))
    wall = time.perf_counter() - t_all
    return {
        "epoch_img_s": statistics.median(rates[1:]),
        "end_to_end_img_s": len(yt) * args.epochs / wall,
    }


def engine(args, x, y, vx, vy, workdir: Path) -> dict[str, float]:
    """`fit()` with validation and an atomic checkpoint every epoch."""
    cfg = TrainConfig(
        image_size=args.size,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        weight_decay=0.0,
        scheduler="cosine",
        warmup_epochs=0,
        device="cpu",
        channels_last=False,  # the hand loop's layout (the engine's CPU default is NHWC)
    )
    mean, std = channel_stats(x)
    ckpt = workdir / "last.pt"
    ckpt.unlink(missing_ok=True)
    t = time.perf_counter()
    result = fit(
        new_model(args),
        Preprocess(mean, std),
        (x, y),
        (vx, vy),
        10,
        FitConfig(cfg, seed=0, checkpoint_path=ckpt, progress=False),
    )
    wall = time.perf_counter() - t
    rates = [h["images_per_s"] for h in result.history]
    return {
        "epoch_img_s": statistics.median(rates[1:]),
        "end_to_end_img_s": len(y) * args.epochs / wall,
        "val_accuracy": result.history[-1]["val_accuracy"],
    }


def main() -> None:
    """Alternate hand loop and engine; print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--images", type=int, default=6144)
    ap.add_argument("--val-images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_data(args.images + args.val_images, args.size)
    x, vx, y, vy = x[: args.images], x[args.images :], y[: args.images], y[args.images :]
    hand, eng = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            hand.append(hand_loop(args, x, y))
            eng.append(engine(args, x, y, vx, vy, Path(tmp)))
            print(f"round {r + 1}: hand {hand[-1]}  engine {eng[-1]}", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    report = {
        "model": args.model,
        "widths": args.widths,
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "hand_epoch_img_s": round(med(hand, "epoch_img_s"), 1),
        "engine_epoch_img_s": round(med(eng, "epoch_img_s"), 1),
        "ratio_epoch": round(med(eng, "epoch_img_s") / med(hand, "epoch_img_s"), 3),
        "hand_end_to_end_img_s": round(med(hand, "end_to_end_img_s"), 1),
        "engine_end_to_end_img_s": round(med(eng, "end_to_end_img_s"), 1),
        "ratio_end_to_end": round(med(eng, "end_to_end_img_s") / med(hand, "end_to_end_img_s"), 3),
        "engine_val_accuracy": round(eng[-1]["val_accuracy"], 4),
    }
    print(json.dumps(report, indent=2))
    print(
        f"engine / hand loop: {report['ratio_epoch']:.3f} per training epoch, "
        f"{report['ratio_end_to_end']:.3f} end to end incl. validation + checkpoints "
        "(target >= 0.95)"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
