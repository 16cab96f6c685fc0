"""Whole `dvc repro` on the default params: one commit against another, interleaved (issue 16).

Each commit's project files (`git archive`) go into a fresh git repo; `dvc repro` runs there
with that copy's own `src/` first on PYTHONPATH, so every stage imports the commit's code, not
the editable install's. Rounds alternate A, B, A, B, ... so a change in machine load hits both.

    .venv/bin/python bench/bench_repro_commits.py 7462982 HEAD --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from project import REPO, bench_env, commit

FILES = ["params.yaml", "dvc.yaml", "pipeline", "src", ".dvc/config", ".dvcignore"]


def checkout(rev: str, dest: Path) -> Path:
    """The project files of `rev` in a new git repo at `dest`."""
    blob = subprocess.run(
        ["git", "archive", "--format=tar", rev, *FILES], cwd=REPO, capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    (dest / ".gitignore").write_text("/mlflow.db\n/data/cache/\n")
    commit(dest, f"bench {rev}", init=True)
    return dest


def repro(root: Path) -> tuple[float, float]:
    """Wall seconds of `dvc repro` from scratch, and the test accuracy it reached."""
    env = bench_env({"PYTHONPATH": str(root / "src")})
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {root}:\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return wall, json.loads((root / "metrics/eval.json").read_text())["accuracy"]


def main() -> None:
    """Interleaved rounds; medians per commit."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a", help="the old commit (e.g. 7462982)")
    ap.add_argument("b", nargs="?", default="HEAD", help="the new commit (default HEAD)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {args.a: [], args.b: []}
    print(f"load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for rev in (args.a, args.b):
                wall, acc = repro(checkout(rev, Path(tmp) / f"{r}-{rev}"))
                times[rev].append(wall)
                print(f"round {r + 1} {rev}: {wall:.1f} s, test accuracy {acc:.4f}", flush=True)
    print(f"load after: {os.getloadavg()}")
    for rev, walls in times.items():
        print(f"{rev}: median {statistics.median(walls):.1f} s  (min {min(walls):.1f} s) {walls}")
    ratio = statistics.median(times[args.b]) / statistics.median(times[args.a])
    print(f"{args.b} / {args.a}: {ratio:.3f}")


if __name__ == "__main__":
    main()
