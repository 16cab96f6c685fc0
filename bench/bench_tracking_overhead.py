"""MLflow tracking overhead: train-stage wall and CPU time, tracking on vs off (target <= 2 %).

Run: .venv/bin/python bench/bench_tracking_overhead.py [--repeats 5] [--epochs 15]

Builds a throw-away project (default params: sklearn digits, simple_cnn, 16 px), runs the data
stages once with `dvc repro split`, then times `python pipeline/train.py` (exactly the command
DVC runs) in fresh interpreters, interleaving two modes:

  off          tracking.enabled: false
  on           tracking on (system metrics too), SQLite store at the project root

Each run reports wall time and CPU time (user + sys of the train process and its logger
process): on a machine shared with other work the wall time is noisy, the CPU time much less.

The train stage logs no model (issue 16: the evaluate stage logs both, once evaluated; its cost
is measured with the evaluate stage).

Every mode starts from the same state (checkpoint removed, the SQLite store already created by a
warm-up run: its one-time schema creation is reported separately). Then, inside one process, the
individual costs: importing mlflow, starting the run, one per-epoch `log_metrics` batch and the
augmentation grid. All of these but the probe run in the low-priority
MLflow logger process (`tracking.RunProcess`), overlapped with the train stage's imports,
decoding and training; the table shows what they cost, the wall-time modes what is left of it.
The last line is the verdict against the issue's target.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from project import BIN, commit, copy_project


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> float:
    """Run a command; return its wall time in seconds (raise on failure)."""
    return timed(*cmd, cwd=cwd, env=env)[0]


def timed(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command; (wall s, CPU s: user + sys of it and every process it waited for)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    # The project's own copy of `src/` wins over the venv's editable install, so that a run
    # measures the snapshot taken at the start even while someone edits the repository.
    env["PYTHONPATH"] = str(cwd / "src")
    env.pop("MLFLOW_TRACKING_URI", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    # The train stage waits for its logger process, so the logger's CPU time is counted too.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def make_project(dest: Path, epochs: int, image_size: int, cpu_threads: int | None = None) -> Path:
    """Copy the pipeline into a fresh git repo and run the data stages."""
    copy_project(dest)
    set_params(dest, epochs=epochs, image_size=image_size, cpu_threads=cpu_threads)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True)
    if status.stdout.strip():  # the defaults already match: nothing to commit (git fails then)
        commit(dest)
    sh("dvc", "repro", "split", cwd=dest, env={"DVC_NO_ANALYTICS": "1"})
    return dest


def set_params(
    root: Path,
    *,
    epochs: int | None = None,
    image_size: int | None = None,
    cpu_threads: int | None = None,
    **tracking: object,
) -> None:
    """Edit the project's params.yaml in place."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    if cpu_threads is not None:
        params["train"]["cpu_threads"] = cpu_threads
    if epochs is not None:
        params["train"]["epochs"] = epochs
    if image_size is not None:
        params["train"]["image_size"] = image_size
    params["tracking"].update(tracking)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


MODES = {
    "off": {"enabled": False},
    "on": {"enabled": True, "system_metrics": True},
}


def time_train(root: Path, mode: str) -> tuple[float, float]:
    """(wall s, CPU s) of one train stage (and its logger) in a fresh interpreter."""
    set_params(root, **MODES[mode])
    shutil.rmtree(root / "models/checkpoints", ignore_errors=True)
    return timed(sys.executable, "pipeline/train.py", cwd=root, env={"DVC_ROOT": str(root)})


