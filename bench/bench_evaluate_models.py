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


def time_evaluate(root: Path, log_model: bool) -> float:
    """Wall time of one evaluate stage with `tracking.log_model` set as given."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["log_model"] = log_model
    (root / "params.bench.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = bench_env({"PYTHONPATH": str(root / "src"), "DVC_ROOT": str(root)})
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*CMD, "--params", "params.bench.yaml"], cwd=root, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return elapsed


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
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.repeats):
            for mode in (False, True) if i % 2 == 0 else (True, False):
                times[mode].append(time_evaluate(root, mode))
                print(f"  log_model {mode!s:5s} {times[mode][-1]:6.2f} s", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"evaluate stage, median of {args.repeats}: without models {off:.2f} s, ", end="")
    print(f"with models {on:.2f} s; model logging adds {on - off:.2f} s")


if __name__ == "__main__":
    main()
