"""Skip or fail for a missing tool: a skip on a developer's machine, a failure where CI=true.

CI is meant to run every test; a skip there (a failed install, a renamed package) would pass
silently forever. GitHub Actions sets CI=true for every step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest


def ci_expects_every_test(env: Mapping[str, str] | None = None) -> bool:
    """True where CI=true (or 1 / yes)."""
    env = os.environ if env is None else env
    return env.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_tool(missing: str | None, install: str, env: Mapping[str, str] | None = None) -> None:
    """Nothing when `missing` is None; else skip, or fail under CI=true, saying what to install."""
    if missing is None:
        return
    if ci_expects_every_test(env):
        pytest.fail(f"CI=true but {missing} is not installed: {install}", pytrace=False)
    pytest.skip(f"{missing} not installed: {install}")
