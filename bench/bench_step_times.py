"""Milliseconds per training step of simple_cnn shapes on real Fashion-MNIST batches.

Each variant is timed the way the train stage's probe times its candidates (`imgcls.training.
probe.measure`: the product's preprocessing, loss and AdamW; warm-up untimed; median of rounds;
the candidates interleaved), at fp32 with NCHW and NHWC and this machine's cores as threads, on
one batch of 128 real images (Debian's `dataset-fashion-mnist` IDX files). It answers "how much
cheaper is this shape per step" before a 10-minute `dvc repro` says what it costs in accuracy.

    .venv/bin/python bench/bench_step_times.py                 # every variant below
    .venv/bin/python bench/bench_step_times.py preset w24_pf   # some of them
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name
from imgcls.config import parse_params
from imgcls.data.dataset import channel_stats
from imgcls.data.sources.generated import read_idx
from imgcls.data.sources.presets import FASHION_LOCAL_DIRS
from imgcls.models import create_model
from imgcls.models.bundle import Preprocess
from imgcls.training.probe import Candidate, measure
from imgcls.training.setup import make_loss, make_optimizer

IDX = FASHION_LOCAL_DIRS[0] / "train-images-idx3-ubyte.gz"
BASE = {"widths": [32, 64, 128], "convs_per_stage": [1, 2, 2], "dropout": 0.2}
VARIANTS: dict[str, dict] = {
    "preset_old": BASE,  # the preset before pool_before_norm
    "preset": {**BASE, "pool_before_norm": True},
    "w24": {**BASE, "widths": [24, 48, 96]},
    "w24_pf": {**BASE, "widths": [24, 48, 96], "pool_before_norm": True},
    "c112_pf": {**BASE, "convs_per_stage": [1, 1, 2], "pool_before_norm": True},
}


def main() -> None:
    """Time every named variant and print one line each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help=f"some of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    raw = read_idx(IDX)[..., None]  # (N, 28, 28, 1)
    mean, std = channel_stats(raw[:10000])
    x = torch.from_numpy(np.ascontiguousarray(raw[: args.batch].transpose(0, 3, 1, 2)))
    y = torch.arange(args.batch) % 10
    params = parse_params({"train": {"lr": 4e-3, "weight_decay": 0.05, "label_smoothing": 0.1}})
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    cands = [Candidate("fp32", False, cores), Candidate("fp32", True, cores)]
    print(f"{cpu_name()}, {cores} threads, torch {torch.__version__}, batch {args.batch}")
    for name in args.variants or list(VARIANTS):
        torch.manual_seed(0)
        net = create_model(
            "simple_cnn", in_chans=1, num_classes=10, image_size=28, **VARIANTS[name]
        )
        ms, _ = measure(
            net,
            Preprocess(mean, std),
            make_loss(params.train),
            (x, y),
            torch.device("cpu"),
            cands,
            lambda m: make_optimizer(m, params.train),
        )
        print(f"{name:12s} " + "  ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
