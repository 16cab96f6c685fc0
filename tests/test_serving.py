"""The servable MLflow model: logged to a real SQLite store, loaded as pyfunc, served over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _datasets import write_pattern_dataset
from imgcls.inference.logged import load_logged_model
from imgcls.inference.predict import load_predictor, predict_paths
from imgcls.inference.serving import (
    ServingError,
    image_from_array,
    log_serving_model,
    request_items,
)
from imgcls.models.bundle import save_bundle
from imgcls.models.registry import create_model

META = {
    "arch": "simple_cnn",
    "model_kwargs": {"widths": [8, 16]},
    "classes": ["diagonal", "horizontal", "vertical"],
    "image_size": 16,
    "channels": 1,
    "mean": [0.45],
    "std": [0.3],
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An (untrained) model file, logged as the serving model into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("serving")
    write_pattern_dataset(root, per_class=2)
    net = create_model("simple_cnn", in_chans=1, num_classes=3, image_size=16, widths=[8, 16])
    save_bundle(root / "model.pt", net, META)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving"))
    model_uri = log_serving_model(root / "model.pt", run.info.run_id, uri, "patterns")
    # log_serving_model sets MLflow's global URI (and MLFLOW_TRACKING_URI): a module fixture
    # runs before conftest's per-test reset records the URI, so undo it here for later modules
    mlflow.set_tracking_uri(None)
    return {
        "root": root,
        "tracking_uri": uri,
        "run_id": run.info.run_id,
        "model_uri": model_uri,
        "status": client.get_run(run.info.run_id).info.status,
        "pngs": sorted(root.rglob("*.png")),
    }


@pytest.fixture
def tracking_env(logged: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """MLFLOW_TRACKING_URI pointing at the test store, for `runs:/` and `models:/` URIs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["tracking_uri"])
    mlflow.set_tracking_uri(logged["tracking_uri"])
    return logged


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_logging_keeps_the_run_open_and_registers_a_version(tracking_env: dict) -> None:
    assert tracking_env["status"] == "RUNNING"  # the evaluate stage still logs into it
    client = mlflow.tracking.MlflowClient(tracking_env["tracking_uri"])
    (version,) = client.search_model_versions("name='patterns'")
    assert str(version.version) == "1"
    info = mlflow.models.get_model_info("models:/patterns/1")
    assert info.metadata["classes"] == META["classes"] and "python_function" in info.flavors


def test_pyfunc_answers_arrays_and_base64_files_like_predict(tracking_env: dict) -> None:
    model = mlflow.pyfunc.load_model("models:/patterns/1")
    png = tracking_env["pngs"][0]
    expected = predict_paths(
        load_predictor(tracking_env["root"] / "model.pt", device="cpu"), [str(png)], top_k=3
    )[0]
    pixels = np.asarray(Image.open(png))  # (16, 16) grayscale
    answers = [
        model.predict([_b64(png)])[0],
        model.predict([f"data:image/png;base64,{_b64(png)}"])[0],
        model.predict(pixels[None, :, :, None])[0],  # (1, H, W, C) uint8 batch
        model.predict(pixels.astype(np.int64).tolist())[0],  # JSON-style nested list, one image
        model.predict(pd.DataFrame({"image": [_b64(png)]}))[0],
        model.predict({"image": [png.read_bytes()]})[0],
    ]
    for answer in answers:
        assert answer["error"] is None and answer["label"] == expected.label
        assert answer["probabilities"][expected.label] == pytest.approx(expected.top[0][1], 1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_a_bad_image_gets_an_error_row(tracking_env: dict) -> None:
    model = mlflow.pyfunc.load_model(tracking_env["model_uri"])
    png = tracking_env["pngs"][0]
    rows = model.predict(
        [_b64(png), "***", base64.b64encode(b"plain text").decode(), base64.b64encode(b"").decode()]
    )
    assert [r["error"] for r in rows] == [
        None,
        "not valid base64 (send the image file's bytes, base64-encoded)",
        "not an image",
        "empty file",
    ]
    assert rows[1]["label"] is None and rows[1]["probabilities"] is None


def test_arrays_of_other_sizes_and_channels_go_through_the_file_decoder() -> None:
    rgb = np.zeros((32, 20, 3), np.uint8)
    rgb[:, ::2] = 255
    out = image_from_array(rgb, 16, 1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    from imgcls.data.dataset import load_image

    assert np.array_equal(out, load_image(io.BytesIO(buf.getvalue()), 16, 1))
    with pytest.raises(ValueError, match="0-255"):
        image_from_array(np.full((16, 16), 300), 16, 1)
    with pytest.raises(ValueError, match="whole numbers"):
        image_from_array(np.full((16, 16), 0.5), 16, 1)


def test_request_shapes_are_split_into_images() -> None:
    assert len(request_items(np.zeros((5, 8, 8, 3), np.uint8))) == 5
    assert len(request_items(np.zeros((8, 8, 3), np.uint8))) == 1
    assert len(request_items(np.zeros((4, 8, 8), np.uint8))) == 4  # grayscale batch
    assert len(request_items([np.zeros((8, 8)), np.zeros((9, 7))])) == 2  # ragged
    assert request_items(pd.DataFrame({"b64": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ServingError, match="column named"):
        request_items(pd.DataFrame({"x": [1], "y": [2]}))
    with pytest.raises(ServingError, match="cannot read"):
        request_items(3.5)


def test_load_logged_model_reads_the_serving_model(tracking_env: dict) -> None:
    clf, meta = load_logged_model(f"runs:/{tracking_env['run_id']}/serving")
    assert meta["classes"] == META["classes"] and hasattr(clf, "prep")
    with pytest.raises(ServingError, match="cannot load the MLflow model"):
        load_logged_model("models:/no-such-model/1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_http_with_probabilities(tracking_env: dict) -> None:
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` execs uvicorn from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = tracking_env["root"] / "serve.log"
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/patterns/1"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"no answer:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/invocations"
        png = tracking_env["pngs"][0]
        pixels = np.asarray(Image.open(png))[None, :, :, None]  # (1, 16, 16, 1)
        expected = mlflow.pyfunc.load_model("models:/patterns/1").predict([_b64(png)])[0]

        status, body = _post(url, {"inputs": [_b64(png), "not base64!"]})
        assert status == 200, body
        first, bad = body["predictions"]
        assert first["label"] == expected["label"]
        assert first["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert bad["error"].startswith("not valid base64")

        status, body = _post(url, {"inputs": pixels.tolist()})
        assert status == 200, body
        assert body["predictions"][0]["probabilities"] == pytest.approx(
            expected["probabilities"], abs=1e-6
        )

        status, body = _post(url, {"dataframe_records": [{"image": _b64(png)}]})
        assert status == 200 and body["predictions"][0]["label"] == expected["label"]

        status, body = _post(url, {"inputs": {"foo": [1], "bar": [2]}})
        assert status == 400 and "needs one of the keys" in body["message"] + body.get(
            "stack_trace", ""
        )

        # The model's limits hold over HTTP: the whole request is refused before any decoding.
        status, body = _post(url, {"inputs": [_b64(png)] * 1025})
        assert status == 400
        assert "1025 in one request > max_request_items (1024)" in body.get("stack_trace", "")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn child)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
