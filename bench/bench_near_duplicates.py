"""Near-duplicate detector quality: precision and recall per transform, through the real stages.

A folder dataset is built from real images (Fashion-MNIST's 70,000 from Debian's
`dataset-fashion-mnist`, and scikit-learn's 1,797 digits): every original once, plus copies of a
random sample made by one transform each (JPEG re-encode q 60-95, resize by 0.9-1.1, a crop of
3-8 % per side, a shift of 1-2 px, brightness x 0.8-1.2). Then the product runs on it the way a
user runs it: `pipeline/ingest.py` and `pipeline/validate.py` in a throw-away project (default
params, `data.group.by: none`), and the groups in `data/interim/valid.csv` are scored:

- recall per transform: share of copies whose group is their original's group;
- precision per transform: of the pairs the stage put in one group that involve a copy of that
  transform, the share that come from one original (the copy and its original or its sibling);
- pairs between two originals: the dataset's own duplicates (Fashion-MNIST has some: look at
  `reports/validation_groups.png` in the work folder); counted as mistakes in "strict precision";
- the largest merged group, and validate's wall time.

    .venv/bin/python bench/bench_near_duplicates.py                 # both datasets
    .venv/bin/python bench/bench_near_duplicates.py --dataset digits --copies 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project import REPO, bench_env, copy_project

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
# A transform returns the copy and how to save it (format and encoder options).
Transform = Callable[[Image.Image, np.random.Generator], tuple[Image.Image, dict]]
PNG: dict = {"format": "PNG"}


def jpeg(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Re-encode as JPEG, quality 60-95 (the encoder writes the copy's bytes)."""
    return im, {"format": "JPEG", "quality": int(rng.integers(60, 96))}


def resize(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Resize by a factor in [0.9, 1.1] (at least one pixel of change)."""
    f = rng.uniform(0.9, 1.1)
    w = max(1, round(im.width * f))
    w = w if w != im.width else im.width + 1
    h = max(1, round(im.height * w / im.width))
    return im.resize((w, h), Image.Resampling.BICUBIC), PNG


def crop(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Cut 3-8 % off every side."""
    f = rng.uniform(0.03, 0.08)
    dx, dy = max(1, round(im.width * f)), max(1, round(im.height * f))
    return im.crop((dx, dy, im.width - dx, im.height - dy)), PNG


def shift(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Translate by 1-2 px right and down (border filled with the corner colour)."""
    d = int(rng.integers(1, 3))
    arr = np.asarray(im)
    out = np.full_like(arr, arr[0, 0])
    out[d:, d:] = arr[:-d, :-d]
    return Image.fromarray(out), PNG


def brightness(im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Brightness x 0.8-1.2."""
    return ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2)), PNG


TRANSFORMS: dict[str, Transform] = {
    "jpeg": jpeg,
    "resize": resize,
    "crop": crop,
    "shift": shift,
    "brightness": brightness,
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def originals(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels) of a dataset."""
    if name == "fashion-mnist":
        parts = [("train", "train"), ("t10k", "t10k")]
        x = np.concatenate([read_idx(IDX_DIR / f"{p}-images-idx3-ubyte.gz") for p, _ in parts])
        y = np.concatenate([read_idx(IDX_DIR / f"{p}-labels-idx1-ubyte.gz") for p, _ in parts])
        return x, y
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target


def build(root: Path, name: str, copies: int, seed: int) -> pd.DataFrame:
    """Write originals and transformed copies under root/images/<class>/; return the truth."""
    x, y = originals(name)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (img, lab) in enumerate(zip(x, y, strict=True)):
        rel = f"images/c{lab}/o{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        rows.append({"path": f"data/raw/images/c{lab}/o{i:05d}.png", "orig": i, "kind": ""})
    for t, fn in TRANSFORMS.items():
        for i in rng.choice(len(x), copies, replace=False):
            im, save = fn(Image.fromarray(x[i]), rng)
            rel = f"images/c{y[i]}/{t}-{i:05d}.{'jpg' if save['format'] == 'JPEG' else 'png'}"
            im.convert("L").save(root / rel, **save)
            rows.append({"path": f"data/raw/{rel}", "orig": i, "kind": t})
    return pd.DataFrame(rows)


def run_stages(project: Path, images: Path) -> float:
    """ingest + validate with default params on the folder; returns validate's wall time."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(images)
    params["tracking"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = bench_env()
    subprocess.run([sys.executable, "pipeline/ingest.py"], cwd=project, env=env, check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "pipeline/validate.py"], cwd=project, env=env, check=True)
    return time.perf_counter() - t0


def score(project: Path, truth: pd.DataFrame) -> dict:
    """Recall / precision per transform from the groups validate wrote."""
    valid = pd.read_csv(project / "data/interim/valid.csv", dtype=str, keep_default_na=False)
    df = truth.merge(valid[["path", "group"]], on="path", how="inner")
    assert len(df) == len(truth), "every image must pass validation"
    orig_group = df[df["kind"] == ""].set_index("orig")["group"]
    per = df.groupby("group")
    sizes = per.size()
    out: dict = {"rows": len(df), "largest_group": int(sizes.max()), "transforms": {}}
    pairs = []  # every pair of rows that share a group: (kind_a, orig_a, kind_b, orig_b)
    for _, g in per:
        if len(g) > 1:
            recs = list(g[["kind", "orig"]].itertuples(index=False))
            pairs += [(a.kind, a.orig, b.kind, b.orig) for a, b in itertools.combinations(recs, 2)]
    pairs_df = pd.DataFrame(pairs, columns=["ka", "oa", "kb", "ob"])
    true_pair = pairs_df["oa"] == pairs_df["ob"]  # two copies of one original are true, too
    between_originals = int(((pairs_df["ka"] == "") & (pairs_df["kb"] == "")).sum())
    for t in TRANSFORMS:
        copies = df[df["kind"] == t]
        found = (copies["group"].to_numpy() == orig_group.reindex(copies["orig"]).to_numpy()).sum()
        touches = (pairs_df["ka"] == t) | (pairs_df["kb"] == t)
        tp = int((touches & true_pair).sum())
        merged = int(touches.sum())
        out["transforms"][t] = {
            "copies": len(copies),
            "recall": round(found / len(copies), 4),
            "pairs_with_a_copy": merged,
            "precision": round(tp / merged, 4) if merged else None,
        }
    total = len(pairs_df)
    out["pairs_in_groups"] = total
    out["pairs_between_originals"] = between_originals
    out["precision_excluding_dataset_duplicates"] = (
        round(int(true_pair.sum()) / (total - between_originals), 4)
        if total > between_originals
        else None
    )
    out["strict_precision"] = round(int(true_pair.sum()) / total, 4) if total else None
    report = json.loads((project / "reports/validation.json").read_text())["summary"]
    out["validate_summary"] = {k: v for k, v in report.items() if "near" in k or "merged" in k}
    return out


def main() -> None:
    """Build each dataset, run the stages, print a JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["fashion-mnist", "digits", "both"], default="both")
    ap.add_argument("--copies", type=int, default=500, help="copies per transform")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgcls-near-dup"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = ["fashion-mnist", "digits"] if args.dataset == "both" else [args.dataset]
    results = {}
    for name in names:
        work = args.workdir / name
        subprocess.run(["rm", "-rf", str(work)], check=True)
        project = copy_project(work / "project")
        truth = build(work, name, min(args.copies, 1797 // 6 if name == "digits" else 10**9), 0)
        wall = run_stages(project, work / "images")
        results[name] = {"validate_wall_s": round(wall, 1), **score(project, truth)}
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    results["cpu"] = os.cpu_count()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
