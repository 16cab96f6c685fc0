"""A copy of this project in a fresh git repository, and commands run in it (end-to-end tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from _datasets import REPO

BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", "pipeline", "src", ".dvc/config", ".dvcignore"]


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with the venv first on PATH (as `make pipeline` does)."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


GIT_IDENTITY = ["-c", "user.name=imgcls-test", "-c", "user.email=test@localhost"]


def project_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment stages run in: the venv first on PATH, no inherited tracking URI."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **(extra or {})}


def commit(root: Path, message: str = "project", *, init: bool = False) -> None:
    """`git add -A && git commit` (after `git init` when `init`)."""
    cmds = [["git", "init", "-q"]] if init else []
    if init:  # later commits in the copy (tests, benches) need an identity too
        cmds += [
            ["git", "config", "user.email", "test@localhost"],
            ["git", "config", "user.name", "test"],
        ]
    cmds += [["git", "add", "-A"], ["git", *GIT_IDENTITY, "commit", "-qm", message]]
    for cmd in cmds:
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)


def copy_files(dest: Path) -> None:
    """Copy the project's pipeline files (not its outputs) into `dest`."""
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)


def make_project(dest: Path, *, fast: bool = True, **overrides: dict) -> Path:
    """Copy the project into a fresh git repo: with fast params (3 epochs) unless `fast=False`.

    The one project factory of the tests and of `bench/` (via `bench/project.py`).
    """
    copy_files(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if fast:
        # fixed settings, not `auto`: two trainings compared bit for bit (resume, torchrun, two
        # nodes) must not probe their way to different precisions; tests/test_probe.py tests auto
        params["train"].update(epochs=3, precision="fp32", channels_last=False, cpu_threads=None)
    for section, values in overrides.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("/mlflow.db\n/data/cache/\n")
    commit(dest, init=True)
    return dest


def ran_stages(output: str) -> set[str]:
    """Stage names DVC reports as running."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def mlflow_runs(root: Path) -> list:
    """All runs in the project's default SQLite store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imgcls")
    return client.search_runs([exp.experiment_id]) if exp else []
