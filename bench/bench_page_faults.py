"""Page faults, kernel time and wall time per training step, with and without kept freed memory.

Each mode runs in a fresh process (glibc's allocator state is per process): the Fashion-MNIST
preset's net (simple_cnn [32, 64, 128], convs [1, 2, 2], pool_before_norm), batch 128 of random
28x28 images, AdamW as the engine builds it, fp32, this machine's cores as threads, NHWC and
NCHW; `keep` calls `imgcls.training.setup.keep_freed_memory()` first, as training does.

    .venv/bin/python bench/bench_page_faults.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import os, resource, sys, time, torch
from imgcls.config import parse_params
from imgcls.models import create_model
from imgcls.training.setup import keep_freed_memory, make_loss, make_optimizer
mode, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(len(os.sched_getaffinity(0)))
if mode == "keep":
    keep_freed_memory()
train = parse_params({"train": {"lr": 4e-3, "weight_decay": 0.05, "label_smoothing": 0.1}}).train
kw = {"widths": [32, 64, 128], "convs_per_stage": [1, 2, 2], "pool_before_norm": True}
for nhwc in (True, False):
    torch.manual_seed(0)
    net = create_model("simple_cnn", in_chans=1, num_classes=10, image_size=28, **kw)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt, loss_fn = make_optimizer(net, train), make_loss(train)
    x, y = torch.randn(128, 1, 28, 28).contiguous(memory_format=fmt), torch.arange(128) % 10
    def step():
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(f"{mode:8s} {'nhwc' if nhwc else 'nchw'}  {(t1 - t0) / steps * 1e3:6.1f} ms/step  "
          f"{(r1.ru_minflt - r0.ru_minflt) / steps:7.0f} faults/step  "
          f"{(r1.ru_stime - r0.ru_stime) / steps * 1e3:5.1f} ms kernel/step", flush=True)
"""


def main() -> None:
    """Both modes, each twice, alternating (default, keep, default, keep)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    for _ in range(args.repeats):
        for mode in ("default", "keep"):
            subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps)], check=True)


if __name__ == "__main__":
    main()
