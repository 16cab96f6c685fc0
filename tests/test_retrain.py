"""`imgcls retrain`: the CI retrain job, on real git repositories and a real local DVC remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _datasets import REPO, write_pattern_dataset
from _project import make_project
from imgcls.retrain import (
    REDACTED,
    SKIP_CI,
    UI_URL_ENV,
    GateResult,
    RetrainConfig,
    RetrainError,
    baseline_metric,
    build_report,
    changed_data_files,
    commit_message,
    commit_results,
    git_tracked_outputs,
    mlflow_link,
    ran_stages,
    read_metric,
    redact,
    resolve_ref,
    run,
    validation_summary,
    write_report,
)

BIN = Path(sys.executable).parent


def sh(
    *cmd: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with the venv first on PATH and no GitHub job summary inherited."""
    full = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for var in ("MLFLOW_TRACKING_URI", "GITHUB_STEP_SUMMARY"):
        full.pop(var, None)
    full.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def git_repo(root: Path) -> Path:
    """An empty git repository with a committer identity."""
    root.mkdir(parents=True, exist_ok=True)
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh("git", "config", "user.email", "t@localhost", cwd=root)
    sh("git", "config", "user.name", "test", cwd=root)
    return root


def commit_all(root: Path, message: str) -> str:
    """Commit everything and return the new HEAD."""
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", message, cwd=root)
    return sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()


def config(root: Path, **kw: object) -> RetrainConfig:
    """The CLI's defaults, rooted at `root`."""
    values: dict = dict(
        root=root,
        base="main",
        max_drop=0.02,
        metric="f1_macro",
        metrics_file="metrics/eval.json",
        data_stage="ingest",
        report=root / "reports/retrain.md",
        validation_report="reports/validation.md",
        confusion_image="reports/figures/confusion_matrix.png",
        run_file="models/run.json",
    )
    values.update(kw)
    return RetrainConfig(**values)


# ----------------------------------------------------------------------------- gate


@pytest.mark.parametrize(
    ("value", "baseline", "passed"),
    [(0.95, 0.96, True), (0.94, 0.96, True), (0.93, 0.96, False), (0.5, None, True), (1, 1, True)],
)
def test_gate_allows_at_most_max_drop(value: float, baseline: float | None, passed: bool) -> None:
    gate = GateResult("f1_macro", value, baseline, 0.02, "main")
    assert gate.passed is passed
    assert ("FAILED" in gate.describe()) is not passed
    assert "f1_macro" in gate.describe()


def test_baseline_is_the_committed_metric_on_the_base_ref(tmp_path: Path) -> None:
    root = git_repo(tmp_path / "repo")
    (root / "README").write_text("x")
    first = commit_all(root, "no metrics yet")
    (root / "metrics").mkdir()
    (root / "metrics/eval.json").write_text(json.dumps({"f1_macro": 0.91, "accuracy": 0.9}))
    commit_all(root, "metrics")
    (root / "metrics/eval.json").write_text(json.dumps({"f1_macro": 0.10}))  # workspace differs
    cfg = config(root)
    assert baseline_metric(root, resolve_ref(root, "main"), cfg) == pytest.approx(0.91)
    assert baseline_metric(root, first, cfg) is None  # no metrics there: no baseline

    # CI checkouts of a pull request have origin/main but no local main
    sh("git", "branch", "-m", "main", "work", cwd=root)
    sh("git", "update-ref", "refs/remotes/origin/main", "HEAD", cwd=root)
    assert resolve_ref(root, "main") == "origin/main"
    assert baseline_metric(root, "origin/main", cfg) == pytest.approx(0.91)
    with pytest.raises(RetrainError, match="fetch-depth: 0"):
        resolve_ref(root, "no-such-branch")


