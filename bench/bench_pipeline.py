"""Wall time of `dvc repro` on the default params (issue 2: the whole pipeline < 2 min on 2 CPUs).

Copies the project's pipeline files into a fresh git repo in a temp folder (so the working
tree's own outputs are untouched), runs `dvc repro` there with the venv first on PATH, and
prints the wall time per stage and in total, plus the test accuracy reached.

    .venv/bin/python bench/bench_pipeline.py
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from project import bench_env, copy_project


def main() -> None:
    """Run the pipeline once from scratch and report stage timings."""
    env = bench_env()
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_project(Path(tmp) / "proj")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        marks: list[tuple[str, float]] = []
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("Running stage"):
                marks.append((line.split("'")[1], time.perf_counter()))
        if proc.wait() != 0:
            raise SystemExit("dvc repro failed")
        total = time.perf_counter() - t0
        ends = [t for _, t in marks[1:]] + [t0 + total]
        for (stage, start), end in zip(marks, ends, strict=True):
            print(f"{stage:<9} {end - start:6.1f} s")
        metrics = json.loads((root / "metrics/eval.json").read_text())
        print(f"{'total':<9} {total:6.1f} s   test accuracy {metrics['accuracy']:.4f}")


if __name__ == "__main__":
    main()
