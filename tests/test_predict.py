"""`imgcls predict`: same numbers as evaluation, files / folders / globs, error rows, formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _datasets import with_splits, write_pattern_dataset
from imgcls.cli import main
from imgcls.config import parse_params
from imgcls.data.dataset import SplitData, load_split_data
from imgcls.evaluation.evaluate import predict_probs
from imgcls.inference.predict import (
    InputFile,
    PredictError,
    expand_inputs,
    load_predictor,
    predict_paths,
    resolve_device,
)
from imgcls.models.bundle import load_bundle, save_bundle
from imgcls.training.train import train_model


def _train(root: Path, epochs: int = 2) -> tuple[Path, SplitData]:
    """A tiny simple_cnn trained on the 3-class pattern dataset, saved as root/model.pt."""
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    with_splits(write_pattern_dataset(root)).to_csv(splits, index=False)
    params = parse_params(
        {
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "train": {
                **{"epochs": epochs, "batch_size": 16, "lr": 0.01},
                **{"image_size": 16, "device": "cpu"},
            },
            "augment": {"train": [], "eval": []},
        }
    )
    data = load_split_data(splits, root, 16, "auto", root / "cache", progress=False)
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    save_bundle(root / "model.pt", result.model, meta)
    return root / "model.pt", data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SplitData]:
    """(root, model.pt, decoded split data) shared by this module's tests."""
    root = tmp_path_factory.mktemp("predict")
    model, data = _train(root)
    return root, model, data


def _test_files(root: Path, data: SplitData) -> list[str]:
    return [str(root / p) for p in data.frame.loc[data.frame["split"] == "test", "path"]]


def test_predictions_match_the_evaluate_stage_exactly(trained) -> None:
    root, model, data = trained
    files = _test_files(root, data)
    preds = predict_paths(load_predictor(model, device="cpu"), files, top_k=3, progress=False)
    clf, meta = load_bundle(model)
    images, labels = data.part("test")
    expected = predict_probs(clf, np.asarray(images))  # what metrics/eval.json is computed from
    assert [p.path for p in preds] == files
    for pred, probs in zip(preds, expected, strict=True):
        assert pred.error is None
        assert pred.label == meta["classes"][int(probs.argmax())]
        got = dict(pred.top)
        for c, name in enumerate(meta["classes"]):
            assert got[name] == pytest.approx(float(probs[c]), abs=1e-6)
    # ...and the tiny model has actually learned something, so top-1 is a meaningful check.
    accuracy = np.mean([p.label == meta["classes"][y] for p, y in zip(preds, labels, strict=True)])
    assert accuracy >= 0.6


def test_top_k_is_sorted_and_capped_at_the_class_count(trained) -> None:
    root, model, data = trained
    preds = predict_paths(
        load_predictor(model, device="cpu"), _test_files(root, data)[:3], top_k=10, progress=False
    )
    for p in preds:
        probs = [v for _, v in p.top]
        assert len(p.top) == 3 and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_batch_size_does_not_change_results(trained) -> None:
    root, model, data = trained
    predictor = load_predictor(model, device="cpu")
    files = _test_files(root, data)
    runs = [predict_paths(predictor, files, batch_size=b, progress=False) for b in (1, 7, 64)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert a.label == b.label and a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-6)


def test_files_folders_and_globs_expand_in_order_without_duplicates(tmp_path: Path) -> None:
    (tmp_path / "imgs/sub/.hidden").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for rel in ("imgs/b.png", "imgs/a.JPG", "imgs/sub/c.png", "imgs/sub/.hidden/d.png"):
        Image.new("L", (4, 4)).save(tmp_path / rel, format="PNG")
    (tmp_path / "imgs/notes.txt").write_text("not an image")
    (tmp_path / "imgs/.e.png").write_bytes(b"")
    specs = [
        str(tmp_path / "imgs"),
        str(tmp_path / "imgs/b.png"),  # again: listed once
        str(tmp_path / "imgs/**/*.png"),
        str(tmp_path / "imgs/notes.txt"),  # named explicitly: tried whatever its suffix
        str(tmp_path / "missing.png"),
        str(tmp_path / "nothing/*.png"),
        str(tmp_path / "empty"),
    ]
    got = expand_inputs(specs)
    rel = [(Path(i.path).relative_to(tmp_path).as_posix(), i.error) for i in got]
    assert rel == [
        ("imgs/a.JPG", None),
        ("imgs/b.png", None),
        ("imgs/sub/c.png", None),
        ("imgs/notes.txt", None),
        ("missing.png", "no such file or folder"),
        ("nothing/*.png", "no files match this pattern"),
        ("empty", "no image files (.png, .jpg, ...) in this folder"),
    ]


