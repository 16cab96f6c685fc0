"""Benchmark: N images as files vs as tar shards, through DVC and a cold ingest (issue 18).

For each layout, in a fresh git + DVC repository with a local-directory remote, time
`dvc add`, `dvc push`, `dvc pull` (after deleting the data and the DVC cache) and a cold ingest
(`build_manifest`, no ingest cache). Run from the repository root:

    .venv/bin/python bench/bench_shards.py [--images 200000] [--shards 20] [--workers 2]

The images are Fashion-MNIST (Debian's copy in /usr/share/datasets/fashion-mnist/) replicated
to `--images`; each replica changes one corner pixel so that every file is distinct (DVC
deduplicates identical content, which would flatter the files layout). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.config import DataConfig
from imgcls.data.manifest import build_manifest
from imgcls.data.sources import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
BIN = Path(sys.executable).parent


def pngs(n: int) -> list[tuple[int, bytes]]:
    """(label, PNG bytes) of `n` distinct images: Fashion-MNIST, replicated."""
    images = np.concatenate(
        [read_idx(FASHION / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")]
    )
    labels = np.concatenate(
        [read_idx(FASHION / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]
    )
    out = []
    for i in range(n):
        img = images[i % len(images)].copy()
        img[0, 0] = (int(img[0, 0]) + 37 * (i // len(images))) % 256  # replicas differ
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append((int(labels[i % len(images)]), buf.getvalue()))
    return out


def write_files(root: Path, data: list[tuple[int, bytes]]) -> Path:
    """data/images/<label>/<index>.png."""
    folder = root / "data/images"
    for label in {lab for lab, _ in data}:
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (label, png) in enumerate(data):
        (folder / str(label) / f"{i:06d}.png").write_bytes(png)
    return folder


def write_shards(root: Path, data: list[tuple[int, bytes]], n_shards: int) -> Path:
    """data/shards/shard-NNN.tar with `<index>.png` + `<index>.cls` members."""
    folder = root / "data/shards"
    folder.mkdir(parents=True)
    per = -(-len(data) // n_shards)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(s * per, min(len(data), (s + 1) * per)):
                label, png = data[i]
                for name, blob in ((f"{i:06d}.png", png), (f"{i:06d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    return folder


def run(cmd: list[str], cwd: Path) -> float:
    """Seconds a command took (it must succeed)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return took


def measure(root: Path, rel: str, source: object, workers: int, dvc: bool) -> dict[str, float]:
    """dvc add / push / pull (unless not `dvc`) and a cold ingest of `rel` in `root`."""
    out = {"add": float("nan"), "push": float("nan"), "pull": float("nan")}
    if dvc:
        remote = root.parent / f"{root.name}-remote"
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            run(cmd, root)
        run(["dvc", "remote", "add", "-d", "local", str(remote)], root)
        out = {"add": run(["dvc", "add", rel], root), "push": run(["dvc", "push"], root)}
        shutil.rmtree(root / rel)
        shutil.rmtree(root / ".dvc/cache")
        out["pull"] = run(["dvc", "pull"], root)
    cfg = DataConfig.model_validate({"source": source, "workers": workers})
    start = time.perf_counter()
    df = build_manifest(cfg, root, root / "data/raw", progress=False)
    out["ingest"] = time.perf_counter() - start
    if (df["error"] != "").any():
        raise SystemExit(f"{rel}: {int((df['error'] != '').sum())} rows with errors")
    out["rows"] = len(df)
    out["tracked_files"] = sum(1 for _ in (root / rel).rglob("*") if _.is_file())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ingest-only", action="store_true", help="skip the DVC commands")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a tmp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = pngs(args.images)
    print(f"encoded {len(data)} PNGs in {time.perf_counter() - start:.1f} s", flush=True)
    results = {}
    try:
        files_root, shards_root = work / "files", work / "shards"
        files_root.mkdir()
        shards_root.mkdir()
        t = time.perf_counter()
        write_files(files_root, data)
        print(f"wrote files in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        write_shards(shards_root, data, args.shards)
        print(f"wrote shards in {time.perf_counter() - t:.1f} s", flush=True)
        del data
        results["files"] = measure(
            files_root, "data/images", "data/images", args.workers, not args.ingest_only
        )
        print("files:", results["files"], flush=True)
        source = {"kind": "shards", "path": "data/shards"}
        results["shards"] = measure(
            shards_root, "data/shards", source, args.workers, not args.ingest_only
        )
        print("shards:", results["shards"], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.images:,} images, {args.workers} ingest workers\n")
    print("| layout | tracked files | dvc add | dvc push | dvc pull | cold ingest |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        label = name if name == "files" else f"{args.shards} shards"
        print(
            f"| {label} | {r['tracked_files']:,} | {r['add']:.1f} s | {r['push']:.1f} s | "
            f"{r['pull']:.1f} s | {r['ingest']:.1f} s |"
        )


if __name__ == "__main__":
    main()
