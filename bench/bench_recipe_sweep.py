"""Fashion-MNIST recipe variants, measured quickly on one GPU with the product's own engine.

Each run is one training exactly as the train stage does it (`imgcls.training.train.train_model`:
`create_model`, `build_transform(augment.train)`, the train split's channel statistics, `fit`
with its best-epoch selection on `train.monitor`), on the official IDX files: the 60,000 train
images less a seeded, class-stratified val hold-out of the preset's size (4,860 = 0.075 / 0.925
of each class, as the split stage gives with the official test set kept), and the official
10,000 test images. The base recipe is `params/fashion-mnist.yaml` over `params.yaml`; each
variant changes a few dotted keys (`VARIANTS`). Per run: test accuracy (the best epoch's
weights, fp32 as the evaluate stage computes it), test accuracy with horizontal-flip TTA (mean
softmax of x and flipped x), val accuracy, best epoch, MACs and parameters of the model per
28x28 image (Conv / Linear forward hooks) and wall time.

Several trainings share the GPU as subprocesses (`--parallel`, each with `--workers` DataLoader
workers). Runs are queued seed by seed (every variant's first seed before any second seed) and
none starts after `--budget-s` or when its estimated time would pass `--hard-s`, at which the
still running ones are stopped; results are written as they arrive (`results.jsonl`,
`summary.md`: mean over seeds per variant, sorted by TTA accuracy), so a cut-short sweep still
reports.

    python bench/bench_recipe_sweep.py --out /tmp/sweep --budget-s 300 --hard-s 400
    # CPU smoke test (tiny data, one epoch):
    python bench/bench_recipe_sweep.py --device cpu --precision fp32 --limit 2000 --epochs 1 \\
        --variants base ema0999 --seeds 1 --parallel 2 --workers 0 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common import cpu_name, overlay

REPO = Path(__file__).resolve().parent.parent
IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# name -> dotted overrides of train / model / augment keys, applied over the base recipe
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "ema0999": {"train.ema_decay": 0.999},
    "ema09995": {"train.ema_decay": 0.9995},
    "ep10": {"train.epochs": 10},
    "ep16": {"train.epochs": 16},
    "ep20": {"train.epochs": 20},
    "ls0.2": {"train.label_smoothing": 0.2},
    "drop0.1": {"model.kwargs.dropout": 0.1},
    "drop0.3": {"model.kwargs.dropout": 0.3},
    "lr0.002": {"train.lr": 0.002},
    "lr0.008": {"train.lr": 0.008},
    "wd0.02": {"train.weight_decay": 0.02},
    "wd0.1": {"train.weight_decay": 0.1},
    "b256_lr0.006": {"train.batch_size": 256, "train.lr": 0.006},
    "w24-48-96_ep20": {"model.kwargs.widths": [24, 48, 96], "train.epochs": 20},
    "w48-96-192_ep10": {"model.kwargs.widths": [48, 96, 192], "train.epochs": 10},
    "convs112": {"model.kwargs.convs_per_stage": [1, 1, 2]},
    "convs222_ep10": {"model.kwargs.convs_per_stage": [2, 2, 2], "train.epochs": 10},
    # shapes that fit 6 minutes on a 2-core CPU without AMX (bench/RESULTS.md, issue 19)
    "w24-48-96_ep12": {"model.kwargs.widths": [24, 48, 96], "train.epochs": 12},
    "w48-96-192_c111_ep10": {
        "model.kwargs.widths": [48, 96, 192],
        "model.kwargs.convs_per_stage": [1, 1, 1],
        "train.epochs": 10,
    },
    "convs112_ep11": {"model.kwargs.convs_per_stage": [1, 1, 2], "train.epochs": 11},
}


# ----------------------------------------------------------------------------- data and params


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or not) of unsigned bytes: (N,) labels or (N, H, W) images."""
    if path.suffix == ".gz":
        with gzip.open(path) as fh:
            raw = fh.read()
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_idx(idx_dir: Path, prefix: str, kind: str) -> Path:
    """`<prefix>-<kind>-idx?-ubyte[.gz]` in `idx_dir`, with a clear error when missing."""
    found = sorted(idx_dir.glob(f"{prefix}-{kind}-idx*-ubyte*"))
    if not found:
        raise FileNotFoundError(
            f"no {prefix}-{kind}-idx*-ubyte[.gz] in {idx_dir}; pass --idx-dir (Debian: "
            "apt-get install dataset-fashion-mnist)"
        )
    return found[0]