def test_a_bad_file_gets_its_own_error_row_and_the_rest_still_predict(trained, tmp_path) -> None:
    root, model, data = trained
    good = _test_files(root, data)[:2]
    png = Path(good[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    bad = [str(tmp_path / n) for n in ("truncated.png", "text.png", "empty.png", "gone.png")]
    preds = predict_paths(
        load_predictor(model, device="cpu"), [good[0], *bad, good[1]], progress=False
    )
    errors = {Path(p.path).name: p.error for p in preds}
    assert errors["text.png"] == "not an image"
    assert errors["empty.png"] == "empty file"
    assert errors["gone.png"] == "no such file or folder"
    assert errors["truncated.png"].startswith("corrupt image")
    assert preds[0].error is None and preds[-1].error is None and preds[-1].label


def test_images_of_any_mode_and_size_are_decoded_like_training(trained, tmp_path) -> None:
    _, model, _ = trained
    predictor = load_predictor(model, device="cpu")
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[::4, :, :3] = 220
    rgba[..., 3] = 200
    Image.fromarray(rgba).save(tmp_path / "big.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "photo.jpg", quality=90)
    from imgcls.data.dataset import load_image

    preds = predict_paths(predictor, [str(tmp_path)], progress=False)
    for pred in preds:
        pixels = load_image(Path(pred.path), 16, 1)[None]  # (1, 16, 16, 1): the training decoder
        probs = predictor.probs(pixels)[0]
        assert dict(pred.top)[pred.label] == pytest.approx(float(probs.max()), abs=1e-6)


def test_cli_writes_csv_and_json_with_top_k(trained, tmp_path, capsys) -> None:
    root, model, data = trained
    files = _test_files(root, data)[:4]
    (tmp_path / "bad.png").write_text("x")
    args = ["predict", *files, str(tmp_path / "bad.png"), "--model", str(model), "--top-k", "2"]
    main([*args, "--output", str(tmp_path / "out.csv"), "--device", "cpu"])
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table.columns) == [
        "path",
        "label",
        "probability",
        "label_2",
        "probability_2",
        "error",
    ]
    assert table["path"].tolist() == [*files, str(tmp_path / "bad.png")]
    assert (table["error"][:4] == "").all() and table["error"].iloc[4] == "not an image"
    assert (
        table["probability"][:4].astype(float) >= table["probability_2"][:4].astype(float)
    ).all()
    assert "1 of 5 inputs failed" in capsys.readouterr().err

    main([*args, "--format", "json"])
    records = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in records[:4]] == table["label"][:4].tolist()
    assert all(len(r["top_k"]) == 2 for r in records[:4])
    assert records[4] == {
        "path": str(tmp_path / "bad.png"),
        "label": None,
        "probability": None,
        "top_k": [],
        "error": "not an image",
    }


def test_cli_table_is_readable(trained, capsys) -> None:
    root, model, data = trained
    files = _test_files(root, data)[:2]
    main(["predict", *files, "--model", str(model), "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "label", "prob", "next"]
    assert len(lines) == 3 and lines[1].startswith(files[0])


def test_cli_fails_when_nothing_could_be_predicted(trained, tmp_path, capsys) -> None:
    _, model, _ = trained
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "nope.png"), "--model", str(model)])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "no such file or folder" in captured.out
    assert "none of the 1 inputs could be predicted" in captured.err


def test_missing_model_and_bad_device_are_clear_errors(trained, tmp_path) -> None:
    _, model, _ = trained
    with pytest.raises(PredictError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="no CUDA GPU"):
            load_predictor(model, device="cuda")
    with pytest.raises(Exception, match="model file not found"):
        load_predictor(tmp_path / "none.pt")
    with pytest.raises(PredictError, match="exactly one"):
        load_predictor(model, "runs:/x/model")


def test_model_uri_loads_the_train_stage_logged_model(trained, tmp_path) -> None:
    """`--model-uri runs:/...` and `models:/name/1` on the mlflow.pytorch model train logs."""
    from imgcls.config import TrackingConfig
    from imgcls.tracking import Run

    root, model, data = trained
    clf, meta = load_bundle(model)
    name = f"patterns-{tmp_path.name}"  # unique: other tests in this process register models too
    run = Run.start(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t"))
    run.log_pytorch_model(
        clf,
        input_example=np.asarray(data.images[:2]),
        metadata=meta,
        registered_name=name,
        bundle=model,
    )
    assert run.not_logged == []
    files = _test_files(root, data)
    local = predict_paths(load_predictor(model, device="cpu"), files, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", run.uri)
        for uri in (f"runs:/{run.run_id}/model", f"models:/{name}/1"):
            remote = predict_paths(load_predictor(None, uri, "cpu"), files, progress=False)
            for a, b in zip(local, remote, strict=True):
                assert a.label == b.label and a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-5)
        with pytest.raises(Exception, match="cannot load the MLflow model"):
            load_predictor(None, f"models:/{name}/7", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_predictions_match_cpu(trained) -> None:
    root, model, data = trained
    files = _test_files(root, data)
    cpu = predict_paths(load_predictor(model, device="cpu"), files, progress=False)
    gpu = predict_paths(load_predictor(model, device="cuda"), files, progress=False)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.label == b.label and a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-4)


def test_input_file_error_rows_keep_the_given_spelling() -> None:
    assert expand_inputs(["does/not/exist.png"]) == [
        InputFile("does/not/exist.png", "no such file or folder")
    ]


def test_multilabel_table_shows_each_decided_labels_probability(tmp_path: Path, capsys) -> None:
    from imgcls.models.registry import create_model

    classes = ["bright", "dark", "striped"]
    net = create_model("mlp", in_chans=1, num_classes=3, image_size=16, hidden=[])
    (linear,) = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # the same logits for every image: sigmoid 0.881, 0.047, 0.622
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([2.0, -3.0, 0.5]))
    meta = {
        **{"arch": "mlp", "model_kwargs": {"hidden": []}, "classes": classes, "image_size": 16},
        **{"channels": 1, "mean": [0.5], "std": [0.25], "task": "multilabel"},
        **{"thresholds": [0.5, 0.5, 0.6], "threshold_metric": "f1"},
    }
    save_bundle(tmp_path / "model.pt", net, meta)
    Image.new("L", (16, 16), 128).save(tmp_path / "x.png")
    main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "model.pt")])
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:3] == ["path", "label", "prob"]
    assert row.split()[1:3] == ["bright|striped", "0.881|0.622"]
