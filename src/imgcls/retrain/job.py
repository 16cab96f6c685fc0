"""The flow itself: detect, pull, repro, gate, push, commit, report (in this order, for safety)."""

from __future__ import annotations

from pathlib import Path

from imgcls.retrain.base import (
    LOCK_FILE,
    SKIP_CI,
    GateFailed,
    GateResult,
    RetrainConfig,
    RetrainError,
    RetrainResult,
)
from imgcls.retrain.detect import (
    changed_data_files,
    check_repository,
    data_outs_in_state,
    dvc_default_remote,
    dvc_status,
    dvc_yaml_stages,
    reproduce,
    stale_stages,
)
from imgcls.retrain.gate import metric_gate, resolve_ref
from imgcls.retrain.promote import promote_after_gate
from imgcls.retrain.report import build_report, write_report
from imgcls.retrain.tools import dvc, git, git_paths, run
from imgcls.retrain.versus import compare_with_champion


def git_tracked_outputs(root: Path) -> list[str]:
    """Outputs declared `cache: false` in dvc.yaml: git versions them (metrics, plots, reports)."""
    found = []
    for stage in dvc_yaml_stages(root).values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []) or []:
                if isinstance(item, dict):
                    found += [p for p, opts in item.items() if (opts or {}).get("cache") is False]
    return found


def commit_paths(root: Path) -> list[str]:
    """dvc.lock, the git-tracked outputs and any .gitignore DVC touched, where they exist."""
    listed = ["ls-files", "--modified", "--others", "--exclude-standard", "--", "*.gitignore"]
    ignores = git_paths(root, *listed)
    paths = [LOCK_FILE, *git_tracked_outputs(root), *ignores]
    return [p for p in dict.fromkeys(paths) if (root / p).exists()]


def commit_results(root: Path, message: str) -> str | None:
    """Commit only dvc.lock + metrics (never other staged work); None when nothing changed."""
    paths = commit_paths(root)
    if not paths:
        return None
    git(root, "add", "--", *paths)
    if run(["git", "diff", "--cached", "--quiet", "--", *paths], root, check=False).returncode == 0:
        return None
    git(root, "commit", "--quiet", "-m", message, "--", *paths)
    return git(root, "rev-parse", "HEAD")


def commit_message(gate: GateResult, changed: list[str]) -> str:
    """The bot commit's message; `[skip ci]` so that it cannot trigger the workflow again."""
    what = f"data change in {', '.join(changed)}" if changed else "pipeline change"
    score = f"{gate.metric} {gate.value:.4f}"
    if gate.baseline is not None:
        score += f", was {gate.baseline:.4f}"
    return f"retrain: update dvc.lock and metrics after {what} ({score}) {SKIP_CI}"


def retrain(cfg: RetrainConfig) -> RetrainResult:
    """Run the whole flow and write the report; raise GateFailed / RetrainError on failure."""
    root = cfg.root
    result = RetrainResult()
    base_ref: str | None = None
    try:
        check_repository(root, cfg)
        base_ref = resolve_ref(root, cfg.base)
        detect_and_pull(root, cfg, result)
        reproduce(root, [cfg.data_stage] if result.changed_data else [], result.ran_stages)
        result.gate = metric_gate(root, base_ref, cfg)
        print(f"metric gate: {result.gate.describe()}", flush=True)
        if cfg.promote:  # before promotion moves the alias: candidate vs the current champion
            out = root / "reports" / "compare" / "champion_vs_candidate"
            result.versus_champion = compare_with_champion(root / cfg.logged_models, root, out)
        if not result.gate.passed:
            raise GateFailed(
                f"metric gate: {result.gate.describe()}. Nothing was pushed or committed; "
                f"look at what changed in the data ({cfg.validation_report}) before raising "
                "--max-drop"
            )
        if cfg.push:
            dvc(root, "push", *remote_args(cfg), echo=True)
            result.pushed = True
        if cfg.commit:
            result.commit = commit_results(root, commit_message(result.gate, result.changed_data))
        if cfg.promote:  # last: the champion's data and outputs are pushed by now
            result.promotion = promote_after_gate(
                root / cfg.logged_models, cfg.metric, cfg.max_drop
            )
            print(f"champion: {result.promotion}", flush=True)
    except RetrainError as err:
        result.report = build_report(root, cfg, result, base_ref, error=str(err))
        write_report(result.report, cfg.report)
        raise
    result.report = build_report(root, cfg, result, base_ref)
    write_report(result.report, cfg.report)
    return result


def remote_args(cfg: RetrainConfig) -> list[str]:
    """`-r NAME` when a remote was named, else nothing (DVC's default remote)."""
    return ["-r", cfg.remote] if cfg.remote else []


def detect_and_pull(root: Path, cfg: RetrainConfig, result: RetrainResult) -> None:
    """Find changed data, restore the committed outputs from the remote, find outdated stages."""
    if unrecorded := data_outs_in_state(dvc_status(root), {"modified"}):
        raise RetrainError(
            f"{', '.join(unrecorded)} changed in the workspace but the change is not recorded; "
            f"run `dvc add {' '.join(unrecorded)}` (and commit the .dvc file) before retraining"
        )
    result.changed_data = changed_data_files(root)
    if cfg.remote or dvc_default_remote(root):
        # --allow-missing: outputs of a dvc.lock never pushed (first run, failed run) are
        # simply rebuilt by `dvc repro`; missing *input* data is caught just below
        dvc(root, "pull", "--allow-missing", *remote_args(cfg), echo=True)
    else:
        print("pull: no DVC remote configured; using the workspace as it is", flush=True)
    status = dvc_status(root)
    if missing := data_outs_in_state(status, {"deleted", "not in cache"}):
        raise RetrainError(
            f"{', '.join(missing)} is tracked by DVC but neither in the workspace nor on the "
            "remote; run `dvc push` where the data was added (with the same remote configured)"
        )
    result.stale_stages = stale_stages(status)
    print(_detect_line(result), flush=True)


def _detect_line(result: RetrainResult) -> str:
    """What the change detection found, for the log."""
    if not result.changed_data and not result.stale_stages:
        return "detect: nothing changed; every stage is up to date"
    parts = []
    if result.changed_data:
        parts.append(f"tracked data changed ({', '.join(result.changed_data)})")
    if result.stale_stages:
        parts.append(f"outdated stages: {', '.join(result.stale_stages)}")
    return "detect: " + "; ".join(parts)