def prepare_data(idx_dir: Path, work: Path, limit: int | None) -> dict[str, int]:
    """Decode the IDX files once into .npy files the runs memory-map; `limit` caps each set."""
    sizes = {}
    for prefix in ("train", "t10k"):
        x = read_idx(find_idx(idx_dir, prefix, "images"))
        y = read_idx(find_idx(idx_dir, prefix, "labels")).astype(np.int64)
        if limit and limit < len(y):
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:limit])
            x, y = x[keep], y[keep]
        np.save(work / f"{prefix}_x.npy", np.ascontiguousarray(x[..., None]))  # (N, 28, 28, 1)
        np.save(work / f"{prefix}_y.npy", y)
        sizes[prefix] = len(y)
    return sizes


def recipe_raw(repo: Path) -> dict:
    """params/fashion-mnist.yaml over params.yaml, as a plain dict (the shipped preset)."""
    base = yaml.safe_load((repo / "params.yaml").read_text())
    return overlay(base, yaml.safe_load((repo / "params/fashion-mnist.yaml").read_text()))


def holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a class-stratified, seeded hold-out: round(fraction * n) per class."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rng.permutation(rows)[: round(fraction * len(rows))]] = True
    return mask


def count_macs(model: Any, in_chans: int, size: int) -> tuple[int, int]:
    """(multiply-accumulates per image of Conv2d / Linear layers, parameter count)."""
    import torch
    from torch import nn

    macs = [0]

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs[0] += out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        macs[0] += out[0].numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_chans, size, size))
    for h in hooks:
        h.remove()
    return macs[0], sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- one run (child)