def test_missing_or_bad_metric_names_file_and_key() -> None:
    assert read_metric({"f1_macro": "0.5"}, "f1_macro", "x.json") == 0.5
    with pytest.raises(RetrainError, match=r"x\.json: no key 'f1_macr'.*--metric"):
        read_metric({"f1_macro": 0.5}, "f1_macr", "x.json")
    with pytest.raises(RetrainError, match="not a number"):
        read_metric({"f1_macro": "n/a"}, "f1_macro", "x.json")


# ----------------------------------------------------------------------------- detect


def test_changed_data_is_relative_to_the_last_dvc_lock_commit(tmp_path: Path) -> None:
    root = git_repo(tmp_path / "repo")
    sh("dvc", "init", "-q", cwd=root)
    write_pattern_dataset(root, per_class=2, rel="data/images")
    sh("dvc", "add", "-q", "data/images", cwd=root)
    assert changed_data_files(root) == ["data/images.dvc"]  # never ran: all data is new
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    commit_all(root, "data + lock")
    assert changed_data_files(root) == []

    write_pattern_dataset(root, per_class=3, seed=1, rel="data/images")
    sh("dvc", "add", "-q", "data/images", cwd=root)  # autostage off: .dvc file only modified
    assert changed_data_files(root) == ["data/images.dvc"]
    commit_all(root, "more data")
    assert changed_data_files(root) == ["data/images.dvc"]  # committed after the lock
    (root / "dvc.lock").write_text("schema: '2.0'\n# rerun\n")
    commit_all(root, "lock")
    assert changed_data_files(root) == []


def test_ran_stages_parses_dvc_output() -> None:
    out = (
        "Running stage 'ingest':\n> python x\nStage 'split' didn't change\nRunning stage 'train':\n"
    )
    assert ran_stages(out) == ["ingest", "train"]


# ----------------------------------------------------------------------------- commit


def test_git_tracked_outputs_are_the_uncached_ones() -> None:
    outs = git_tracked_outputs(REPO)
    assert {"metrics/eval.json", "metrics/train.json", "reports/validation.md"} <= set(outs)
    assert "plots/confusion.csv" in outs
    assert "models/model.pt" not in outs and "data/raw" not in outs


def test_commit_takes_only_lock_and_metrics_and_skips_ci(tmp_path: Path) -> None:
    root = git_repo(tmp_path / "repo")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / "notes.txt").write_text("v1")
    commit_all(root, "start")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / "metrics").mkdir()
    (root / "metrics/eval.json").write_text('{"f1_macro": 1.0}\n')
    (root / "notes.txt").write_text("v2, staged by the user")
    sh("git", "add", "notes.txt", cwd=root)

    gate = GateResult("f1_macro", 1.0, 0.99, 0.02, "main")
    message = commit_message(gate, ["data/images.dvc"])
    assert message.endswith(SKIP_CI) and "data/images.dvc" in message
    sha = commit_results(root, message)
    assert sha == sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()
    files = sh("git", "show", "--name-only", "--format=%B", "HEAD", cwd=root).stdout
    assert SKIP_CI in files and "dvc.lock" in files and "metrics/eval.json" in files
    assert "notes.txt" not in files
    staged = sh("git", "diff", "--cached", "--name-only", cwd=root).stdout.split()
    assert staged == ["notes.txt"]  # the user's staged work is left as it was
    assert commit_results(root, message) is None  # nothing changed: no empty commit


# ----------------------------------------------------------------------------- report


def test_mlflow_link_for_server_local_store_and_no_run(tmp_path: Path) -> None:
    run_file = tmp_path / "run.json"
    server = "https://alice:pw-0123@ml.example:5000/"
    run_file.write_text(json.dumps({"run_id": "abc123", "tracking_uri": server}))
    # a server's URI is never shown (it may hold a login; the report becomes a PR comment) ...
    line = mlflow_link(run_file, env={})
    assert "abc123" in line and "ml.example" not in line and "alice" not in line
    # ... a link appears only with the public UI address, set on purpose
    public = {UI_URL_ENV: "https://mlflow.example.org/"}
    assert mlflow_link(run_file, env=public) == (
        "[MLflow run `abc123`](https://mlflow.example.org/#/runs/abc123)"
    )
    run_file.write_text(json.dumps({"run_id": "abc123", "tracking_uri": "sqlite:////x/mlflow.db"}))
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in mlflow_link(run_file, env={})
    run_file.write_text(json.dumps({"run_id": None}))
    assert "disabled" in mlflow_link(run_file)
    assert "No MLflow run" in mlflow_link(tmp_path / "missing.json")


