"""Milliseconds per training step through the engine's three batch paths, on real Fashion-MNIST.

The product's `make_batches` + `train_one_epoch` on the first `--steps` x 64 training images
(Debian's `dataset-fashion-mnist`), the preset's net (`params/fashion-mnist.yaml`) without
dropout, AdamW as the engine builds it, fp32, NHWC, this machine's cores as threads, at 16 px
(progressive resizing's first side) and 28 px:

  albumentations  the preset's flip + pad + crop per image in the main process (what
                  `train.batched_augment: false` does on a 2-core CPU: no workers)
  batched         the same pipeline on whole batches (`imgcls.data.batch_augment`, the default)
  none            no augmentation: in-memory slices, the floor

Each path trains two epochs per size, alternating; the figure is the faster epoch. A mechanism
benchmark (what a step costs); the product figures come from `bench_train_fashion.py`.

    .venv/bin/python bench/bench_augment_path.py            # ~1.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name
from imgcls.config import parse_params
from imgcls.data.augment import build_transform
from imgcls.data.dataset import channel_stats
from imgcls.data.sources.generated import read_idx
from imgcls.data.sources.presets import FASHION_LOCAL_DIRS
from imgcls.models import create_model
from imgcls.models.bundle import Preprocess
from imgcls.training.batches import make_batches, set_epoch
from imgcls.training.loop import Runtime, train_one_epoch
from imgcls.training.setup import keep_freed_memory, make_loss, make_optimizer

IDX = FASHION_LOCAL_DIRS[0] / "train-images-idx3-ubyte.gz"
LABELS = FASHION_LOCAL_DIRS[0] / "train-labels-idx1-ubyte.gz"
# The shipped preset's augmentation and net, read from its file so the two cannot drift apart.
PRESET = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "params/fashion-mnist.yaml").read_text()
)
PATHS = ("albumentations", "batched", "none")


def main() -> None:
    """Time every path at 16 and 28 px and print one line each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="steps of 64 images per epoch")
    args = ap.parse_args()
    keep_freed_memory()  # as training does
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    n = args.steps * 64
    images = read_idx(IDX)[:n, ..., None].copy()  # writable, as a split of the decode cache is
    labels = read_idx(LABELS)[:n].astype(np.int64)
    params = parse_params(
        {
            "augment": {"train": PRESET["augment"]["train"]},
            "train": {"lr": 3e-3, "weight_decay": 0.05, "label_smoothing": 0.1},
        }
    )
    transform = build_transform(params.augment.train)
    torch.manual_seed(0)
    kw = {**PRESET["model"]["kwargs"], "dropout": 0.0}
    net = create_model(PRESET["model"]["name"], in_chans=1, num_classes=10, image_size=28, **kw)
    net = net.to(memory_format=torch.channels_last)
    opt, loss_fn = make_optimizer(net, params.train), make_loss(params.train)
    prep, rt = Preprocess(*channel_stats(images)), Runtime(torch.device("cpu"), None, True)
    batches = {
        path: make_batches(
            images,
            labels,
            None if path == "none" else transform,
            64,
            shuffle=True,
            device=torch.device("cpu"),
            num_workers=0,
            batched_augment=path == "batched",
        )
        for path in PATHS
    }
    best: dict[tuple[str, int], float] = {}
    for epoch in range(2):
        for size in (16, 28):
            for path in PATHS:
                set_epoch(batches[path], 1, epoch)
                stats = train_one_epoch(
                    net,
                    prep,
                    batches[path],
                    opt,
                    None,
                    loss_fn,
                    rt,
                    size=None if size == 28 else size,
                )
                ms = stats.seconds / args.steps * 1000
                best[path, size] = min(best.get((path, size), ms), ms)
    print(f"{cpu_name()}, {cores} threads, torch {torch.__version__}, batch 64, {args.steps} steps")
    for path in PATHS:
        print(f"{path:15s} " + "  ".join(f"{s} px {best[path, s]:.1f} ms" for s in (16, 28)))


if __name__ == "__main__":
    main()
