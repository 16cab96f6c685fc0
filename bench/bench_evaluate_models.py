"""The evaluate stage's added model-logging cost: `pipeline/evaluate.py` with and without models.

Run: .venv/bin/python bench/bench_evaluate_models.py [--repeats 3] [--project DIR]

Needs a project where `dvc repro` ran once on the default params (`--project`; default: builds
a throw-away copy and runs it, minutes). Then times `python pipeline/evaluate.py` (DVC's
command) in fresh interpreters, interleaved: `tracking.log_model: false` (metrics, figures and
artifacts are still logged to the run) vs `true` (plus the `model` and `serving` models). The
difference of the medians is what logging the models at evaluation costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from project import bench_env, copy_project

CMD = [
    sys.executable,
    "pipeline/evaluate.py",
    "--logged-models",
    "models/logged_models.json",
]


def time_evaluate(root: Path, log_model: bool) -> tuple[float, float]:
    """(wall s, CPU s of it and its child processes) of one evaluate stage, log_model as given."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["log_model"] = log_model
    (root / "params.bench.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = bench_env({"PYTHONPATH": str(root / "src"), "DVC_ROOT": str(root)})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*CMD, "--params", "params.bench.yaml"], cwd=root, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    """Time both modes interleaved and print the medians and their difference."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--project", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-") as tmp:
        root = args.project
        if root is None:
            root = copy_project(Path(tmp) / "proj")
            subprocess.run(["dvc", "repro"], cwd=root, env=bench_env(), check=True)
        print(f"load average at start: {load_average()}", flush=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeats):
            for mode in (False, True) if i % 2 == 0 else (True, False):
                wall, used = time_evaluate(root, mode)
                times[mode].append(wall)
                cpu[mode].append(used)
                print(f"  log_model {mode!s:5s} {wall:6.2f} s wall {used:6.2f} s CPU", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(f"evaluate stage, median of {args.repeats}: without models {off:.2f} s, ", end="")
    print(f"with models {on:.2f} s; model logging adds {on - off:.2f} s wall")
    print(f"CPU (stage + children): without {cpu_off:.2f} s, with {cpu_on:.2f} s; ", end="")
    print(f"adds {cpu_on - cpu_off:.2f} s; load average at end: {load_average()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes share the machine)."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
