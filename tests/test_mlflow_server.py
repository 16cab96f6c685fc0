"""The pipeline against a real `mlflow server` (SQLite backend, artifact proxying) on 127.0.0.1.

Runs real `dvc repro` with MLFLOW_TRACKING_URI pointing at the server, reads the run back over
HTTP and loads the logged model, then serves the registered version with `mlflow models serve`
and posts a real PNG to it; then kills a server mid-training and checks that training finishes,
local outputs are written and the warning lists what was not logged.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from _mlflow_server import Server, model_server, run, start_server
from _project import make_project, ran_stages

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e")]


def test_pipeline_logs_to_a_real_server_and_reads_back(
    tmp_path: Path, mlflow_server: Server
) -> None:
    import mlflow

    root = make_project(
        tmp_path / "proj", train={"epochs": 2}, tracking={"register_model": "imgcls-digits"}
    )
    out = run("dvc", "repro", cwd=root, uri=mlflow_server.url)
    assert ran_stages(out.stdout) == {"ingest", "validate", "split", "train", "evaluate"}
    assert not (root / "mlflow.db").exists()  # MLFLOW_TRACKING_URI won over the default
    info = json.loads((root / "models/run.json").read_text())
    assert info["tracking_uri"] == mlflow_server.url and info["not_logged"] == []

    client = MlflowClient(mlflow_server.url)  # everything below goes over HTTP
    got = client.get_run(info["run_id"])
    assert got.info.status == "FINISHED"
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    local = json.loads((root / "reports/eval_details.json").read_text())
    metrics = got.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(local["accuracy"])
    for digit in range(10):
        assert metrics[f"test_f1_per_class/{digit}"] == pytest.approx(local[f"f1_{digit}"])
    assert metrics["val_f1_macro"] == pytest.approx(local["val_f1_macro"])
    steps = [m.step for m in client.get_metric_history(info["run_id"], "val_loss")]
    assert steps == [1, 2]
    assert got.data.params["train.epochs"] == "2"
    assert got.data.tags["git.commit"] and got.data.tags["data.splits_sha256"]

    confusion_path = client.download_artifacts(
        info["run_id"], "evaluation/confusion_matrix.json", str(tmp_path / "dl")
    )
    remote_cm = json.loads(Path(confusion_path).read_text())
    local_cm = json.loads((root / "reports/figures/confusion_matrix.json").read_text())
    assert remote_cm == local_cm
    names = {a.path for a in client.list_artifacts(info["run_id"], "evaluation")}
    assert {"evaluation/predictions_test.csv", "evaluation/eval_details.json"} <= names
    # the key figures sit at the root, where MLflow's compare view lines them up
    root_names = {a.path for a in client.list_artifacts(info["run_id"]) if not a.is_dir}
    assert {"misclassified.png", "pr_curves.png", "confusion_matrix.png"} <= root_names
    assert [a.path for a in client.list_artifacts(info["run_id"], "figures")] == [
        "figures/augmentation_grid.png"
    ]

    # the evaluate stage logged both models to the same run, after evaluating them
    logged = json.loads((root / "models/logged_models.json").read_text())
    assert logged["run_id"] == info["run_id"] and logged["not_logged"] == []
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    assert model.metadata.metadata["classes"] == [str(d) for d in range(10)]
    from imgcls.data.dataset import load_split_data
    from imgcls.models.bundle import load_bundle

    clf, meta = load_bundle(root / "models/model.pt")
    data = load_split_data(
        root / "data/processed/splits.csv",
        root,
        meta["image_size"],
        meta["channels"],
        tmp_path / "cache",
        classes=meta["classes"],
        progress=False,
    )
    images, labels = data.part("test")
    probs = model.predict(np.array(images[:5]))  # a batch size the example did not have
    assert probs.shape == (5, 10)
    import torch

    np.testing.assert_allclose(
        probs, clf(torch.from_numpy(np.array(images[:5]))).detach(), atol=1e-5
    )
    assert (probs.argmax(1) == labels[:5]).mean() >= 0.6
    # tracking.register_model registers the servable pyfunc model (the pytorch one is not)
    versions = client.search_model_versions("name='imgcls-digits'")
    assert {v.run_id for v in versions} == {info["run_id"]}
    registered = logged["registered_model"]
    assert registered["name"] == "imgcls-digits"
    version = client.get_model_version("imgcls-digits", str(registered["version"]))
    assert version.source == logged["serving_model_uri"] != logged["model_uri"]

    # serve the registered version over HTTP and post a real PNG of the test split, base64
    test_paths = data.frame.loc[data.frame["split"] == "test", "path"].tolist()[:3]
    files = [root / path for path in test_paths]  # the same order as data.part("test")
    with model_server(
        f"models:/imgcls-digits/{version.version}", mlflow_server.url, tmp_path / "serve.log"
    ) as url:
        body = {"inputs": [base64.b64encode(f.read_bytes()).decode() for f in files]}
        resp = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        rows = resp.json()["predictions"]
    expected = clf(torch.from_numpy(np.array(images[:3]))).detach().numpy()
    assert len(rows) == 3
    for row, want in zip(rows, expected, strict=True):
        assert row["error"] is None and row["label"] == str(int(want.argmax()))
        got = [row["probabilities"][str(d)] for d in range(10)]
        np.testing.assert_allclose(got, want, atol=1e-5)


EPOCHS = 20  # the trainer must outlast the logger's lag by far (see below)


def test_server_dropping_mid_run_lets_training_finish(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", train={"epochs": EPOCHS})
    run("dvc", "repro", "split", cwd=root, uri=None)  # data stages need no tracking
    server = start_server(tmp_path / "server")
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONUNBUFFERED": "1"}
        train = subprocess.Popen(
            [sys.executable, "pipeline/train.py"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        assert train.stdout is not None
        for line in train.stdout:
            lines.append(line)
            if f"epoch 2/{EPOCHS}" in line:  # two epochs trained: now the server goes away
                # Logging is asynchronous: step 2 must have reached the server first. Then the
                # trainer (and its sender thread) is held while the server stops, so that the
                # later epochs come after it: the logger may lag a few epochs behind on a quiet
                # machine, never the ~15 that are left.
                wait_for_step(MlflowClient(server.url), 2, timeout=60)
                os.kill(train.pid, signal.SIGSTOP)
                try:
                    server.stop()
                finally:
                    os.kill(train.pid, signal.SIGCONT)
                break
        lines.extend(train.stdout)
        assert train.wait(600) == 0, "".join(lines)
    finally:
        server.stop()
    output = "".join(lines)
    assert (root / "metrics/train.json").is_file() and (root / "models/model.pt").is_file()
    info = json.loads((root / "models/run.json").read_text())
    lost = info["not_logged"]
    assert any(item.startswith("metrics (step") for item in lost)
    assert "were NOT logged" in output and "metrics at steps" in output

    evaluate = run("python", "pipeline/evaluate.py", cwd=root, uri=None)
    assert (root / "metrics/eval.json").is_file()
    assert "were NOT logged" in evaluate.stderr and "run status" in evaluate.stderr
    # the evaluate stage logs the models: with the server gone, it lists them as lost
    logged = json.loads((root / "models/logged_models.json").read_text())
    assert {"model", "serving model"} <= set(logged["not_logged"])
    assert logged["model_uri"] is logged["serving_model_uri"] is None

    # what did reach the server before it died is in its store
    client = MlflowClient(server.backend)
    got = client.get_run(info["run_id"])
    steps = [m.step for m in client.get_metric_history(info["run_id"], "train_loss")]
    assert steps[:2] == [1, 2] and len(steps) < EPOCHS
    assert got.info.status == "RUNNING"  # nobody could close it; the UI shows it unfinished


def wait_for_step(client: MlflowClient, step: int, timeout: float) -> None:
    """Poll until the only run in the store has `train_loss` logged at `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], max_results=1
        )
        if runs:
            history = client.get_metric_history(runs[0].info.run_id, "train_loss")
            if any(m.step >= step for m in history):
                return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never reached the server")
