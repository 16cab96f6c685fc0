"""MLflow tracking: URI resolution, fail-fast start, batched logging, best-effort after a drop.

Every test talks to a real MLflow store (SQLite in tmp_path) or a real closed port.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from _trainrun import run_stage, run_train, train_project
from imgcls.config import TrackingConfig, parse_params
from imgcls.tracking import (
    Run,
    RunProcess,
    TrackingError,
    artifact_location,
    describe_not_logged,
    finish_train_run,
    flatten,
    pipeline_tags,
    probe,
    resolve_uri,
    resume_run,
    start_train_run,
)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its schema takes seconds, runs are cheap."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the tables once
    return uri


@pytest.fixture
def store(shared_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shared SQLite store, with MLFLOW_TRACKING_URI / DVC_ROOT / DVC_EXP_NAME cleared."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return shared_store


def test_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"
    assert resolve_uri(TrackingConfig(uri="http://127.0.0.1:9")) == "http://127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:7")
    assert resolve_uri(TrackingConfig(uri="http://127.0.0.1:9")) == "http://127.0.0.1:7"


def test_sqlite_artifacts_live_next_to_the_database(tmp_path: Path) -> None:
    # not in ./mlruns of a `dvc exp run` temp copy, which is deleted after the experiment
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlruns").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_flatten_params() -> None:
    flat = flatten({"train": {"lr": 0.1, "sched": {"name": "cos"}}, "model": {"kwargs": {}}})
    assert flat == {"train.lr": 0.1, "train.sched.name": "cos", "model.kwargs": {}}


def test_unreachable_server_fails_fast_with_a_clear_message(store: str) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        Run.start(TrackingConfig(uri=uri))
    # MLflow's own retry loop takes minutes; 30 s leaves room for a loaded CI machine
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert (
        uri in message and "tracking.enabled: false" in message and "MLFLOW_TRACKING_URI" in message
    )


def test_unusable_sqlite_store_fails_at_start(tmp_path: Path, store: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(TrackingError, match="cannot use the MLflow tracking store"):
        Run.start(TrackingConfig(uri=f"sqlite:///{blocker}/mlflow.db"))


def test_pipeline_run_records_params_tags_and_config(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    splits = repo / "splits.csv"
    splits.write_text("path,label,split\na.png,x,train\n")
    (repo / "reports/split.json").write_text('{"ok": true}')
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    params = parse_params({"train": {"lr": 0.01}, "tracking": {"uri": store}})
    run = start_train_run(
        params, splits_csv=splits, reports_dir=repo / "reports", device="cpu", extra_dicts={}
    )
    assert run is not None
    run.begin()
    for epoch in (1, 2):
        run.log_metrics({"train_loss": 1.0 / epoch, "val_f1_macro": 0.5 * epoch}, step=epoch)
    run.end()
    client = MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.info.run_name == "lr-sweep-1" and got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.01" and got.data.params["model.name"] == "simple_cnn"
    tags = got.data.tags
    assert tags["dvc.exp_name"] == "lr-sweep-1" and tags["device"] == "cpu"
    assert tags["data.splits_sha256"] == pipeline_tags(splits, "cpu")["data.splits_sha256"]
    assert tags["imgcls.version"]
    history = client.get_metric_history(run.run_id, "val_f1_macro")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 1.0)]
    names = {a.path for a in client.list_artifacts(run.run_id, "config")}
    assert names == {"config/params.resolved.yaml"}
    assert [a.path for a in client.list_artifacts(run.run_id, "data")] == ["data/split.json"]


def test_tracking_disabled_starts_nothing(tmp_path: Path, store: str) -> None:
    params = parse_params({"tracking": {"enabled": False, "uri": "http://127.0.0.1:9"}})
    run = start_train_run(
        params, splits_csv=tmp_path / "missing.csv", reports_dir=tmp_path, device="cpu"
    )
    assert run is None
    assert resume_run(tmp_path / "run.json") is None


def test_dropped_store_is_best_effort_and_says_what_was_lost(
    store: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = Run.start(TrackingConfig(uri=store))
    # the same run, reached through a server that has gone away
    dropped = Run(f"http://127.0.0.1:{closed_port()}", run.run_id)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imgcls.tracking"):
        for epoch in range(1, 6):
            dropped.log_metrics({"train_loss": 1.0}, step=epoch)
        dropped.log_dict({"a": 1}, "evaluation/confusion_matrix.json")
        dropped.end()
        dropped.warn_not_logged("train")
    # the first failure costs a short retry, the rest nothing; without that, each of the seven
    # calls would sit in MLflow's retry loop for minutes (60 s: room for a loaded machine)
    assert time.monotonic() - t0 < 60
    assert dropped.not_logged[:5] == [f"metrics (step {i})" for i in range(1, 6)]
    summary = describe_not_logged(dropped.not_logged)
    assert summary == (
        "metrics at steps 1-5 (5 batches); artifact evaluation/confusion_matrix.json; run status"
    )
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("could not log metrics" in w for w in warnings) == 1  # warned once, not per epoch
    assert any("were NOT logged" in w and summary in w for w in warnings)
    assert MlflowClient(store).get_run(run.run_id).data.metrics == {}


def test_one_bad_call_does_not_stop_the_next(store: str) -> None:
    run = Run.start(TrackingConfig(uri=store))
    run.log_artifact(Path("/nonexistent/file.png"), "evaluation")  # a local problem, not the store
    run.log_metrics({"ok": 1.0}, step=1)
    assert run.not_logged == ["artifact evaluation/file.png"]
    assert MlflowClient(store).get_run(run.run_id).data.metrics == {"ok": 1.0}


def test_model_needs_two_example_rows(store: str) -> None:
    run = Run.start(TrackingConfig(uri=store))
    with pytest.raises(ValueError, match=">= 2 samples"):
        run.log_pytorch_model(
            torch.nn.Identity(), input_example=np.zeros((1, 4, 4, 1), np.uint8), metadata={}
        )


def test_logged_model_accepts_any_batch_size_and_registers(store: str) -> None:
    import mlflow

    from imgcls.models.bundle import ImageClassifier
    from imgcls.models.registry import create_model

    net = create_model("simple_cnn", in_chans=1, num_classes=3, image_size=16, widths=[8, 16])
    clf = ImageClassifier(net.eval(), [0.5], [0.25]).eval()
    run = Run.start(TrackingConfig(uri=store))
    example = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 1), dtype=np.uint8)
    meta = {"classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "image_size": 16}
    uri = run.log_pytorch_model(clf, input_example=example, metadata=meta, registered_name="digits")
    assert uri and run.not_logged == []
    assert MlflowClient(store).get_run(run.run_id).info.status == "RUNNING"  # evaluate closes it
    mlflow.set_tracking_uri(store)
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert pyfunc.metadata.metadata["classes"] == ["a", "b", "c"]
    signature = pyfunc.metadata.get_input_schema().inputs[0]
    assert signature.shape == (-1, 16, 16, 1) and str(signature.type) == "uint8"
    torch_model = mlflow.pytorch.load_model(uri)
    for batch in (1, 3, 7):
        x = np.random.default_rng(batch).integers(0, 255, (batch, 16, 16, 1), dtype=np.uint8)
        probs = pyfunc.predict(x)
        assert probs.shape == (batch, 3)
        expected = clf(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert torch_model(torch.from_numpy(x)).shape == (batch, 3)
    versions = MlflowClient(store).search_model_versions("name='digits'")
    assert [v.run_id for v in versions] == [run.run_id]


@pytest.fixture
def not_mlflow_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every request with 404 (not an MLflow)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["http", "sqlite-in-a-file", "sqlite-missing-folder"])
def test_probe_is_cheap_and_fails_before_any_training(
    tmp_path: Path, kind: str, store: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    uri = {
        "http": f"http://127.0.0.1:{closed_port()}",
        "sqlite-in-a-file": f"sqlite:///{blocker}/mlflow.db",
        "sqlite-missing-folder": f"sqlite:///{tmp_path}/missing/mlflow.db",
    }[kind]
    params = parse_params({"tracking": {"uri": uri}})
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="tracking.enabled: false") as err:
        start_train_run(params, splits_csv=tmp_path / "s", reports_dir=tmp_path, device="cpu")
    # the probe answers before MLflow's retry loop (minutes) could start; 30 s is generous on
    # purpose, as a loaded 2-core machine can take seconds just to import and connect
    assert time.monotonic() - t0 < 30 and uri in str(err.value)
    probe(f"sqlite:///{tmp_path}/mlflow.db")  # a writable folder passes
    assert not (tmp_path / "mlflow.db").exists()  # the probe creates nothing


def test_a_start_failure_in_the_background_stops_training(
    tmp_path: Path, not_mlflow_server: str, store: str
) -> None:
    params = parse_params({"tracking": {"uri": not_mlflow_server}})
    splits = tmp_path / "splits.csv"
    splits.write_text("path,label,split\n")
    run = start_train_run(params, splits_csv=splits, reports_dir=tmp_path, device="cpu")
    assert isinstance(run, RunProcess)  # the HTTP probe got an answer: started in background
    run.log_metrics({"train_loss": 1.0}, step=1)  # queued; never raises on the training thread
    with pytest.raises(TrackingError, match=not_mlflow_server):
        run.join()
    with pytest.raises(TrackingError):
        run.check()  # what the train stage calls at every epoch end
    run.end("FAILED")  # nothing to end: must not raise


def test_background_run_keeps_order_and_logs_no_model(tmp_path: Path, store: str) -> None:
    # models are logged by the evaluate stage, once evaluated: the train stage registers nothing
    params = parse_params({"tracking": {"uri": store, "register_model": "bg-digits"}})
    splits = tmp_path / "splits.csv"
    splits.write_text("path,label,split\n")
    run = start_train_run(params, splits_csv=splits, reports_dir=tmp_path, device="cpu")
    assert run is not None
    run.log_metrics({"val_loss": 1.0}, step=1)  # held until begin(): sent in order after it
    run.begin()
    for epoch in range(2, 6):
        run.log_metrics({"val_loss": 1.0 / epoch}, step=epoch)
    record = finish_train_run(run, best_epoch=5, best_value=0.2, monitor="val_loss")
    assert record == {"run_id": run.run_id, "tracking_uri": store, "not_logged": []}
    client = MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.info.status == "RUNNING"  # evaluate logs into it (models too) and closes it
    assert got.data.metrics["best_epoch"] == 5 and got.data.metrics["best_val_loss"] == 0.2
    steps = [m.step for m in client.get_metric_history(run.run_id, "val_loss")]
    assert steps == [1, 2, 3, 4, 5]
    assert client.search_model_versions("name='bg-digits'") == []
    assert client.list_artifacts(run.run_id, "model") == []
    assert finish_train_run(None, best_epoch=1, best_value=0.0, monitor="val_loss") == {
        "run_id": None,
        "tracking_uri": None,
        "not_logged": [],
    }


def test_a_resumed_training_reopens_its_run_and_logs_only_missing_epochs(
    tmp_path: Path, store: str
) -> None:
    params = parse_params({"train": {"lr": 0.01}, "tracking": {"uri": store}})
    splits = tmp_path / "splits.csv"
    splits.write_text("path,label,split\n")
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 2.0 / e} for e in (1, 2, 3)]
    first = start_train_run(params, splits_csv=splits, reports_dir=tmp_path)
    assert first is not None
    first.begin()
    for row in rows[:2]:  # epoch 3 was checkpointed but the process died before logging it
        first.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    first.end("FAILED")  # what the logger does when the train process is killed
    run_id = first.run_id
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "FAILED"

    # the resumed training: train.num_workers is outside the checkpoint's config hash
    changed = parse_params({"train": {"lr": 0.01, "num_workers": 1}, "tracking": {"uri": store}})
    second = start_train_run(changed, splits_csv=splits, reports_dir=tmp_path)
    assert second is not None
    second.begin(run_id, resumed_from=3, history=rows)
    second.log_metrics({"train_loss": 0.25, "val_loss": 0.5}, step=4)
    record = finish_train_run(second, best_epoch=4, best_value=0.5, monitor="val_loss")
    assert record["run_id"] == run_id and record["not_logged"] == []
    got = client.get_run(run_id)
    assert got.info.status == "RUNNING"  # reopened: evaluate finishes it
    assert got.data.tags["train.resumed_from_epoch"] == "3"
    assert got.data.params["train.num_workers"] == "auto"  # MLflow params never change
    history = client.get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0), (3, 2 / 3), (4, 0.5)]
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment], "tags.`train.resumed_from_epoch` = '3'")) == 1

    # a checkpoint written before the run id arrived: the run is found by the training's key
    fourth = start_train_run(params, splits_csv=splits, reports_dir=tmp_path)
    assert fourth is not None
    assert fourth.begin(None, resume_key=first.key, resumed_from=4, history=rows) == first.key
    finish_train_run(fourth, best_epoch=4, best_value=0.5, monitor="val_loss")
    assert fourth.run_id == run_id and len(client.get_metric_history(run_id, "val_loss")) == 4

    # a run that cannot be reopened (another store, deleted): a new run gets the whole curve
    third = start_train_run(params, splits_csv=splits, reports_dir=tmp_path)
    assert third is not None
    third.begin("0123456789abcdef0123456789abcdef", resumed_from=3, history=rows)
    finish_train_run(third, best_epoch=3, best_value=2 / 3, monitor="val_loss")
    assert third.run_id != run_id
    steps = [m.step for m in client.get_metric_history(third.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3]


def test_train_process_never_imports_mlflow_and_a_killed_one_leaves_the_run_failed(
    tmp_path: Path, store: str
) -> None:
    # The run lives in the logger process; if the train process dies without closing it, the
    # logger sees the pipe close and marks the run FAILED instead of leaving it RUNNING.
    splits = tmp_path / "splits.csv"
    splits.write_text("path,label,split\n")
    code = f"""
