"""The metric gate: the new metric against the one committed on the base ref."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgcls.retrain.base import GateResult, RetrainConfig, RetrainError
from imgcls.retrain.tools import run


def resolve_ref(root: Path, ref: str) -> str:
    """`ref`, or `origin/<ref>` when only that exists (CI checkouts have no local main)."""
    for candidate in (ref, f"origin/{ref}"):
        rev = f"{candidate}^{{commit}}"
        if run(["git", "rev-parse", "--verify", "--quiet", rev], root, check=False).returncode == 0:
            return candidate
    raise RetrainError(
        f"base ref {ref!r} not found (nor origin/{ref}); fetch it (`git fetch origin {ref}`; in "
        "GitHub Actions check out with `fetch-depth: 0`) or pass --base with a branch or commit"
    )


def read_metric(data: Any, metric: str, where: str) -> float:
    """The metric's value from parsed metrics JSON, with an error naming the file and key."""
    if not isinstance(data, dict) or metric not in data:
        keys = ", ".join(sorted(data)[:12]) if isinstance(data, dict) else "none"
        raise RetrainError(
            f"{where}: no key {metric!r} (keys: {keys}); pick the gate metric with --metric"
        )
    try:
        return float(data[metric])
    except (TypeError, ValueError):
        raise RetrainError(f"{where}: {metric!r} is {data[metric]!r}, not a number") from None


def baseline_metric(root: Path, base_ref: str, cfg: RetrainConfig) -> float | None:
    """The committed metric at `base_ref`, or None when that commit has no metrics file."""
    proc = run(["git", "show", f"{base_ref}:{cfg.metrics_file}"], root, check=False)
    if proc.returncode != 0:
        return None
    where = f"{cfg.metrics_file} at {base_ref}"
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise RetrainError(f"{where} is not valid JSON: {err}") from None
    return read_metric(data, cfg.metric, where)


def current_metric(root: Path, cfg: RetrainConfig) -> float:
    """The metric the pipeline just wrote."""
    path = root / cfg.metrics_file
    if not path.is_file():
        raise RetrainError(
            f"{cfg.metrics_file} does not exist after `dvc repro`; is --metrics-file the "
            "evaluate stage's metrics output in dvc.yaml?"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RetrainError(f"{cfg.metrics_file} is not valid JSON: {err}") from None
    return read_metric(data, cfg.metric, cfg.metrics_file)


def metric_gate(root: Path, base_ref: str, cfg: RetrainConfig) -> GateResult:
    """Compare the new metric with the base ref's committed one."""
    return GateResult(
        metric=cfg.metric,
        value=current_metric(root, cfg),
        baseline=baseline_metric(root, base_ref, cfg),
        max_drop=cfg.max_drop,
        base=base_ref,
    )