# Real-looking secrets (AWS's documented example key, a GitHub token's shape) as CI would hold
# them, and tool output quoting them the way DVC, botocore, requests and git print errors.
SECRET_ENV = {
    "MLFLOW_TRACKING_URI": "https://ci-bot:Tr4ck-pw-77@mlflow.corp.example:5000/",
    "MLFLOW_TRACKING_USERNAME": "ci-bot",
    "MLFLOW_TRACKING_PASSWORD": "Tr4ck-pw-77",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "DVC_REMOTE_URL": "s3://imgcls-private-store/cache",
    "MY_SERVICE_TOKEN": "tok-9f8e7d6c5b4a",
}
LEAKY_OUTPUT = """\
ERROR: failed to push data to the cloud - An error occurred (SignatureDoesNotMatch) when calling \
the PutObject operation: aws_access_key_id=AKIAIOSFODNN7EXAMPLE \
aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
ERROR: unexpected error - s3://imgcls-private-store/cache/files/md5/3f/2a: Forbidden
requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: \
https://ci-bot:Tr4ck-pw-77@mlflow.corp.example:5000/api/2.0/mlflow/runs/create
MlflowException: API request to https://mlflow.corp.example:5000/api/2.0/mlflow/runs/create \
failed: HTTPSConnectionPool(host='mlflow.corp.example', port=5000)
fatal: unable to access 'https://x-access-token:\
ghs_16C7e42F292c6912E7710c838347Ae178B4a@github.com/o/r/': 403
> GET /data?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026&X-Amz-Signature=9e1f0c2d3b4a HTTP/1.1
> Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaS1ib3QifQ.c2lnbmF0dXJlLXZhbHVl
service said: tok-9f8e7d6c5b4a is not valid (password: hunter2-long)
"""
LEAKED = [
    "Tr4ck-pw-77",
    "mlflow.corp.example",
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "imgcls-private-store",
    "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    "9e1f0c2d3b4a",
    "eyJhbGciOiJIUzI1NiJ9",
    "tok-9f8e7d6c5b4a",
    "hunter2-long",
]


def test_redact_removes_every_secret_and_keeps_the_message() -> None:
    clean = redact(LEAKY_OUTPUT, env=SECRET_ENV)
    assert [s for s in LEAKED if s in clean] == []
    # what the reader needs stays: which operation failed, with which status
    for kept in ("SignatureDoesNotMatch", "PutObject", "401 Client Error", "/api/2.0/mlflow/runs"):
        assert kept in clean
    assert clean.count(REDACTED) >= len(LEAKED)
    # the patterns alone (no env given: a laptop without the secrets) still catch the shapes
    bare = redact(LEAKY_OUTPUT, env={})
    for shape in ("Tr4ck-pw-77", "AKIAIOSFODNN7EXAMPLE", "ghs_16C7e42F", "eyJhbGci", "hunter2"):
        assert shape not in bare
    # ordinary text is left alone: short env values and words that merely mention secrets
    text = "stage `train` failed at main; see the secrets section of docs/ci.md (2 tokens)"
    assert redact(text, env={"SOME_KEY": "1", "CI_TOKEN": "train", "A_SECRET": "main"}) == text