import os, sys
from pathlib import Path
from imgcls.config import parse_params
from imgcls.tracking import start_train_run
params = parse_params({{"tracking": {{"uri": {store!r}, "log_model": False}}}})
run = start_train_run(params, splits_csv=Path({str(splits)!r}), reports_dir=Path("."))
run.begin()
run.log_metrics({{"train_loss": 0.5}}, step=1)
print(run.run_id, "mlflow" in sys.modules, flush=True)
os._exit(3)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 3, out.stderr
    run_id, imported = out.stdout.split()
    assert imported == "False"
    client = MlflowClient(store)
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1]


def system_metric_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{system metric key: number of samples logged} of a run."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


# ~30 s: two short real trainings (pipeline/train.py and its logger process) and one evaluate
@pytest.mark.slow
def test_a_training_run_logs_system_metrics_unless_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # not 10 s: a short run
    monkeypatch.setenv("IMGCLS_MODEL_PUBLISHER", "process")  # whatever the machine's load
    model = {"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0.0}}
    train = {"epochs": 2, "batch_size": 16, "lr": 0.01}
    runs = {}
    for on in (True, False):
        root = tmp_path / ("on" if on else "off")
        tracking = {"uri": uri, "system_metrics": on}
        train_project(root, model, train, [], per_class=10, tracking=tracking)
        done = run_train(root)
        assert done.returncode == 0, done.stderr
        assert "system metrics" not in done.stderr  # MLflow's INFO chatter stays out of the log
        runs[on] = json.loads((root / "models/run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    on = system_metric_steps(client, runs[True])
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert on.get(f"system/{key}", 0) >= 1, on
    cpu = client.get_metric_history(runs[True], "system/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))  # one step per sample
    assert all(0 <= m.value <= 100 for m in cpu) and max(m.value for m in cpu) > 0
    # The run stays RUNNING until evaluate, but sampling ended with the train stage's logger.
    assert client.get_run(runs[True]).info.status == "RUNNING"
    time.sleep(1.0)
    assert system_metric_steps(client, runs[True]) == on
    assert system_metric_steps(client, runs[False]) == {}

    # The evaluate stage's model publisher samples too, continuing the run's steps.
    done = run_stage(tmp_path / "on", "evaluate")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "on/models/logged_models.json").read_text())
    assert record["model_uri"] and record["serving_model_uri"] and record["not_logged"] == []
    assert client.get_run(runs[True]).info.status == "FINISHED"
    cpu = client.get_metric_history(runs[True], "system/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == list(range(len(cpu)))
    assert len(cpu) > on["system/cpu_utilization_percentage"]


def test_system_metrics_log_the_last_sample_of_a_run_shorter_than_the_interval(
    store: str,
) -> None:
    # MLflow's monitor drops the samples of its unfinished interval when it stops
    from imgcls.tracking.sysmetrics import start_system_metrics

    run = Run.start(TrackingConfig(uri=store))
    monitor = start_system_metrics(run.uri, run.run_id)
    assert monitor is not None
    monitor.stop()
    monitor.stop()  # idempotent: the logger stops it on close and again on the way out
    steps = system_metric_steps(run.client, run.run_id)
    assert steps["system/cpu_utilization_percentage"] == 1, steps
