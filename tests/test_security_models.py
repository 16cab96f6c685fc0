"""Models from a registry: loading one through imgcls runs none of its author's code.

`imgcls predict --model-uri` (and `imgcls.inference.logged.load_logged_model`) read only
imgcls's own model file out of a logged model, with `torch.load(weights_only=True)`: never a
pickled `model.pth`, never the model's `code/` folder on `sys.path`. Each test registers a
hostile model in a real MLflow SQLite store and checks that the marker its code would write never
appears.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imgcls.cli import main
from imgcls.inference.logged import ServingError, bundle_artifact, load_logged_model
from imgcls.inference.predict import load_predictor

META = {"classes": ["a", "b"], "image_size": 16, "channels": 1, "arch": "simple_cnn"}


class _Payload:
    """Pickles as a call that writes the marker file (what an attacker's model.pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _pytorch_model_dir(folder: Path, marker: Path) -> Path:
    """An `mlflow.pytorch` model saved in pickle format whose unpickling runs code.

    `data/model.pth` imports `evil_code` from the model's own `code/` folder (which MLflow puts
    on sys.path) and calls it; importing it writes the marker.
    """
    (folder / "data").mkdir(parents=True)
    (folder / "code").mkdir()
    (folder / "code/evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\ndef boom():\n    return 0\n"
    )
    (folder / "data/model.pth").write_bytes(b"cevil_code\nboom\n)R.")  # pickle: evil_code.boom()
    (folder / "data/pickle_module_info.txt").write_text("mlflow.pytorch.pickle_module")
    mlmodel = {
        "artifact_path": "model",
        "flavors": {
            "python_function": {
                "data": "data",
                "loader_module": "mlflow.pytorch",
                "pickle_module_name": "mlflow.pytorch.pickle_module",
                "python_version": "3.11.7",
            },
            "pytorch": {
                "code": "code",
                "model_data": "data",
                "pytorch_version": str(torch.__version__),
            },
        },
        "metadata": META,
        "mlflow_version": mlflow.__version__,
    }
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return folder


def _pyfunc_model_dir(folder: Path, marker: Path) -> Path:
    """A look-alike of imgcls's serving model whose `model_file` is a pickle that runs code."""
    (folder / "artifacts").mkdir(parents=True)
    torch.save(_Payload(marker), folder / "artifacts/model.pt")  # a torch zip, pickled payload
    mlmodel = {
        "artifact_path": "serving",
        "flavors": {
            "python_function": {
                "loader_module": "mlflow.pyfunc.model",
                "artifacts": {"model_file": {"path": "artifacts/model.pt", "uri": "model.pt"}},
                "python_version": "3.11.7",
            }
        },
        "metadata": META,
        "mlflow_version": mlflow.__version__,
    }
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return folder


def _register(store: Path, name: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Log `model_dir` into a run of a real SQLite store and register it; returns models:/..."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("hostile", artifact_location=(store / "mlruns").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.create_registered_model(name)
    client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return f"models:/{name}/1"


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A function registering a hostile model; afterwards checks that its code never ran."""
    marker = tmp_path / "MARKER"
    path_before = list(sys.path)

    def register(kind: str) -> str:
        build = _pytorch_model_dir if kind == "pytorch" else _pyfunc_model_dir
        model_dir = build(tmp_path / f"src-{kind}", marker)
        return _register(tmp_path, f"hostile-{kind}", model_dir, monkeypatch)

    yield SimpleNamespace(register=register, marker=marker, monkeypatch=monkeypatch)
    assert not marker.exists(), "loading the registered model ran its author's code"
    assert sys.path == path_before and "evil_code" not in sys.modules


def test_a_pickled_pytorch_model_is_refused_without_unpickling_it(hostile) -> None:
    uri = hostile.register("pytorch")
    with pytest.raises(ServingError, match="holds no imgcls model file") as err:
        load_predictor(None, uri, "cpu")
    assert uri in str(err.value) and "--model models/model.pt" in str(err.value)
    assert not hostile.marker.exists()


def test_a_model_file_that_is_not_weights_only_is_refused_without_running_it(hostile) -> None:
    uri = hostile.register("pyfunc")
    with pytest.raises(ServingError, match="does not load weights-only") as err:
        load_logged_model(uri)
    assert str(err.value).startswith(f"{uri} (artifacts/model.pt): not an imgcls model file")
    assert not hostile.marker.exists()


def test_predict_cli_says_what_was_refused_in_one_line(hostile, tmp_path, capsys) -> None:
    uri = hostile.register("pytorch")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "x.png"), "--model-uri", uri, "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    # (MLflow's own INFO lines about creating the store's tables may come first.)
    (line,) = [x for x in err.splitlines() if x.startswith("imgcls predict:")]
    assert line.startswith(f"imgcls predict: {uri}: this logged model holds no imgcls model file")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flavors",
    [
        {"pytorch": {"extra_files": [{"path": "../../../model.pt"}]}},
        {"pytorch": {"extra_files": [{"path": "/etc/model.pt"}]}},
        {"python_function": {"artifacts": {"model_file": {"path": "../outside/model.pt"}}}},
        {"pytorch": {"extra_files": [{"path": "extra_files/model.pth"}]}},  # not the bundle
        {"pytorch": {"model_data": "data"}},
    ],
)
def test_the_model_file_path_must_stay_inside_the_logged_model(flavors: dict) -> None:
    assert bundle_artifact(SimpleNamespace(flavors=flavors)) is None


def test_the_bundle_path_of_both_imgcls_flavours_is_found() -> None:
    serving = {"python_function": {"artifacts": {"model_file": {"path": "artifacts/best.pt"}}}}
    pytorch = {"pytorch": {"extra_files": [{"path": "extra_files/model.pt"}]}}
    assert bundle_artifact(SimpleNamespace(flavors=serving)) == "artifacts/best.pt"
    assert bundle_artifact(SimpleNamespace(flavors=pytorch)) == "extra_files/model.pt"


@pytest.mark.parametrize("kwargs", [{"pretrained": True}, {"pretrained_path": "/etc/hostname"}])
def test_a_model_file_cannot_make_loading_read_or_download_other_weights(
    tmp_path: Path, kwargs: dict
) -> None:
    """The constructor arguments in a model file's metadata are the author's too."""
    from imgcls.models.bundle import load_bundle, save_bundle
    from imgcls.models.registry import ModelError, create_model

    net = create_model("simple_cnn", in_chans=1, num_classes=2, image_size=16)
    meta = {**META, "mean": [0.5], "std": [0.2], "model_kwargs": kwargs}
    save_bundle(tmp_path / "model.pt", net, meta)
    with pytest.raises(ModelError, match="would load weights from elsewhere"):
        load_bundle(tmp_path / "model.pt")


def test_a_trusted_serving_folder_keeps_the_weights_and_drops_the_authors_code(
    hostile, tmp_path: Path
) -> None:
    """`python -m imgcls.inference.serving URI FOLDER`: imgcls's code, the registry's weights."""
    import base64
    import io

    import mlflow.pyfunc

    from imgcls.inference.serving import _CODE, main
    from imgcls.models.bundle import save_bundle
    from imgcls.models.registry import create_model

    model_dir = _pyfunc_model_dir(tmp_path / "src", hostile.marker)
    net = create_model("simple_cnn", in_chans=1, num_classes=2, image_size=16)
    save_bundle(model_dir / "artifacts/model.pt", net, {**META, "mean": [0.5], "std": [0.2]})
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["python_model"] = "evil.py"  # models-from-code
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (model_dir / "evil.py").write_text(f"open({str(hostile.marker)!r}, 'w').write('code ran')\n")
    uri = _register(tmp_path, "weights-with-code", model_dir, hostile.monkeypatch)

    main([uri, str(tmp_path / "served")])
    scripts = list((tmp_path / "served").rglob("*.py"))
    assert [p.read_text() for p in scripts] == [_CODE]  # imgcls's script, not evil.py
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="PNG")
    served = mlflow.pyfunc.load_model(str(tmp_path / "served"))
    (row,) = served.predict([base64.b64encode(buf.getvalue()).decode()])
    assert row["error"] is None and set(row["probabilities"]) == {"a", "b"}