def component_costs(root: Path, epochs: int, size: int) -> dict[str, float]:
    """Seconds for each tracking step, measured in a fresh interpreter."""
    code = f"""
import json, time, os, sys
from pathlib import Path
os.chdir({str(root)!r})
t = time.perf_counter()
import mlflow.tracking
out = {{"import mlflow": time.perf_counter() - t}}
import numpy as np
from imgcls.config import load_params
from imgcls.data.augment import build_transform
from imgcls.tracking import Run, start_train_run
from imgcls.training.figures import augmentation_grid
from imgcls.data.dataset import load_split_data
params = load_params("params.yaml")
data = load_split_data(Path("data/processed/splits.csv"), Path.cwd(), {size}, "auto",
                       Path("data/cache"), progress=False)
t = time.perf_counter()
bg = start_train_run(params, splits_csv=Path("data/processed/splits.csv"),
                     reports_dir=Path("reports"), device="cpu")
out["start_train_run: blocking part (probe + spawn logger)"] = time.perf_counter() - t
bg.begin()
run_id = bg.run_id
out["  + logger process: import mlflow, create run, params, artifacts"] = (
    time.perf_counter() - t)
bg.join()
run = Run(bg.uri, run_id)
t = time.perf_counter()
grid = augmentation_grid(*data.part("train"), data.classes, build_transform(params.augment.train))
run.log_image(grid, "figures/augmentation_grid.png")
out["augmentation grid (render in train + log)"] = time.perf_counter() - t
row = {{k: 0.5 for k in ("lr", "train_loss", "train_accuracy", "epoch_time_s", "images_per_s",
       "val_loss", "val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro")}}
t = time.perf_counter()
for epoch in range(1, {epochs} + 1):
    run.log_metrics(row, step=epoch)
out["per-epoch log_metrics (mean of {epochs}; logger)"] = (time.perf_counter() - t) / {epochs}
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
monitor = SystemMetricsMonitor(run_id, tracking_uri=run.uri)
t = time.process_time()
for _ in range(20):  # what the sampling thread does every 10 s
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()
sample = (time.process_time() - t) / 20
out["system metrics: one sample (psutil + log_batch), CPU s"] = sample
out["system metrics: share of one core at one sample per 10 s, %"] = 100 * sample / 10
run.end()
assert not run.not_logged, run.not_logged
print(json.dumps(out))
"""
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": str(root / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes share the machine)."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    """Build the project, time the modes interleaved, print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=16, help="train.image_size (default 16)")
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="train.cpu_threads (default: params.yaml's, i.e. one per core); 1 leaves the "
        "second core of a 2-core box to the logger",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-") as tmp:
        root = make_project(Path(tmp) / "proj", args.epochs, args.image_size, args.cpu_threads)
        print(f"load average at start: {load_average()}", flush=True)
        t0 = time.perf_counter()
        time_train(root, "on")  # warm-up: decodes the image cache, creates mlflow.db
        print(f"warm-up train stage (creates mlflow.db schema): {time.perf_counter() - t0:.1f} s")
        times: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(args.repeats):
            for mode in MODES if i % 2 == 0 else reversed(list(MODES)):
                wall, used = time_train(root, mode)
                times[mode].append(wall)
                cpu[mode].append(used)
                print(f"  {mode:9s} {wall:6.2f} s wall {used:6.2f} s CPU", flush=True)
        set_params(root, **MODES["on"])
        costs = component_costs(root, args.epochs, args.image_size)
    off = statistics.median(times["off"])
    print(
        f"\ntrain stage, {args.epochs} epochs at {args.image_size} px, "
        f"train.cpu_threads {args.cpu_threads or 'default'}, median of {args.repeats}"
        " (min in brackets)\n"
    )
    cpu_off = statistics.median(cpu["off"])
    print("| mode | wall s | vs off | CPU s (stage + logger) | vs off |")
    print("|---|---|---|---|---|")
    for mode, values in times.items():
        med, used = statistics.median(values), statistics.median(cpu[mode])
        print(
            f"| {mode} | {med:.2f} ({min(values):.2f}) | {100 * (med - off) / off:+.1f} % "
            f"| {used:.2f} ({min(cpu[mode]):.2f}) | {100 * (used - cpu_off) / cpu_off:+.1f} % |"
        )
    verdicts = []
    for mode in ("on",):
        pct = 100 * (statistics.median(times[mode]) - off) / off
        pct_cpu = 100 * (statistics.median(cpu[mode]) - cpu_off) / cpu_off
        verdicts.append(
            f"{mode} wall {pct:+.1f} % ({'MET' if pct <= 2 else 'NOT met'}), CPU {pct_cpu:+.1f} %"
        )
    print(f"\nVERDICT (target <= 2 % vs off): {'; '.join(verdicts)}; load average {load_average()}")
    print("\n| tracking step (one process) | seconds |")
    print("|---|---|")
    for name, seconds in costs.items():
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
