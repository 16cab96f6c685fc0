"""Throw-away copies of the project for benchmarks: the tests' one project factory, reused.

`tests/_project.py` is the single place that knows which files make a project and how its
commands run; benchmarks copy the project exactly as the end-to-end tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _project import BIN, commit, make_project, project_env  # noqa: E402


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment DVC / the stages run in: the venv first on PATH, the default store."""
    return project_env(extra)


def copy_project(dest: Path) -> Path:
    """Copy the pipeline files (not the outputs) with params.yaml as it is, in a new git repo."""
    return make_project(dest, fast=False)


__all__ = ["BIN", "REPO", "bench_env", "commit", "copy_project"]
