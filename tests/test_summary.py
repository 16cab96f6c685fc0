"""`imgcls summary`: the end of a pipeline run, read from the stage outputs and git."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imgcls.cli import main
from imgcls.summary import SummaryPaths, mlflow_lines, summarize

HEADLINE = {"accuracy": 0.9, "balanced_accuracy": 0.88, "f1_macro": 0.87, "val_f1_macro": 0.91}
DETAILS = {
    **HEADLINE,
    **{"f1_cat": 0.95, "recall_cat": 0.97, "precision_cat": 0.93, "support_cat": 40},
    **{"f1_dog": 0.79, "recall_dog": 0.7, "precision_dog": 0.9, "support_dog": 20},
    **{"val_f1_dog": 0.1, "val_support_dog": 5},  # val's numbers never name the worst class
}


def _write(root: Path, name: str, data: dict) -> None:
    """A JSON stage output under root."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(data))


def _git(root: Path, *args: str) -> None:
    """git in root, with an identity."""
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The outputs of a finished run in a git repository, with the cwd inside it."""
    _write(tmp_path, "metrics/eval.json", HEADLINE)
    _write(tmp_path, "reports/eval_details.json", DETAILS)
    _write(
        tmp_path, "metrics/train.json", {"best_epoch": 7, "epochs_run": 9, "train_time_s": 61.04}
    )
    run = {"run_id": "abc123", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    _write(tmp_path, "models/run.json", run)
    (tmp_path / "reports/figures").mkdir(parents=True)
    (tmp_path / "reports/figures/confusion_matrix.png").write_bytes(b"png")
    _git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMGCLS_MLFLOW_UI_URL", raising=False)
    return tmp_path


def test_summary_names_headline_worst_class_figures_and_the_run(project: Path, capsys) -> None:
    main(["summary"])
    out = capsys.readouterr().out
    assert "test: accuracy 0.9000, balanced accuracy 0.8800, macro-F1 0.8700" in out
    assert "worst class by F1: dog (F1 0.7900, recall 0.7000, precision 0.9000, 20 test" in out
    assert "train: best epoch 7 of 9, 61.0 s" in out
    assert "vs HEAD: no committed metrics to compare with" in out  # no commit yet
    assert "figures: reports/figures/ (confusion_matrix.png)" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{project}/mlflow.db" in out
    assert "http://127.0.0.1:5000/#/runs/abc123" in out
    # fits a terminal; only the command that names the store's path may be longer
    assert max(len(line) for line in out.splitlines() if str(project) not in line) <= 100


def test_summary_shows_the_change_against_the_committed_metrics(project: Path) -> None:
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "baseline")
    assert "vs HEAD: unchanged" in summarize(SummaryPaths())
    _write(project, "metrics/eval.json", {**HEADLINE, "accuracy": 0.925, "f1_macro": 0.85})
    text = summarize(SummaryPaths())
    assert "vs HEAD: accuracy +0.0250 (was 0.9000)" in text
    assert "macro-F1 -0.0200 (was 0.8700)" in text


def test_summary_without_a_run_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["summary"])
    assert exc.value.code == 1


def test_mlflow_line_for_a_server_hides_its_login(tmp_path: Path) -> None:
    run = {"run_id": "r1", "tracking_uri": "https://alice:s3cret@mlflow.example.com:8443/"}
    _write(tmp_path, "run.json", run)
    (line,) = mlflow_lines(tmp_path / "run.json", env={})
    assert line == "MLflow run: https://mlflow.example.com:8443/#/runs/r1"
    ui = {"IMGCLS_MLFLOW_UI_URL": "https://ui.example.com/"}
    assert mlflow_lines(tmp_path / "run.json", env=ui) == [
        "MLflow run: https://ui.example.com/#/runs/r1"
    ]
    _write(tmp_path, "run.json", {"run_id": None, "tracking_uri": None})
    assert "tracking was off" in mlflow_lines(tmp_path / "run.json", env={})[0]


def test_summary_names_the_model_the_evaluate_stage_logged(project: Path) -> None:
    assert "model:" not in summarize(SummaryPaths())  # no record: tracking off / not run
    record = {"run_id": "abc123", "serving_model_uri": "models:/m-1", "registered_model": None}
    _write(project, "models/logged_models.json", record)
    assert "model: models:/m-1 (logged, not registered)" in summarize(SummaryPaths())
    record["registered_model"] = {"name": "digits", "version": 3}
    _write(project, "models/logged_models.json", record)
    text = summarize(SummaryPaths())
    assert "model: models:/digits/3 (serve: mlflow models serve -m models:/digits/3" in text
    record["registered_model"] = {"name": "digits", "version": 4, "alias": "challenger"}
    _write(project, "models/logged_models.json", record)
    text = summarize(SummaryPaths())
    assert "model: models:/digits@challenger (version 4); promote: imgcls promote" in text
