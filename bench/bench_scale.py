"""Scale bench: the validate and split stages on synthetic manifests of 100k, 1M and 3M rows.

Run: .venv/bin/python bench/bench_scale.py [--rows 100000 1000000] [--quick] [--json out.json]
     [--seed 0] [--near 0.02] [--collisions 0.005] [--classes 10]  (other data shapes)

Each stage runs as DVC runs it, a fresh `python pipeline/validate.py` / `pipeline/split.py` with
their CLI flags, in a work folder that holds the manifest and the image files; the bench reads
the child's wall time, CPU time (user + system) and peak RSS (`ru_maxrss` from `os.wait4`: the
largest single process of the child's tree, thumbnail workers included).

The synthetic manifest has the real columns (imgcls.data.manifest.MANIFEST_COLUMNS) and the
shapes that cost time:

- 10 classes, imbalanced (largest / smallest about 2.5), subject groups of 1..40 rows (geometric,
  mean ~4) inside one class; 10 % of the groups arrive as `source_split=test`.
- 0.5 % undecodable rows (`error` set, no hash), 1 % byte-identical copies (same sha256 and pHash
  as another row of the class, a different group: merging must join them).
- 2 % of the rows are **near-duplicate clusters** (2..6 re-encodes of one image: noise, a
  brightness shift) written as real 32x32 PNG files, whose pHash and sha256 are computed from the
  files: verification decodes them exactly as on real data. Members sit in different groups.
- 0.5 % are **pHash collisions**: distinct real PNG images whose manifest pHash is set 1..4 bits
  from another's (what low-texture images do); verification must reject them on pixels.
- Every other row has a random pHash and sha256 and **no file**: at 64 random bits the chance
  that two are within 4 bits is ~1e-8 per million rows squared, so they are never candidates and
  no stage opens them (if one were, it would count as unverifiable, as a missing file does).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import cpu_name  # noqa: E402
from imgcls.data.imageinfo import phash  # noqa: E402
from imgcls.data.manifest import MANIFEST_COLUMNS  # noqa: E402

CLASSES = 10
NEAR_FRACTION = 0.02
COLLISION_FRACTION = 0.005
COPY_FRACTION = 0.01
ERROR_FRACTION = 0.005
TEST_GROUP_FRACTION = 0.10
SIDE = 32  # file-backed images: 32x32 grayscale PNG
TARGET_1M_S = 180.0  # validate + split at 1M rows
TARGET_1M_RSS_GB = 6.0
TARGET_RATIO = 13.0  # 10x rows: at most 13x time


def _hex(rng: np.random.Generator, n: int, nbytes: int) -> np.ndarray:
    """`n` random lowercase hex strings of `nbytes` bytes each."""
    raw = rng.bytes(n * nbytes).hex().encode()
    return np.frombuffer(raw, dtype=f"S{2 * nbytes}").astype(str)


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A random smooth 32x32 grayscale image (low-frequency noise): structure for pHash."""
    coarse = rng.integers(0, 256, (6, 6)).astype(np.uint8)
    im = Image.fromarray(coarse, "L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float64)


def _png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a grayscale array."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> tuple[str, str]:
    """Write an image file; (sha256, pHash) of it, as ingest would compute them."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:
        return hashlib.sha256(data).hexdigest(), phash(im)


def make_dataset(
    n: int,
    root: Path,
    seed: int = 0,
    near: float = NEAR_FRACTION,
    collisions: float = COLLISION_FRACTION,
    classes: int = CLASSES,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """A synthetic manifest of `n` rows under `root`, and counts of what was planted."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(1.0, 2.5, classes)
    # subject groups inside one class, sizes 1..40 (geometric, mean ~4)
    sizes = np.minimum(rng.geometric(0.25, n), 40)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    group_id = np.repeat(np.arange(sizes.size), sizes)
    group_class = rng.choice(classes, sizes.size, p=weights / weights.sum())
    group_test = rng.random(sizes.size) < TEST_GROUP_FRACTION
    label = group_class[group_id]
    idx = np.arange(n)
    df = pd.DataFrame(
        {
            "path": [
                f"images/c{c}/s{g:07d}_{i:08d}.png"
                for c, g, i in zip(label, group_id, idx, strict=True)
            ],
            "label": np.char.add("c", label.astype(str)),
            "group": np.char.add("s", group_id.astype(str)),
            "source_split": np.where(group_test[group_id], "test", "train"),
            "sha256": _hex(rng, n, 32),
            "width": rng.integers(24, 65, n),
            "height": rng.integers(24, 65, n),
            "mode": "L",
            "format": "PNG",
            "phash": _hex(rng, n, 8),
            "error": "",
        }
    )
    perm = rng.permutation(n)  # disjoint rows for each planted kind
    k_near, k_coll = int(n * near), int(n * collisions)
    k_copy, k_err = int(n * COPY_FRACTION), int(n * ERROR_FRACTION)
    near_rows = np.sort(perm[:k_near])
    coll_rows = np.sort(perm[k_near : k_near + k_coll])
    copy_rows = perm[k_near + k_coll : k_near + k_coll + k_copy]
    err_rows = perm[k_near + k_coll + k_copy : k_near + k_coll + k_copy + k_err]
    plain = perm[k_near + k_coll + k_copy + k_err :]
    cols = {c: df[c].to_numpy(dtype=object) for c in ("label", "sha256", "phash", "path")}
    width, height = df["width"].to_numpy().copy(), df["height"].to_numpy().copy()
    clusters = 0
    # near-duplicate clusters: 2..6 rows of one class, one base image, re-encoded variants
    at = 0
    while at < near_rows.size:
        size = min(int(rng.integers(2, 7)), near_rows.size - at)
        members = near_rows[at : at + size]
        at += size
        clusters += 1
        base = _texture(rng)
        for k, r in enumerate(members):
            cols["label"][r] = cols["label"][members[0]]
            noise = rng.normal(0, 1.5, base.shape) if k else 0.0
            data = _png(base + noise + (rng.uniform(-6, 6) if k else 0.0))
            cols["sha256"][r], cols["phash"][r] = _write(root, cols["path"][r], data)
            width[r] = height[r] = SIDE
    # pHash collisions: different images, manifest hashes 1..4 bits from the previous one
    for k, r in enumerate(coll_rows):
        cols["sha256"][r], h = _write(root, cols["path"][r], _png(_texture(rng)))
        if k % 2:  # every second one collides with the one before
            flip = 0
            for b in rng.choice(64, int(rng.integers(1, 5)), replace=False):
                flip |= 1 << int(b)
            h = f"{int(cols['phash'][coll_rows[k - 1]], 16) ^ flip:016x}"
        cols["phash"][r] = h
        width[r] = height[r] = SIDE
    # byte-identical copies of a plain row of the same class, under another group
    by_class = pd.Series(plain).groupby(df["label"].to_numpy()[plain]).apply(np.asarray)
    for r in copy_rows:
        pool = by_class[cols["label"][r]]
        src = int(pool[rng.integers(0, pool.size)])
        cols["sha256"][r], cols["phash"][r] = cols["sha256"][src], cols["phash"][src]
        width[r], height[r] = width[src], height[src]
    for c in ("label", "sha256", "phash"):
        df[c] = cols[c]
    df["width"], df["height"] = width, height
    df.loc[err_rows, ["mode", "format", "phash"]] = ""  # the bytes were read: sha256 stays
    df["width"] = df["width"].astype("Int64")
    df["height"] = df["height"].astype("Int64")
    df.loc[err_rows, ["width", "height"]] = pd.NA
    df.loc[err_rows, "error"] = "truncated"
    planted = {
        "rows": n,
        "groups": int(sizes.size),
        "files": int(k_near + k_coll),
        "near_duplicate_rows": int(k_near),
        "near_duplicate_clusters": clusters,
        "collision_rows": int(k_coll),
        "copies": int(k_copy),
        "errors": int(k_err),
    }
    return df[MANIFEST_COLUMNS], planted


def timed(cmd: list[str], cwd: Path) -> dict[str, object]:
    """Run `cmd` in `cwd`, wait with os.wait4 for its exact resource usage."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    log_path = cwd / f"{Path(cmd[1]).stem}.log"
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),  # Linux: KiB
        "rc": proc.returncode,
        "tail": tail,
    }


def bench_size(n: int, work: Path, seed: int, **shape: float) -> dict[str, object]:
    """Make the data for `n` rows, run validate then split; figures per stage."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    df, planted = make_dataset(n, work, seed, **shape)  # type: ignore[arg-type]
    df.to_csv(work / "manifest.csv", index=False)
    make_s = time.perf_counter() - t0
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    py = sys.executable
    validate = [
        py,
        str(REPO / "pipeline/validate.py"),
        "--params=params.yaml",
        "--manifest=manifest.csv",
        "--valid=valid.csv",
        "--near-duplicates=near_duplicates.csv",
        "--report=reports/validation.json",
        "--markdown=reports/validation.md",
        "--figure=reports/validation_groups.png",
    ]
    split = [
        py,
        str(REPO / "pipeline/split.py"),
        "--params=params.yaml",
        "--valid=valid.csv",
        "--near-duplicates=near_duplicates.csv",
        "--splits=splits.csv",
        "--report=reports/split.json",
        "--markdown=reports/split.md",
        "--figure=reports/split_excluded.png",
    ]
    load_before = os.getloadavg()[0]
    stages = {"validate": timed(validate, work)}
    if stages["validate"]["rc"] == 0:
        stages["split"] = timed(split, work)
    result: dict[str, object] = {
        "rows": n,
        "make_s": round(make_s, 1),
        "planted": planted,
        "stages": stages,
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    report = work / "reports/validation.json"
    if report.is_file():
        s = json.loads(report.read_text())["summary"]
        result["validation"] = {
            k: s.get(k)
            for k in (
                "near_duplicate_candidates",
                "near_duplicate_verified_pairs",
                "near_duplicate_unverifiable_pairs",
                "near_duplicate_clusters",
                "merged_groups",
                "largest_merged_group",
            )
        }
    return result


def markdown(results: list[dict[str, object]]) -> str:
    """A table of the figures, with the 10x ratio where both sizes ran."""
    lines = [
        "| rows | stage | wall s | CPU s | peak RSS GB | load (1 min) |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        for name, s in r["stages"].items():  # type: ignore[union-attr]
            load = r["load_1min"]
            lines.append(
                f"| {r['rows']:,} | {name} | {s['wall_s']} | {s['cpu_s']} | {s['peak_rss_gb']} "
                f"| {load[0]} -> {load[1]} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Bench each size; print a table and the checks against the targets."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20,000 rows only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near", type=float, default=NEAR_FRACTION, help="share of rows in clusters")
    ap.add_argument("--collisions", type=float, default=COLLISION_FRACTION)
    ap.add_argument("--classes", type=int, default=CLASSES)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data here")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    rows = [20_000] if args.quick else args.rows
    base = args.workdir or Path(tempfile.mkdtemp(prefix="imgcls-scale-"))
    results = []
    try:
        for n in rows:
            shape = {"near": args.near, "collisions": args.collisions, "classes": args.classes}
            r = bench_size(n, base / f"rows{n}", args.seed, **shape)
            results.append(r)
            print(json.dumps(r, indent=1), flush=True)
            if not args.workdir:
                shutil.rmtree(base / f"rows{n}", ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; load now {os.getloadavg()}")
    print(markdown(results))
    total = {r["rows"]: sum(s["wall_s"] for s in r["stages"].values()) for r in results}
    for r in results:
        if any(s["rc"] != 0 for s in r["stages"].values()):
            print(f"FAILED stage at {r['rows']} rows: see the tails above")
    if 1_000_000 in total:
        r1m = next(r for r in results if r["rows"] == 1_000_000)
        peak = max(s["peak_rss_gb"] for s in r1m["stages"].values())
        ok = total[1_000_000] <= TARGET_1M_S and peak <= TARGET_1M_RSS_GB
        print(
            f"1M rows validate + split: {total[1_000_000]:.1f} s (target {TARGET_1M_S:.0f}), peak "
            f"{peak:.2f} GB (target {TARGET_1M_RSS_GB:.0f}): {'OK' if ok else 'MISSED'}"
        )
    for small in total:
        if small * 10 in total:
            ratio = total[small * 10] / total[small]
            verdict = "OK" if ratio <= TARGET_RATIO else "MISSED"
            print(f"{small * 10:,} / {small:,} rows: {ratio:.1f}x time (target <= 13x): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
