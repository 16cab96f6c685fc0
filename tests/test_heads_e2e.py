"""Binary and multi-label projects through real `dvc repro`, tracked in a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from _datasets import pattern_image, two_feature_image
from _project import make_project, mlflow_runs, sh

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e_heads")]

FAST = {
    "image_size": 16,
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.01,
}


def _set_params(root: Path, **sections: dict) -> None:
    """Update params.yaml sections (replacing `data.source` whole) and commit."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params[name].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "params", cwd=root)


def _write_multilabel_csv(folder: Path, per_combo: int = 30) -> None:
    """Real PNGs and a labels CSV whose cells hold one or two labels ("bright;striped")."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = ["path,label"]
    for c, combo in enumerate([("bright",), ("striped",), ("bright", "striped")]):
        for i in range(per_combo):
            name = f"c{c}_{i:03d}.png"
            img = two_feature_image("bright" in combo, "striped" in combo, rng)
            Image.fromarray(img).save(folder / name)
            lines.append(f"{name},{';'.join(reversed(combo))}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


def test_multilabel_project_end_to_end(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    _write_multilabel_csv(root / "photos")
    _set_params(
        root,
        data={
            "source": {"kind": "csv", "path": "photos/labels.csv"},
            "multi_label": True,
            "label_separator": ";",
        },
        validate={"near_duplicate_threshold": -1},
        train={**FAST, "class_weights": "balanced"},
        model={"kwargs": {"widths": [8, 16], "dropout": 0.0}},
    )
    sh("dvc", "repro", cwd=root)

    splits = (root / "data/processed/splits.csv").read_text()
    assert "bright|striped" in splits  # canonical label sets, whatever the CSV's separator
    headline = json.loads((root / "metrics/eval.json").read_text())
    for key in ("subset_accuracy", "hamming_loss", "f1_micro", "f1_macro"):
        assert key in headline, key
    metrics = json.loads((root / "reports/eval_details.json").read_text())  # every key
    assert "f1_bright" in metrics and metrics["f1_macro"] == headline["f1_macro"]
    assert metrics["f1_macro"] >= 0.8 and metrics["subset_accuracy"] >= 0.6
    # the evaluation reports the thresholds the saved model decides with (tuned on val), per
    # label: a report at 0.5, or of the wrong label's threshold, fails
    import torch

    meta = torch.load(root / "models/model.pt", weights_only=True)["meta"]
    for k, label in enumerate(meta["classes"]):
        assert metrics[f"threshold_{label}"] == pytest.approx(meta["thresholds"][k]), label

    (run,) = mlflow_runs(root)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_f1_per_class/striped"] == pytest.approx(metrics["f1_striped"])
    assert run.data.params["data.multi_label"] == "True"
    info = json.loads((root / "models/logged_models.json").read_text())  # evaluate logged it
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(info["serving_model_uri"])
    images = np.stack(
        [np.asarray(Image.open(root / "photos" / f"c2_{i:03d}.png"))[..., None] for i in range(4)]
    )
    rows = served.predict(images)
    assert all(set(r["labels"]) <= {"bright", "striped"} for r in rows)
    assert sum(r["labels"] == ["bright", "striped"] for r in rows) >= 3


def test_binary_project_end_to_end(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    rng = np.random.default_rng(1)
    for k, label in enumerate(["healthy", "sick"]):
        folder = root / "photos" / label
        folder.mkdir(parents=True)
        for i in range(40):
            Image.fromarray(pattern_image(k, rng)).save(folder / f"{i:03d}.png")
    _set_params(
        root,
        data={"source": "photos"},
        validate={"near_duplicate_threshold": -1},
        model={"head": "binary", "positive_class": "sick", "kwargs": {"widths": [8, 16]}},
        train=FAST,
        tracking={"log_model": False},
    )
    sh("dvc", "repro", cwd=root)

    metrics = json.loads((root / "metrics/eval.json").read_text())
    for key in ("threshold", "precision_at_threshold", "recall_at_threshold", "average_precision"):
        assert key in metrics, key
    assert metrics["recall_at_threshold"] >= 0.8
    assert (root / "reports/figures/pr_curves.png").is_file()
    import torch

    meta = torch.load(root / "models/model.pt", weights_only=True)["meta"]
    assert meta["task"] == "binary" and meta["classes"] == ["healthy", "sick"]
    assert metrics["threshold"] == pytest.approx(meta["thresholds"][0])
    (run,) = mlflow_runs(root)
    assert run.data.metrics["test_threshold"] == pytest.approx(metrics["threshold"])
