"""What changed and what is stale (git + DVC), and the `dvc repro` that rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from imgcls.retrain.base import DVC_FILES, LOCK_FILE, REPRO_TAIL_LINES, RetrainConfig, RetrainError
from imgcls.retrain.redaction import redact
from imgcls.retrain.tools import dvc, git, git_paths, run


def check_repository(root: Path, cfg: RetrainConfig) -> None:
    """Fail fast (before any training) on a folder that is no git + DVC repository or no remote."""
    if run(["git", "rev-parse", "--git-dir"], root, check=False).returncode != 0:
        raise RetrainError(f"{root} is not a git repository; run `imgcls retrain` in the project")
    if not (root / ".dvc").is_dir():
        raise RetrainError(f"{root} has no .dvc folder; run `dvc init` once in the project root")
    if cfg.data_stage not in pipeline_stages(root):
        raise RetrainError(
            f"--data-stage {cfg.data_stage!r} is not a stage in dvc.yaml (stages: "
            f"{', '.join(pipeline_stages(root)) or 'none'}); name the stage that reads the data"
        )
    names = dvc_remotes(root)
    if cfg.remote and cfg.remote not in names:
        raise RetrainError(
            f"DVC remote {cfg.remote!r} is not configured (configured: "
            f"{', '.join(names) or 'none'}); add it with `dvc remote add {cfg.remote} <url>` "
            "or drop --remote"
        )
    if cfg.push and not cfg.remote and not dvc_default_remote(root):
        raise RetrainError(
            "no default DVC remote, so the results could not be pushed; set one with "
            "`dvc remote add -d storage /path/to/shared/folder` (or an s3:// URL, see "
            "docs/dvc.md), pass --remote NAME, or run with --no-push"
        )


def dvc_yaml_stages(root: Path) -> dict[str, Any]:
    """The `stages:` mapping of dvc.yaml."""
    path = root / "dvc.yaml"
    if not path.is_file():
        raise RetrainError(f"{path} does not exist; run `imgcls retrain` in the project root")
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}


def pipeline_stages(root: Path) -> list[str]:
    """Stage names in dvc.yaml."""
    return list(dvc_yaml_stages(root))


def dvc_remotes(root: Path) -> list[str]:
    """Names of the configured DVC remotes (`dvc remote list` prints `name<TAB>url` lines)."""
    return [line.split()[0] for line in dvc(root, "remote", "list").splitlines() if line.strip()]


def dvc_default_remote(root: Path) -> str:
    """The default remote's name, or "" when none is set."""
    proc = run(["dvc", "config", "core.remote"], root, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json`: outdated stages and `.dvc` files, keyed by name."""
    text = dvc(root, "status", "--json").strip()
    return json.loads(text) if text else {}


def data_outs_in_state(status: dict[str, Any], states: set[str]) -> list[str]:
    """Paths tracked by `.dvc` files whose `dvc status` state is one of `states`."""
    found = []
    for name, entries in status.items():
        if not name.endswith(".dvc"):
            continue
        for entry in entries:
            outs = entry.get("changed outs", {}) if isinstance(entry, dict) else {}
            found += [path for path, state in outs.items() if state in states]
    return sorted(found)


def stale_stages(status: dict[str, Any]) -> list[str]:
    """Pipeline stages (not `.dvc` files) that `dvc status` reports as out of date."""
    return sorted(name for name in status if not name.endswith(".dvc"))


def changed_data_files(root: Path) -> list[str]:
    """`.dvc` files changed since the last commit of dvc.lock (committed, staged or not)."""
    lock_commit = git(root, "log", "-1", "--format=%H", "--", LOCK_FILE, check=False)
    if lock_commit:
        changed = git_paths(root, "diff", "--name-only", lock_commit, "--", DVC_FILES)
    else:  # the pipeline never ran here: every tracked dataset is new to it
        changed = git_paths(root, "ls-files", "--", DVC_FILES)
    changed += git_paths(root, "ls-files", "--others", "--exclude-standard", "--", DVC_FILES)
    return sorted({p for p in changed if p and (root / p).is_file()})


def ran_stages(output: str) -> list[str]:
    """Stage names in DVC's "Running stage 'X':" lines, in order."""
    names = []
    for line in output.splitlines():
        if line.startswith("Running stage '"):
            names.append(line.split("'")[1])
    return names


def reproduce(root: Path, force: list[str], ran: list[str]) -> None:
    """`dvc repro` (forcing the `force` stages first, alone); append the stages run to `ran`."""
    commands = [["dvc", "repro", "--single-item", "--force", stage] for stage in force]
    for cmd in [*commands, ["dvc", "repro"]]:
        proc = run(cmd, root, check=False, echo=True)
        ran += [s for s in ran_stages(proc.stdout) if s not in ran]  # a forced stage: once
        if proc.returncode != 0:
            tail = redact("\n".join(proc.stdout.strip().splitlines()[-REPRO_TAIL_LINES:]))
            raise RetrainError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}); nothing was pushed or "
                "committed, and the failed stage kept its previous outputs and dvc.lock entry. "
                f"Its last lines:\n{tail}"
            )