def test_report_and_job_summary_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PR comment / job summary of a failed run whose DVC error quotes every secret."""
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    root = git_repo(tmp_path / "repo")
    (root / "models").mkdir()
    uri = SECRET_ENV["MLFLOW_TRACKING_URI"]
    (root / "models/run.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": uri}))
    (root / "reports").mkdir()
    (root / "reports/validation.md").write_text(
        f"# Data validation: FAILED\n\nsource {SECRET_ENV['DVC_REMOTE_URL']} unreadable\n"
    )
    from imgcls.retrain import RetrainResult

    cfg = config(root)
    error = f"`dvc push` failed (exit 1):\n{LEAKY_OUTPUT}"
    text = build_report(root, cfg, RetrainResult(ran_stages=["train"]), None, error=error)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    write_report(text, cfg.report)
    for written in (text, cfg.report.read_text(), summary.read_text()):
        assert [s for s in LEAKED if s in written] == []
        assert "`dvc push` failed" in written and "`train`" in written and "r1" in written
    # and a report built elsewhere is redacted on the way out as well
    write_report(f"raw {uri}", tmp_path / "raw.md")
    assert "Tr4ck" not in (tmp_path / "raw.md").read_text()


def test_failed_command_error_is_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool whose error quotes the secrets: the RetrainError (printed to the log) does not."""
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    script = "import os, sys; sys.exit('cannot reach ' + os.environ['MLFLOW_TRACKING_URI'])"
    with pytest.raises(RetrainError) as err:
        run([sys.executable, "-c", script], tmp_path)
    assert "cannot reach [redacted]" in str(err.value)
    assert "Tr4ck" not in str(err.value) and "mlflow.corp.example" not in str(err.value)


def test_report_has_verdict_validation_figure_and_goes_to_job_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = git_repo(tmp_path / "repo")
    (root / "reports/figures").mkdir(parents=True)
    (root / "reports/validation.md").write_text(
        "# Data validation: PASSED\n\n90 files, 90 valid.\n\n## Expectations\n\n| a |\n"
    )
    (root / "reports/figures/confusion_matrix.png").write_bytes(b"\x89PNG")
    (root / "models").mkdir()
    (root / "models/run.json").write_text(json.dumps({"run_id": "r1", "tracking_uri": "http://h"}))
    from imgcls.retrain import RetrainResult

    result = RetrainResult(
        changed_data=["data/images.dvc"],
        ran_stages=["ingest", "train"],
        gate=GateResult("f1_macro", 0.5, 0.9, 0.02, "main"),
    )
    cfg = config(root)
    text = build_report(root, cfg, result, None, error="metric gate: FAILED")
    assert text.startswith("# Retrain failed")
    assert "`data/images.dvc`" in text and "`ingest`, `train`" in text
    assert "**Data validation: PASSED**" in text and "Expectations" not in text
    assert "`reports/figures/confusion_matrix.png`" in text
    assert "MLflow run `r1`" in text and "http://h" not in text  # no server URI in a comment
    assert validation_summary(root / "nope.md").startswith("_No validation report")

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    write_report(text, cfg.report)
    assert cfg.report.read_text() == text
    assert summary.read_text().startswith("earlier step\n# Retrain failed")  # appended


# ----------------------------------------------------------------------------- CLI errors


