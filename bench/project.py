"""Throw-away copies of the project for benchmarks: pipeline files in a fresh git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", "pipeline", "src", ".dvc/config", ".dvcignore"]
GIT_IDENTITY = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment DVC / the stages run in: the venv first on PATH, the default store."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return {**env, **(extra or {})}


def copy_project(dest: Path) -> Path:
    """Copy the pipeline files (not the outputs) into `dest` and commit them in a new git repo."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dst)
    commit(dest, init=True)
    return dest


def commit(root: Path, *, init: bool = False) -> None:
    """`git add -A && git commit` (after `git init` when `init`)."""
    cmds = [["git", "init", "-q"]] if init else []
    cmds += [["git", "add", "-A"], ["git", *GIT_IDENTITY, "commit", "-qm", "bench"]]
    for cmd in cmds:
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
