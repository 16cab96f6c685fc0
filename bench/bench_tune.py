"""`imgcls tune` as a user runs it: best trial vs the default params, trials pruned, wall time.

    .venv/bin/python bench/bench_tune.py                              # digits, 12 trials
    .venv/bin/python bench/bench_tune.py --preset fashion-mnist --n-trials 20 --timeout 3600
    .venv/bin/python bench/bench_tune.py --preset fashion-mnist --epochs 4 --n-trials 8 --reproduce
    .venv/bin/python bench/bench_tune.py --reproduce                  # + dvc exp run of the best

A fresh copy of the project (the repository's params.yaml with its default `tune:` space), then
`dvc repro split` and `imgcls tune --n-trials N`, timed. Trial 0 of the study trains
params.yaml's own values (`tune.baseline_first`), so "best vs default" compares two trials of
the same study: same data, seed and epochs. `--preset fashion-mnist` uses Debian's
`dataset-fashion-mnist` IDX files with the shipped preset (params/fashion-mnist.yaml) and its
split; `--epochs N` searches at a shorter schedule (every trial and the reproduction use N).
`--reproduce` also runs the printed `dvc exp run -S ...` command and checks that the experiment's
val metric equals the best trial's (it then evaluates on the test split too).

Prints one JSON object: wall times, trials complete / pruned / failed, best and baseline values,
the best params, the dvc command and (with --reproduce) the experiment's val and test figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import bench_env, commit, copy_project


def configure(root: Path, preset: str, epochs: int | None = None) -> None:
    """Point the copy at the preset's data (digits: the repository's defaults unchanged)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    if preset != "digits":
        from bench_train_fashion import DATA, IDX_DIR, RECIPES
        from common import overlay

        if not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit(f"{IDX_DIR}: missing; apt-get install dataset-fashion-mnist")
        # the shipped preset (params/fashion-mnist.yaml) over params.yaml, as users apply it
        params = overlay(params, overlay(DATA, RECIPES["preset"]))
    if epochs is not None:  # a search at a shorter schedule than the recipe's
        params["train"]["epochs"] = epochs
    if preset != "digits" or epochs is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commit(root)


def run(cmd: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command in the copy; fail loudly with its output."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=bench_env(), capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, took


def main() -> None:
    """Tune in a fresh copy and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=["digits", "fashion-mnist"], default="digits")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--reproduce", action="store_true", help="also run the printed dvc command")
    ap.add_argument("--keep", type=Path, help="work here (kept) instead of a temp folder")
    ap.add_argument("--epochs", type=int, help="train.epochs for every trial (a shorter search)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_project(args.keep or Path(tmp) / "proj")
        configure(root, args.preset, args.epochs)
        _, split_s = run(["dvc", "repro", "split"], root)
        cmd = ["imgcls", "tune", "--n-trials", str(args.n_trials), "--jobs", str(args.jobs)]
        cmd += ["--timeout", str(args.timeout)] if args.timeout else []
        _, tune_s = run(cmd, root)
        best = yaml.safe_load((root / "reports/tune/best.yaml").read_text())
        load = os.getloadavg()
        out = {
            "preset": args.preset,
            "epochs": yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"],
            "cpus": os.cpu_count(),
            "load_average_1m_after": round(load[0], 2),
            "split_s": round(split_s, 1),
            "tune_wall_s": round(tune_s, 1),
            "trials": best["trials"],
            "metric": best["metric"],
            "baseline_value": best["baseline_value"],
            "best_value": best["best_value"],
            "best_trial": best["best_trial"],
            "best_params": best["best_params"],
            "dvc_command": best["dvc_command"],
        }
        if args.reproduce:
            _, exp_s = run(shlex.split(best["dvc_command"]), root)
            details = json.loads((root / "reports/train_details.json").read_text())
            test = json.loads((root / "metrics/eval.json").read_text())
            out |= {
                "dvc_exp_s": round(exp_s, 1),
                "dvc_exp_val": details[best["metric"]],
                "dvc_exp_val_equals_trial": abs(details[best["metric"]] - best["best_value"])
                < 1e-6,
                "dvc_exp_test": test,
            }
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
