"""git and dvc as subprocesses: this interpreter's tools first on PATH, errors redacted."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from imgcls.retrain.base import RetrainError
from imgcls.retrain.redaction import redact

log = logging.getLogger("imgcls.retrain")


def tool_env() -> dict[str, str]:
    """Environment for git / dvc: this interpreter's bin folder first, so stages run `python`."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{path}", "DVC_NO_ANALYTICS": "1"}


def run(
    cmd: list[str], root: Path, *, check: bool = True, echo: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a git / dvc command in `root`; with `echo`, stream its output while capturing it."""
    log.debug("$ %s", " ".join(cmd))
    try:
        if not echo:
            proc = subprocess.run(
                cmd, cwd=root, env=tool_env(), capture_output=True, text=True, check=False
            )
        else:
            proc = _run_echoed(cmd, root)
    except FileNotFoundError:
        raise RetrainError(
            f"`{cmd[0]}` is not installed or not on PATH; install it (dvc comes with imgcls: "
            "`pip install -e .`) and run again"
        ) from None
    if check and proc.returncode != 0:
        detail = redact((proc.stderr or proc.stdout).strip())
        raise RetrainError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{detail}")
    return proc


def _run_echoed(cmd: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout+stderr merged, copied line by line (redacted) to our stdout (live logs)."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=root,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            # the job log of a public repository is public too, and GitHub masks only the exact
            # secret values, not the host of a URI or a login-less form of it
            sys.stdout.write(redact(line))
            sys.stdout.flush()
            lines.append(line)
    out = "".join(lines)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, out)


def git(root: Path, *args: str, check: bool = True) -> str:
    """Run git and return its stripped stdout."""
    return run(["git", *args], root, check=check).stdout.strip()


def git_paths(root: Path, *args: str) -> list[str]:
    """Paths a git listing command prints, NUL-separated (`-z`: no quoting of odd names)."""
    return [p for p in run(["git", *args[:1], "-z", *args[1:]], root).stdout.split("\0") if p]


def dvc(root: Path, *args: str, echo: bool = False) -> str:
    """Run dvc and return its output."""
    return run(["dvc", *args], root, echo=echo).stdout
