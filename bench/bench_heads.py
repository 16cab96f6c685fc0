"""Binary and multi-label heads on a real dataset, end to end through `dvc repro` (issue 10).

    .venv/bin/python bench/bench_heads.py [--epochs 15]

Real images written as PNGs with a labels CSV, each in a fresh copy of the project (default
params otherwise: simple_cnn, Affine augmentation, MLflow SQLite store):

- binary: Fashion-MNIST's two most confusable classes, `shirt` (positive) vs `top`
  (T-shirt/top), 1:4, 3,000 images of its official train set (Debian package
  `dataset-fashion-mnist`), 28 px, `model.head: binary`; precision / recall of `shirt` on the
  test split at the val-tuned threshold and at 0.5 (same model);
- multi-label: scikit-learn's digits (1,797 real scans, 16 px), each labelled with its
  attributes `even` / `odd`, `round` (0 6 8 9), `large` (>= 5), `data.multi_label: true`
  (10 label combinations, 1-3 labels per image).

The binary project is then re-run as `dvc exp run -S train.threshold_metric=f2` (a
recall-leaning threshold for the same kind of model).

Prints `dvc repro` wall time and the test metrics of each, read from reports/eval_details.json and
checked against the MLflow run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from project import bench_env, commit, copy_project

ROUND = {0, 6, 8, 9}


def attributes(digit: int) -> list[str]:
    """The multi-label attributes of a digit (never empty: even or odd)."""
    out = ["even" if digit % 2 == 0 else "odd"]
    out += ["round"] * (digit in ROUND) + ["large"] * (digit >= 5)
    return out


FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_fashion_binary(folder: Path, n_shirt: int = 600, n_top: int = 2400) -> None:
    """Fashion-MNIST shirts (class 6) and T-shirts/tops (class 0) as PNGs plus labels.csv."""
    from imgcls.data.sources import read_idx

    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{FASHION}: missing; apt-get install dataset-fashion-mnist")
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    folder.mkdir(parents=True)
    lines = ["path,label"]
    for cls, name, n in ((6, "shirt", n_shirt), (0, "top", n_top)):
        for i in np.flatnonzero(labels == cls)[:n]:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
            lines.append(f"{i:05d}.png,{name}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def write_digits(folder: Path, label_of) -> None:
    """Digits as 8-bit PNGs plus labels.csv (`path,label`, several labels joined by ';')."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    lines = ["path,label"]
    for i, (img, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        name = f"{i:04d}.png"
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(folder / name)
        lines.append(f"{name},{label_of(int(digit))}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def run_project(root: Path, params: dict, epochs: int) -> tuple[float, dict]:
    """Set params, `dvc repro`; wall time and reports/eval_details.json (every key)."""
    path = root / "params.yaml"
    base = yaml.safe_load(path.read_text())
    for section, values in params.items():
        base[section].update(values)
    base["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    commit(root)
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["dvc", "repro"], cwd=root, env=bench_env(), capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, json.loads((root / "reports/eval_details.json").read_text())


def mlflow_metrics(root: Path) -> dict[str, float]:
    """The project's one MLflow run's metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    return run.data.metrics


def binary_at_half(root: Path) -> tuple[float, float]:
    """Test precision / recall of the positive class at 0.5 instead of the tuned threshold."""
    from sklearn.metrics import precision_score, recall_score

    from imgcls.data.dataset import load_split_data
    from imgcls.evaluation.evaluate import predict_probs
    from imgcls.models.bundle import load_bundle

    clf, meta = load_bundle(root / "models/model.pt")
    data = load_split_data(
        root / "data/processed/splits.csv",
        root,
        meta["image_size"],
        meta["channels"],
        root / "data/cache",
        classes=meta["classes"],
        task="binary",
        progress=False,
    )
    x, y = data.part("test")
    pred = (predict_probs(clf, x)[:, 1] >= 0.5).astype(int)
    return float(precision_score(y, pred)), float(recall_score(y, pred))


def main() -> None:
    """Run both projects and print their figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    common = {"validate": {"max_imbalance_ratio": 20.0}}
    with tempfile.TemporaryDirectory(prefix="imgcls-heads-") as tmp:
        root = copy_project(Path(tmp) / "binary")
        write_fashion_binary(root / "photos")
        seconds, m = run_project(
            root,
            {
                **common,
                "data": {"source": {"kind": "csv", "path": "photos/labels.csv"}},
                "model": {"head": "binary", "positive_class": "shirt"},
                "train": {"image_size": 28},
            },
            args.epochs,
        )
        p50, r50 = binary_at_half(root)
        logged = mlflow_metrics(root)
        assert logged["test_threshold"] == m["threshold"]
        print(f"binary 'shirt' vs 'top' (Fashion-MNIST, 1:4): dvc repro {seconds:.1f} s")
        print("| test | threshold | precision | recall | F1 | AP | ROC AUC | balanced acc |")
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| at the val-tuned threshold | {m['threshold']:.3f} | "
            f"{m['precision_at_threshold']:.4f} | {m['recall_at_threshold']:.4f} | "
            f"{m['f1_at_threshold']:.4f} | {m['average_precision']:.4f} | {m['roc_auc']:.4f} | "
            f"{m['balanced_accuracy']:.4f} |"
        )
        print(f"| at 0.5, same model | 0.500 | {p50:.4f} | {r50:.4f} | | | | |")
        proc = subprocess.run(
            ["dvc", "exp", "run", "-S", "train.threshold_metric=f2"],
            cwd=root,
            env=bench_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(f"dvc exp run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        m = json.loads((root / "reports/eval_details.json").read_text())
        print(
            f"| `dvc exp run -S train.threshold_metric=f2` | {m['threshold']:.3f} | "
            f"{m['precision_at_threshold']:.4f} | {m['recall_at_threshold']:.4f} | "
            f"{m['f1_at_threshold']:.4f} | {m['average_precision']:.4f} | {m['roc_auc']:.4f} | "
            f"{m['balanced_accuracy']:.4f} |"
        )

        root = copy_project(Path(tmp) / "multi")
        write_digits(root / "photos", lambda d: ";".join(attributes(d)))
        seconds, m = run_project(
            root,
            {
                **common,
                "data": {
                    "source": {"kind": "csv", "path": "photos/labels.csv"},
                    "multi_label": True,
                    "label_separator": ";",
                },
            },
            args.epochs,
        )
        logged = mlflow_metrics(root)
        assert logged["test_subset_accuracy"] == m["subset_accuracy"]
        print(f"\nmulti-label even/odd/round/large (digits): dvc repro {seconds:.1f} s")
        print(
            "| test | subset acc | Hamming loss | micro F1 | macro F1 | "
            + " | ".join(f"F1 {k} (thr)" for k in ("even", "odd", "round", "large"))
            + " |"
        )
        print("|---" * 8 + "|")
        per = " | ".join(
            f"{m[f'f1_{k}']:.4f} ({m[f'threshold_{k}']:.2f})"
            for k in ("even", "odd", "round", "large")
        )
        print(
            f"| | {m['subset_accuracy']:.4f} | {m['hamming_loss']:.4f} | {m['f1_micro']:.4f} | "
            f"{m['f1_macro']:.4f} | {per} |"
        )


if __name__ == "__main__":
    main()
