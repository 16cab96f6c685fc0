"""Benchmark ingest on 70,000 small PNG files (Fashion-MNIST written out as files).

Targets (issue 3): a cold ingest of 70,000 PNG files in <= 60 s on 2 cores, and a re-ingest with
nothing changed in <= 10 s. Run from the repository root:

    .venv/bin/python bench/bench_ingest.py [--workers 2] [--keep DIR]

Uses the Debian `dataset-fashion-mnist` copy when installed; otherwise 70,000 random 28x28 images
written as IDX files (random pixels compress worse than clothes, so that is the harder case).
Steps, each timed in this process:
  1. first ingest of the `fashion-mnist` preset: IDX -> 70,000 PNG files, then inspect them all;
  2. cold ingest of the existing PNG files (the per-file cache deleted): the <= 60 s target;
  3. re-ingest with nothing changed: the <= 10 s target (also timed as a fresh process).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imgcls.config import DataConfig
from imgcls.data.manifest import CACHE_DIR, build_manifest
from imgcls.data.sources import presets

TARGET_COLD_S = 60.0
TARGET_REINGEST_S = 10.0


def _synthetic_idx(folder: Path) -> Path:
    """Write 60,000 + 10,000 random 28x28 images and labels as gzip IDX files."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        for kind, arr in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8)),
        ):
            header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
                struct.pack(">I", d) for d in arr.shape
            )
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb", compresslevel=1) as fh:
                fh.write(header + arr.tobytes())
    return folder


def _timed(label: str, cfg: DataConfig, root: Path) -> float:
    """Run build_manifest once and print how long it took."""
    start = time.perf_counter()
    df = build_manifest(cfg, root, root / "data" / "raw", progress=False)
    took = time.perf_counter() - start
    bad = int((df["error"] != "").sum())
    print(f"{label:<44} {took:7.2f} s  ({len(df)} rows, {bad} errors)", flush=True)
    return took


def _fresh_process(root: Path, workers: int) -> float:
    """Re-ingest in a new interpreter (imports included), as `dvc repro` would run it."""
    code = (
        "from pathlib import Path; from imgcls.config import DataConfig; "
        "from imgcls.data.manifest import build_manifest; "
        f"build_manifest(DataConfig(source='fashion-mnist', workers={workers}), Path('.'), "
        "Path('data/raw'), progress=False)"
    )
    start = time.perf_counter()
    env = {**os.environ, "IMGCLS_BENCH_LOCAL": str(presets.FASHION_LOCAL_DIRS[0])}
    subprocess.run([sys.executable, "-c", _with_local(code)], cwd=root, check=True, env=env)
    return time.perf_counter() - start


def _with_local(code: str) -> str:
    """Prefix `code` so the child uses the same local IDX folder as this process."""
    return (
        "import os; from pathlib import Path; from imgcls.data.sources import presets; "
        "presets.FASHION_LOCAL_DIRS = (Path(os.environ['IMGCLS_BENCH_LOCAL']),); " + code
    )


def main() -> int:
    """Run the three timed steps and report them against the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="data.workers (default 2)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="imgcls-bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    local = next(
        (d for d in presets.FASHION_LOCAL_DIRS if (d / "t10k-images-idx3-ubyte.gz").is_file()), None
    )
    if local is None:
        local = _synthetic_idx(work / "idx")
        presets.FASHION_LOCAL_DIRS = (local,)
        print(f"dataset-fashion-mnist not installed: using synthetic IDX files in {local}")
    else:
        print(f"using the Fashion-MNIST IDX files in {local}")
    print(f"work folder: {work}; workers: {args.workers}; CPUs: {os.cpu_count()}")

    cfg = DataConfig(source="fashion-mnist", workers=args.workers)
    try:
        first = _timed("1. first ingest (IDX -> 70k PNG + inspect)", cfg, work)
        shutil.rmtree(work / "data" / "raw" / CACHE_DIR)
        cold = _timed("2. cold ingest of 70k existing PNG files", cfg, work)
        again = _timed("3. re-ingest, nothing changed", cfg, work)
        fresh = _fresh_process(work, args.workers)
        print(f"{'3b. re-ingest in a fresh process':<44} {fresh:7.2f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    ok_cold = cold <= TARGET_COLD_S
    ok_again = max(again, fresh) <= TARGET_REINGEST_S
    print(f"target cold <= {TARGET_COLD_S:.0f} s: {'met' if ok_cold else 'MISSED'} ({cold:.1f} s)")
    print(
        f"target re-ingest <= {TARGET_REINGEST_S:.0f} s: {'met' if ok_again else 'MISSED'} "
        f"({again:.1f} s in-process, {fresh:.1f} s fresh process); first ingest {first:.1f} s"
    )
    return 0 if ok_cold and ok_again else 1


if __name__ == "__main__":
    sys.exit(main())