def test_cli_outside_a_repository_fails_with_a_message(tmp_path: Path) -> None:
    proc = sh(str(BIN / "imgcls"), "retrain", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "is not a git repository" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_without_a_remote_fails_before_training(tmp_path: Path) -> None:
    root = git_repo(tmp_path / "repo")
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    commit_all(root, "init")
    proc = sh(str(BIN / "imgcls"), "retrain", cwd=root, check=False)
    assert proc.returncode == 1
    assert "dvc remote add -d" in proc.stderr and "--no-push" in proc.stderr
    assert "Retrain failed" in (root / "reports/retrain.md").read_text()
    bad = sh(
        str(BIN / "imgcls"), "retrain", "--no-push", "--data-stage", "x", cwd=root, check=False
    )
    assert "--data-stage 'x' is not a stage in dvc.yaml" in bad.stderr


def test_unrecorded_data_change_is_refused(tmp_path: Path) -> None:
    root = git_repo(tmp_path / "repo")
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_pattern_dataset(root, per_class=2, rel="data/images")
    sh("dvc", "add", "-q", "data/images", cwd=root)
    commit_all(root, "data")
    write_pattern_dataset(root, per_class=3, seed=1, rel="data/images")  # no `dvc add`
    proc = sh(str(BIN / "imgcls"), "retrain", "--no-push", cwd=root, check=False)
    assert proc.returncode == 1
    assert "run `dvc add data/images`" in proc.stderr


TOY_DVC_YAML = """\
stages:
  ingest:
    cmd: python score.py
    deps: [score.py, data/images]
    outs: [out/model.txt]
    metrics:
      - metrics/eval.json:
          cache: false
"""
TOY_SCORE = """\
import json, os, pathlib, sys
text = pathlib.Path("data/images/score.txt").read_text().strip()
if text == "boom":
    # as a stage's traceback may: quote the tracking server it could not reach
    print("could not log to", os.environ.get("MLFLOW_TRACKING_URI"), file=sys.stderr)
    sys.exit("score.py: the data is broken")
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/model.txt").write_text(text)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/eval.json").write_text(json.dumps({"f1_macro": float(text)}))
"""


def test_failing_stage_pushes_and_commits_nothing(tmp_path: Path) -> None:
    """A one-stage toy pipeline (fast): a stage that fails stops the flow before push/commit."""
    root = git_repo(tmp_path / "repo")
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote"), cwd=root)
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    (root / "score.py").write_text(TOY_SCORE)
    (root / "data/images").mkdir(parents=True)
    (root / "data/images/score.txt").write_text("boom")
    sh("dvc", "add", "-q", "data/images", cwd=root)
    before = commit_all(root, "toy pipeline")

    proc = sh(str(BIN / "imgcls"), "retrain", cwd=root, check=False, env=SECRET_ENV)
    assert proc.returncode == 1
    assert "dvc repro" in proc.stderr and "the data is broken" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip() == before
    assert not (tmp_path / "remote").exists()  # nothing was pushed
    report = (root / "reports/retrain.md").read_text()
    assert report.startswith("# Retrain failed") and "`ingest`" in report
    # the stage's tail is quoted, its secrets are not (the report becomes a PR comment)
    assert "could not log to [redacted]" in report and "the data is broken" in report
    assert "Tr4ck-pw-77" not in report and "mlflow.corp.example" not in report
    assert "Tr4ck-pw-77" not in proc.stderr.split("Its last lines:")[-1]
    assert "could not log to [redacted]" in proc.stdout  # DVC's output, echoed live, too
    assert "Tr4ck-pw-77" not in proc.stdout


# ----------------------------------------------------------------------------- end to end

FAST = {
    "data": {"source": "data/images"},
    "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16], "dropout": 0.0}},
    "augment": {"train": []},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0},
    "tracking": {"enabled": False},
}


def remote_files(remote: Path) -> set[str]:
    """Every object in the local DVC remote."""
    return {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}


