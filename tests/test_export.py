"""`imgcls export`: ONNX / TorchScript give PyTorch's top-1 and probabilities within 1e-4."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from _datasets import REPO, with_splits, write_pattern_dataset
from imgcls.cli import main
from imgcls.config import parse_params
from imgcls.data.dataset import SplitData, load_split_data
from imgcls.inference.export import (
    ATOL,
    ExportError,
    compare,
    default_output,
    export_model,
    load_exported,
    verify_export,
)
from imgcls.models.bundle import ImageClassifier, load_bundle, save_bundle
from imgcls.models.registry import create_model
from imgcls.training.train import train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SplitData]:
    """(model.pt, decoded splits) of a simple_cnn trained 2 epochs on the pattern dataset."""
    root = tmp_path_factory.mktemp("export")
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    with_splits(write_pattern_dataset(root)).to_csv(splits, index=False)
    params = parse_params(
        {
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "image_size": 16, "device": "cpu"},
            "augment": {"train": [], "eval": []},
        }
    )
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    save_bundle(root / "model.pt", result.model, meta)
    return root / "model.pt", data


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_the_test_split(trained, tmp_path: Path, fmt: str) -> None:
    model, data = trained
    clf, meta = load_bundle(model)
    out = export_model(clf, meta, fmt, tmp_path / f"m.{fmt}")
    run, meta2 = load_exported(out, fmt)  # ONNX runs in onnxruntime, not in torch
    assert meta2 == meta
    images = np.asarray(data.part("test")[0])  # (18, 16, 16, 1): not the export's batch of 2
    diff, top1_agreement = compare(clf, run, images)
    assert top1_agreement == 1.0
    assert diff <= ATOL
    single = run(images[:1])  # batch size 1 works too: the batch axis is dynamic
    assert single.shape == (1, len(meta["classes"]))


def test_cli_exports_and_verifies_both_formats(trained, tmp_path: Path, capsys) -> None:
    model, _ = trained
    main(["export", "--format", "onnx", "--model", str(model), "-o", str(tmp_path / "m.onnx")])
    assert "onnx model ->" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()
    main(["export", "--format", "torchscript", "--model", str(model)])
    out = capsys.readouterr().out
    assert str(default_output(model, "torchscript")) in out and "max |p - p_torch|" in out
    assert default_output(model, "torchscript").is_file()


def test_a_timm_model_exports_to_both_formats(tmp_path: Path) -> None:
    net = create_model("test_resnet", in_chans=3, num_classes=4, image_size=32)
    meta = {"arch": "test_resnet", "classes": list("abcd"), "image_size": 32, "channels": 3}
    clf = ImageClassifier(net, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for fmt in ("onnx", "torchscript"):
        path = export_model(clf, meta, fmt, tmp_path / f"timm.{fmt}")
        assert verify_export(clf, path, fmt, images) <= ATOL


def test_shifted_tta_and_early_pooling_export_to_both_formats(tmp_path: Path) -> None:
    """The preset's model (pool_before_norm, a 3x3 head grid, shifted TTA) exports exactly."""
    torch.manual_seed(0)
    net = create_model(  # the head pools an 8x8 map to 3x3: windows of unequal size
        "simple_cnn",
        in_chans=1,
        num_classes=3,
        image_size=16,
        widths=[4, 8],
        pool_before_norm=True,
        head_grid=3,
    )
    meta = {"arch": "simple_cnn", "classes": list("abc"), "image_size": 16, "channels": 1}
    meta["tta"] = "hflip_shift"
    clf = ImageClassifier(net, [0.5], [0.25], tta="hflip_shift").eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    for fmt in ("onnx", "torchscript"):
        path = export_model(clf, meta, fmt, tmp_path / f"tta.{fmt}")
        assert verify_export(clf, path, fmt, images) <= ATOL


def test_a_wrong_export_is_caught(trained, tmp_path: Path) -> None:
    model, _ = trained
    clf, meta = load_bundle(model)
    path = export_model(clf, meta, "torchscript", tmp_path / "m.pt")
    other = ImageClassifier(
        create_model("simple_cnn", in_chans=1, num_classes=3, image_size=16, widths=[8, 16]),
        meta["mean"],
        meta["std"],
    ).eval()
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_export(other, path, "torchscript")
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path / "none.onnx", "onnx")
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(clf, meta, "tflite", tmp_path / "m.tflite")


def test_export_and_dvc_plots_outputs_are_git_ignored() -> None:
    # rebuilt from models/model.pt / the plot files on demand: never meant for a commit
    paths = ["models/model.onnx", "models/model.torchscript.pt", "dvc_plots/index.html"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout.split() == paths, proc.stderr
