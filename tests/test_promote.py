"""Registry aliases: evaluate registers `challenger`, `imgcls promote` moves `champion`.

The quick tests use a real SQLite MLflow store with runs whose metrics are logged for real; the
end-to-end test runs the digits pipeline twice against a real `mlflow server` (a proper run and
a deliberately bad one), promotes, is refused, predicts and serves `models:/imgcls@champion`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from _mlflow_server import Server, model_server, run
from _project import commit, make_project
from imgcls.inference.aliases import PromotionError, PromotionRefused, promote
from imgcls.retrain.promote import promote_after_gate

BIN = Path(sys.executable).parent


def store(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def register(uri: str, name: str, metrics: dict[str, float], alias: str | None = None) -> str:
    """A finished run with `metrics`, registered as a new version of `name`; returns the run id."""
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/serving", run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return run_id


def champion(uri: str, name: str) -> int:
    """The version `champion` points at."""
    return int(
        MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version
    )


def test_first_promotion_needs_no_champion_and_worse_is_refused(tmp_path: Path) -> None:
    uri = store(tmp_path)
    register(uri, "m", {"test_f1_macro": 0.90}, alias="challenger")
    done = promote(uri, "m")  # default: the challenger
    assert (done.version, done.previous, champion(uri, "m")) == (1, None, 1)
    assert "no champion yet" in done.describe()
    assert promote(uri, "m").changed is False  # promoting the champion again: nothing to do

    register(uri, "m", {"test_f1_macro": 0.70}, alias="challenger")  # version 2, worse
    with pytest.raises(PromotionRefused) as err:
        promote(uri, "m")
    msg = str(err.value)
    assert "0.7000" in msg and "0.9000" in msg and "--force" in msg and "version 2" in msg
    assert champion(uri, "m") == 1
    # within an allowed drop (retrain's margin) it passes; --force always does
    assert promote(uri, "m", max_drop=0.25).version == 2
    promote(uri, "m", version=1)  # back: version 1 is better, so no refusal
    forced = promote(uri, "m", force=True)
    assert (forced.version, forced.previous, forced.forced) == (2, 1, True)
    tags = MlflowClient(uri, registry_uri=uri).get_model_version("m", "2").tags
    assert tags["imgcls.promoted_over"] == "1" and tags["imgcls.promotion_forced"] == "true"


def test_promote_by_run_and_other_metric(tmp_path: Path) -> None:
    uri = store(tmp_path)
    first = register(uri, "m", {"test_f1_macro": 0.5, "test_accuracy": 0.9})
    second = register(uri, "m", {"test_f1_macro": 0.6, "test_accuracy": 0.8})
    assert promote(uri, "m", run_id=first).version == 1
    with pytest.raises(PromotionRefused, match="test_accuracy 0.8000"):
        promote(uri, "m", run_id=second, metric="test_accuracy")
    assert promote(uri, "m", run_id=second).version == 2  # better on the default metric


def test_clear_errors_for_what_does_not_exist(tmp_path: Path) -> None:
    uri = store(tmp_path)
    register(uri, "m", {"test_f1_macro": 0.5})
    with pytest.raises(PromotionError, match="no challenger"):
        promote(uri, "m")
    with pytest.raises(PromotionError, match="no version 9"):
        promote(uri, "m", version=9)
    with pytest.raises(PromotionError, match="registered no version"):
        promote(uri, "m", run_id="0" * 32)
    with pytest.raises(PromotionError, match="no metric 'test_typo'.*test_f1_macro"):
        promote(uri, "m", version=1, metric="test_typo")


def test_retrain_promotion_reads_the_evaluate_record(tmp_path: Path) -> None:
    uri = store(tmp_path)
    run_id = register(uri, "m", {"test_f1_macro": 0.8})
    record = tmp_path / "logged_models.json"
    record.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "registered_model": None}))
    assert promote_after_gate(record, "f1_macro", 0.02).startswith("not promoted")
    record.write_text(
        json.dumps({"tracking_uri": uri, "registered_model": {"name": "m", "version": 1}})
    )
    assert promote_after_gate(record, "f1_macro", 0.02).startswith("promoted: models:/m@champion")
    register(uri, "m", {"test_f1_macro": 0.5})
    record.write_text(
        json.dumps({"tracking_uri": uri, "registered_model": {"name": "m", "version": 2}})
    )
    line = promote_after_gate(record, "f1_macro", 0.02)
    assert line.startswith("not promoted: refusing") and champion(uri, "m") == 1


def imgcls(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess[str]:
    """`imgcls ...` with MLFLOW_TRACKING_URI set; never raises on a failed exit."""
    return run(str(BIN / "imgcls"), *args, cwd=cwd, uri=uri, check=False)


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")
def test_challenger_champion_refusal_predict_and_serve(
    tmp_path: Path, mlflow_server: Server
) -> None:
    url = mlflow_server.url
    root = make_project(tmp_path / "proj", train={"epochs": 4})
    run("dvc", "repro", cwd=root, uri=url)
    logged = json.loads((root / "models/logged_models.json").read_text())
    assert logged["registered_model"] == {"name": "imgcls", "version": 1, "alias": "challenger"}
    client = MlflowClient(url)
    good = client.get_model_version_by_alias("imgcls", "challenger")
    assert good.run_id == logged["run_id"]

    out = imgcls("promote", cwd=root, uri=url)
    assert out.returncode == 0, out.stderr
    assert "models:/imgcls@champion -> version 1" in out.stdout
    good_f1 = client.get_run(good.run_id).data.metrics["test_f1_macro"]

    # a worse model, for real: one epoch at a learning rate far too small to learn anything
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=1, lr=1e-6, warmup_epochs=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(root, "bad params")
    run("dvc", "repro", cwd=root, uri=url)
    bad = client.get_model_version_by_alias("imgcls", "challenger")
    assert bad.version == "2"
    bad_f1 = client.get_run(bad.run_id).data.metrics["test_f1_macro"]
    assert bad_f1 < good_f1 - 0.2

    out = imgcls("promote", cwd=root, uri=url)
    assert out.returncode == 1
    assert f"{bad_f1:.4f}" in out.stderr and f"{good_f1:.4f}" in out.stderr
    assert client.get_model_version_by_alias("imgcls", "champion").version == "1"

    # predict with the champion: the good model's answer on a test image
    test_png = next(p for p in sorted((root / "data").rglob("*.png")))
    out = imgcls("predict", str(test_png), "--model", "models:/imgcls@champion",
                 "--format", "json", "--no-progress", cwd=root, uri=url)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["label"] in set("0123456789")

    # MLflow's own server resolves the alias too
    with model_server("models:/imgcls@champion", url, tmp_path / "serve.log") as served:
        body = {"inputs": [base64.b64encode(test_png.read_bytes()).decode()]}
        resp = requests.post(f"{served}/invocations", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    answer = resp.json()["predictions"][0]
    assert answer["error"] is None and len(answer["probabilities"]) == 10
    assert answer["label"] == rows[0]["label"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)

    out = imgcls("promote", "--force", cwd=root, uri=url)
    assert out.returncode == 0 and "(forced)" in out.stdout, out.stderr
    assert client.get_model_version_by_alias("imgcls", "champion").version == "2"