def retrain_cli(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `imgcls retrain` and return (exit code, stdout + stderr)."""
    proc = sh(str(BIN / "imgcls"), "retrain", *args, cwd=root, check=False, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def head(root: Path) -> str:
    """The current commit."""
    return sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()


def add_images(root: Path, per_class: int, seed: int) -> None:
    """More pattern images, under new file names, in the tracked folder."""
    write_pattern_dataset(root / "new", per_class=per_class, seed=seed, rel="x")
    for src in sorted((root / "new/x").rglob("*.png")):
        shutil.move(src, root / "data/images" / src.parent.name / f"s{seed}-{src.name}")
    shutil.rmtree(root / "new")


def shuffle_labels(root: Path, seed: int) -> None:
    """Move every image into a random class folder: the labels become noise."""
    files = sorted((root / "data/images").rglob("*.png"))
    classes = sorted(p.name for p in (root / "data/images").iterdir())
    rng = np.random.default_rng(seed)
    staged = []
    for i, path in enumerate(files):
        tmp = root / "data/images" / f".{i}.tmp"
        path.rename(tmp)
        staged.append(tmp)
    for i, tmp in enumerate(staged):
        tmp.rename(root / "data/images" / classes[rng.integers(len(classes))] / f"{i:04d}.png")


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")
def test_retrain_detects_gates_pushes_and_commits(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", **FAST)
    sh("git", "branch", "-M", "main", cwd=root)  # whatever git's default branch name is
    remote = tmp_path / "remote"
    write_pattern_dataset(root, per_class=20, rel="data/images")
    sh("dvc", "remote", "add", "-d", "storage", str(remote), cwd=root)
    sh("dvc", "add", "-q", "data/images", cwd=root)
    commit_all(root, "images")

    # 1. first run: no metrics on main yet, so no baseline; everything runs and is pushed
    code, out = retrain_cli(root)
    assert code == 0, out
    assert ran_stages(out) == ["ingest", "validate", "split", "train", "evaluate"]
    assert "no baseline" in out
    assert SKIP_CI in sh("git", "log", "-1", "--format=%s", cwd=root).stdout
    assert sh("git", "status", "--porcelain", "dvc.lock", "metrics", cwd=root).stdout == ""
    first_push = remote_files(remote)
    assert first_push
    baseline = head(root)
    # tracking is off here: nothing was registered, so the passed gate promotes nothing (and
    # says so); promotion on a passed gate is tested in test_promote.py against a real store
    assert "champion: not promoted" in out and "tracking off" in out

    # 2. new images: the change is detected, all stages rerun, the gate passes, all is pushed
    add_images(root, per_class=10, seed=7)
    sh("dvc", "add", "-q", "data/images", cwd=root)
    commit_all(root, "more images")
    summary = tmp_path / "summary.md"
    code, out = retrain_cli(root, "--base", baseline, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert code == 0, out
    assert "tracked data changed (data/images.dvc)" in out
    assert ran_stages(out) == ["ingest", "validate", "split", "train", "evaluate"]
    assert "metric gate: f1_macro" in out and "passed" in out
    manifest = (root / "data/interim/manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 90
    assert remote_files(remote) > first_push  # new images and new outputs went up
    changed = sh("git", "show", "--name-only", "--format=%s", "HEAD", cwd=root).stdout
    # the test supports grew with the new images (the headline may stay at 1.0 on this easy data)
    assert SKIP_CI in changed and "dvc.lock" in changed and "reports/eval_details.json" in changed
    assert summary.read_text().startswith("# Retrain passed")
    assert "Registry champion: not promoted" in summary.read_text()
    assert (root / "reports/retrain.md").read_text().strip() == summary.read_text().strip()

    # 3. nothing changed: no stage reruns, nothing new is pushed or committed
    pushed, commit = remote_files(remote), head(root)
    code, out = retrain_cli(root, "--base", baseline)
    assert code == 0, out
    assert "nothing changed" in out
    assert ran_stages(out) == []
    assert head(root) == commit and remote_files(remote) == pushed

    # 4. labels shuffled on purpose: retrained, the gate fails, nothing pushed or committed
    shuffle_labels(root, seed=3)
    sh("dvc", "add", "-q", "data/images", cwd=root)
    data_commit = commit_all(root, "oops: labels shuffled")
    code, out = retrain_cli(root, "--base", commit)
    assert code == 1, out
    assert "train" in ran_stages(out)
    assert "metric gate" in out and "FAILED" in out and "Nothing was pushed" in out
    assert head(root) == data_commit
    assert remote_files(remote) == pushed
    assert (root / "reports/retrain.md").read_text().startswith("# Retrain failed")
    assert "Registry champion" not in (root / "reports/retrain.md").read_text()