def run_one(spec: dict) -> dict:
    """Train one variant / seed through train_model, then score the test set plain and with TTA."""
    import torch

    from imgcls.config import parse_params, with_overrides
    from imgcls.data.dataset import SplitData
    from imgcls.models import create_model
    from imgcls.models.bundle import Preprocess
    from imgcls.training.train import train_model

    t_start = time.perf_counter()
    work, seed = Path(spec["data"]), int(spec["seed"])
    raw = recipe_raw(REPO)
    raw["base"]["seed"] = seed
    train = raw["train"]
    train.update(device=spec["device"], precision=spec["precision"], num_workers=spec["workers"])
    train["cpu_threads"] = 1 if spec["device"] == "cpu" else train.get("cpu_threads")
    if train["channels_last"] == "auto":
        train["channels_last"] = spec["device"] == "cuda"  # unmeasured auto's own choice
    if spec.get("epochs"):
        train["epochs"] = int(spec["epochs"])
    params = parse_params(raw, "params.yaml + params/fashion-mnist.yaml")
    overrides = dict(VARIANTS[spec["variant"]])
    if spec.get("epochs"):
        overrides.pop("train.epochs", None)  # the smoke test's epochs win
    params = with_overrides(params, overrides)

    pool_x, pool_y = np.load(work / "train_x.npy"), np.load(work / "train_y.npy")
    test_x, test_y = np.load(work / "t10k_x.npy"), np.load(work / "t10k_y.npy")
    s = params.split
    is_val = holdout(pool_y, s.val / (s.train + s.val), seed)
    split = np.where(is_val, "val", "train")
    import pandas as pd

    data = SplitData(
        frame=pd.DataFrame({"split": split}),
        images=pool_x,
        labels=pool_y,
        classes=CLASSES,
        channels=1,
        key=f"fashion-idx-{len(pool_y)}-seed{seed}",
    )
    t_train = time.perf_counter()
    progress_path = Path(spec["result"]).with_suffix(".progress.json")
    epochs_seen: list[dict] = []

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        """After every epoch: what a run stopped at --hard-s still reports."""
        epochs_seen.append(
            {
                "epoch": epoch,
                "val_acc": round(row.get("val_accuracy", float("nan")), 4),
                "epoch_s": round(row["epoch_time_s"], 2),
                "elapsed_s": round(time.perf_counter() - t_train, 1),
            }
        )
        progress_path.write_text(json.dumps(epochs_seen))

    result, meta = train_model(
        params, data, checkpoint_path=None, progress=False, on_epoch_end=on_epoch
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    train_wall = time.perf_counter() - t_train

    # Test: the best epoch's weights, fp32 (the evaluate stage predicts in fp32), TF32 off.
    t_eval = time.perf_counter()
    model = result.model.eval()
    device = next(model.parameters()).device
    prep = Preprocess(meta["mean"], meta["std"]).to(device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    probs, probs_tta = [], []
    with torch.no_grad():
        for i in range(0, len(test_y), 1000):
            x = torch.from_numpy(np.ascontiguousarray(test_x[i : i + 1000].transpose(0, 3, 1, 2)))
            x = prep(x.to(device))
            p = model(x).float().softmax(1)
            p_flip = model(x.flip(3)).float().softmax(1)
            probs.append(p.cpu())
            probs_tta.append(((p + p_flip) / 2).cpu())
    pred = torch.cat(probs).argmax(1).numpy()
    pred_tta = torch.cat(probs_tta).argmax(1).numpy()
    eval_s = time.perf_counter() - t_eval

    kwargs = params.model.kwargs
    net = create_model(params.model.name, in_chans=1, num_classes=10, image_size=28, **kwargs)
    macs, n_params = count_macs(net, 1, 28)
    hist = result.history
    epoch_times = [h["epoch_time_s"] for h in hist]
    timing = result.extra.get("timing") or []
    return {
        "variant": spec["variant"],
        "seed": seed,
        "overrides": VARIANTS[spec["variant"]],
        "test_acc": float((pred == test_y).mean()),
        "test_acc_tta": float((pred_tta == test_y).mean()),
        "val_acc": float(result.best_value),
        "best_epoch": result.best_epoch,
        "epochs": params.train.epochs,
        "macs": int(macs),
        "params": int(n_params),
        "wall_s": round(time.perf_counter() - t_start, 1),  # process start-up excluded
        "train_wall_s": round(train_wall, 1),
        "train_epochs_s": round(sum(epoch_times), 1),
        "val_s": round(sum(t.get("val_s", 0.0) for t in timing), 1),
        "eval_s": round(eval_s, 2),
        "images_per_s_median": round(statistics.median(h["images_per_s"] for h in hist), 0),
        "val_acc_per_epoch": [round(h.get("val_accuracy", float("nan")), 4) for h in hist],
        "n_train": int((~is_val).sum()),
        "n_val": int(is_val.sum()),
        "n_test": len(test_y),
        "precision": spec["precision"],
        "channels_last": params.train.channels_last,
        "workers": spec["workers"],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- the sweep (parent)


def est_cost(variant: str, epochs: int | None) -> float:
    """Relative cost of a run for ordering: epochs x (rough) per-step work."""
    o = VARIANTS[variant]
    ep = epochs or o.get("train.epochs", 13)
    widths = o.get("model.kwargs.widths", [32, 64, 128])
    return ep * (widths[0] / 32) ** 2 * (1.3 if "model.kwargs.convs_per_stage" in o else 1.0)


def summarise(rows: list[dict], header: str) -> str:
    """Markdown: per-variant means over seeds sorted by TTA accuracy, then every run."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)

    def mean(rs: list[dict], key: str) -> float:
        return statistics.fmean(r[key] for r in rs)

    base_tta = mean(by["base"], "test_acc_tta") if "base" in by else None
    order = sorted(by, key=lambda v: -mean(by[v], "test_acc_tta"))
    lines = [
        header,
        "",
        "| variant | changes | seeds | test % | test TTA % | min TTA % | TTA vs base | val % "
        "| best ep | epochs | MMACs/img | params | GPU wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in order:
        rs = by[v]
        changes = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in VARIANTS[v].items()) or "–"
        delta = "–" if base_tta is None else f"{100 * (mean(rs, 'test_acc_tta') - base_tta):+.2f}"
        lines.append(
            f"| {v} | {changes} | {','.join(str(r['seed']) for r in rs)} "
            f"| {100 * mean(rs, 'test_acc'):.2f} | **{100 * mean(rs, 'test_acc_tta'):.2f}** "
            f"| {100 * min(r['test_acc_tta'] for r in rs):.2f} | {delta} "
            f"| {100 * mean(rs, 'val_acc'):.2f} | {mean(rs, 'best_epoch'):.1f} "
            f"| {rs[0]['epochs']} | {rs[0]['macs'] / 1e6:.1f} | {rs[0]['params']:,} "
            f"| {mean(rs, 'train_wall_s'):.0f} |"
        )
    lines += [
        "",
        "Every run (test / TTA / val accuracy %, best epoch, train wall s):",
        "",
        "| variant | seed | test | TTA | val | best ep | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (order.index(r["variant"]), r["seed"])):
        lines.append(
            f"| {r['variant']} | {r['seed']} | {100 * r['test_acc']:.2f} "
            f"| {100 * r['test_acc_tta']:.2f} | {100 * r['val_acc']:.2f} | {r['best_epoch']} "
            f"| {r['train_wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def log(out: Path, msg: str) -> None:
    """A line to stdout and to sweep.log."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "sweep.log", "a") as fh:
        fh.write(line + "\n")


def sweep(args: argparse.Namespace) -> None:
    """Queue the runs, keep `--parallel` of them going, collect results until the budget ends."""
    t0 = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imgcls-sweep-"))
    sizes = prepare_data(args.idx_dir, work, args.limit)
    variants = args.variants or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    # Every variant's first seed before any second one; within a seed, the longest runs first.
    queue = [
        (v, s)
        for s in [*args.seeds, *args.extra_seeds]
        for v in sorted(variants, key=lambda v: -est_cost(v, args.epochs))
    ]
    gpu = "cpu"
    if args.device == "cuda":
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    header = (
        f"Fashion-MNIST recipe sweep, {gpu}, train precision {args.precision}, "
        f"{args.parallel} trainings at once x {args.workers} DataLoader workers, "
        f"{os.cpu_count()} CPUs ({cpu_name()}); "
        f"train pool {sizes['train']} (val hold-out 0.075/0.925 per class), test {sizes['t10k']}; "
        f"base = params/fashion-mnist.yaml over params.yaml; test in fp32, TTA = mean softmax "
        f"of x and its horizontal flip"
    )
    log(out, f"{len(queue)} runs queued; data {sizes}; {header}")
    rows: list[dict] = []
    running: dict[subprocess.Popen, tuple[str, int, float, Path, Path]] = {}
    per_epoch: list[float] = []  # wall s per epoch of finished runs (at this concurrency)
    startup: list[float] = []
    failures = 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    while queue or running:
        now = time.monotonic() - t0
        while queue and len(running) < args.parallel and now < args.budget_s:
            variant, seed = queue[0]
            epochs = args.epochs or VARIANTS[variant].get("train.epochs", 13)
            if per_epoch:
                est = statistics.median(startup) + statistics.median(per_epoch) * epochs
                if now + est > args.hard_s:
                    queue.pop(0)
                    log(out, f"skip {variant} seed {seed}: ~{est:.0f}s would pass --hard-s")
                    continue
            queue.pop(0)
            result_path = work / f"{variant}_{seed}.json"
            log_path = work / f"{variant}_{seed}.log"
            spec = {
                "variant": variant,
                "seed": seed,
                "data": str(work),
                "device": args.device,
                "precision": args.precision,
                "workers": args.workers,
                "epochs": args.epochs,
                "result": str(result_path),
            }
            with open(log_path, "w") as fh:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            running[proc] = (variant, seed, time.monotonic(), result_path, log_path)
            log(out, f"start {variant} seed {seed} ({len(running)} running)")
        time.sleep(0.5)
        now = time.monotonic() - t0
        for proc in list(running):
            variant, seed, started, result_path, log_path = running[proc]
            if proc.poll() is None and now < args.hard_s:
                continue
            if proc.poll() is None:
                os.killpg(proc.pid, 9)  # the DataLoader workers too
                proc.wait()
                progress = result_path.with_suffix(".progress.json")
                seen = json.loads(progress.read_text()) if progress.exists() else []
                log(out, f"killed {variant} seed {seed} at --hard-s after epochs {seen}")
                with open(out / "results.jsonl", "a") as fh:
                    partial = {"variant": variant, "seed": seed, "killed": True, "epochs": seen}
                    fh.write(json.dumps(partial) + "\n")
            del running[proc]
            took = time.monotonic() - started
            if proc.returncode == 0 and result_path.exists():
                row = json.loads(result_path.read_text())
                row["process_wall_s"] = round(took, 1)
                rows.append(row)
                per_epoch.append(row["train_wall_s"] / row["epochs"])
                startup.append(took - row["train_wall_s"])
                with open(out / "results.jsonl", "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                (out / "summary.md").write_text(summarise(rows, header))
                log(
                    out,
                    f"done {variant} seed {seed}: test {row['test_acc']:.4f} "
                    f"tta {row['test_acc_tta']:.4f} val {row['val_acc']:.4f} "
                    f"best {row['best_epoch']}/{row['epochs']} {took:.0f}s",
                )
            elif proc.returncode != -9:
                tail = log_path.read_text()[-1500:] if log_path.exists() else ""
                log(out, f"FAILED {variant} seed {seed} rc={proc.returncode}:\n{tail}")
                failures += 1
                if failures >= args.parallel and not rows:
                    log(out, "every run so far failed: stopping the sweep")
                    queue.clear()
        if now >= args.hard_s and queue:
            log(out, f"--hard-s reached: {len(queue)} queued runs not started")
            queue.clear()
    if queue:
        log(out, f"--budget-s reached: {len(queue)} queued runs not started")
    log(out, f"sweep finished: {len(rows)} runs in {time.monotonic() - t0:.0f}s")
    if rows:
        (out / "summary.md").write_text(summarise(rows, header))


def main() -> None:
    """Parent (the sweep) or child (`--child SPEC`: one run, result JSON to SPEC's path)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--idx-dir", type=Path, default=IDX_DIR)
    ap.add_argument("--variants", nargs="*", default=None, help=f"of: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--extra-seeds", nargs="*", type=int, default=[3], help="if time allows")
    ap.add_argument("--parallel", type=int, default=5, help="trainings at once")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per training")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", help="bf16 | fp32 | fp16 (train autocast)")
    ap.add_argument("--budget-s", type=float, default=300, help="no run starts after this")
    ap.add_argument("--hard-s", type=float, default=420, help="running ones are stopped here")
    ap.add_argument("--limit", type=int, default=None, help="cap train and test images (smoke)")
    ap.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(run_one(spec)))
        return
    sweep(args)


if __name__ == "__main__":
    main()
