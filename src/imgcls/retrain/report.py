"""The retrain report (Markdown): verdict, stages run, metrics diff, validation, MLflow run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from imgcls.io import write_text
from imgcls.retrain.base import UI_URL_ENV, RetrainConfig, RetrainResult
from imgcls.retrain.redaction import redact
from imgcls.retrain.tools import run


def validation_summary(path: Path) -> str:
    """The title and summary paragraph of the validate stage's Markdown report."""
    if not path.is_file():
        return f"_No validation report at `{path.name}`._"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            break
        lines.append(f"**{line[2:]}**" if line.startswith("# ") else line)
    return "\n".join(lines).strip()


def validation_file(root: Path, cfg: RetrainConfig) -> Path:
    """The validate stage's report, or its `-failed` twin when that one is newer (it failed)."""
    good = root / cfg.validation_report
    failed = good.with_name(f"{good.stem}-failed{good.suffix}")  # see pipeline/validate.py
    if failed.is_file() and (not good.is_file() or failed.stat().st_mtime > good.stat().st_mtime):
        return failed
    return good


def mlflow_link(path: Path, env: Mapping[str, str] | None = None) -> str:
    """A Markdown line naming the MLflow run recorded in models/run.json.

    A tracking *server's* URI is never written: it may hold a login and the report is posted as
    a pull-request comment. A link appears only when the public UI address is set in
    $IMGCLS_MLFLOW_UI_URL (in CI the repository variable MLFLOW_UI_URL).
    """
    env = os.environ if env is None else env
    if not path.is_file():
        return "_No MLflow run recorded (tracking disabled, or the train stage did not run)._"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return f"_`{path.name}` is not valid JSON._"
    run_id, uri = info.get("run_id"), str(info.get("tracking_uri") or "")
    if not run_id:
        return "_MLflow tracking was disabled for this run._"
    ui = env.get(UI_URL_ENV, "").strip()
    if ui.startswith(("http://", "https://")):
        # MLflow's UI routes `#/runs/<id>` straight to the run's page
        return f"[MLflow run `{run_id}`]({ui.rstrip('/')}/#/runs/{run_id})"
    if uri.startswith(("sqlite:", "file:", "/")):
        return (
            f"MLflow run `{run_id}` in `{uri}`, a store local to this machine (open it with "
            f"`mlflow ui --backend-store-uri {uri}`; set MLFLOW_TRACKING_URI to a shared server "
            f"and {UI_URL_ENV} to its public address to get a link here)"
        )
    return (
        f"MLflow run `{run_id}` on the tracking server (its address is not shown here; set "
        f"{UI_URL_ENV} to the UI's public address to get a link)"
    )


def metrics_diff(root: Path, base_ref: str) -> str:
    """`dvc metrics diff --md` between the base ref and the workspace."""
    proc = run(["dvc", "metrics", "diff", "--md", base_ref], root, check=False)
    if proc.returncode != 0:
        return f"_`dvc metrics diff` failed: {(proc.stderr or proc.stdout).strip()}_"
    return proc.stdout.strip() or "_No metric changed._"


def build_report(
    root: Path, cfg: RetrainConfig, result: RetrainResult, base_ref: str | None, error: str = ""
) -> str:
    """The Markdown job summary: verdict, what ran, metric diff, validation, figures, MLflow."""
    gate = result.gate
    ok = not error and gate is not None and gate.passed
    lines = [f"# Retrain {'passed' if ok else 'failed'} {'✅' if ok else '❌'}", ""]
    if error:
        lines += ["```", error.strip(), "```", ""]
    changed = ", ".join(f"`{p}`" for p in result.changed_data) or "none"
    ran = ", ".join(f"`{s}`" for s in result.ran_stages) or "none (everything was up to date)"
    lines += [f"- Tracked data changed since the last dvc.lock: {changed}", f"- Stages run: {ran}"]
    if gate is not None:
        lines.append(f"- Metric gate: {gate.describe()}")
    if result.promotion:
        lines.append(f"- Registry champion: {result.promotion}")
    pushed = "yes" if result.pushed else "no"
    lines += [f"- Pushed to the DVC remote: {pushed}", f"- Commit: {result.commit or 'none'}", ""]
    if base_ref is not None and (root / cfg.metrics_file).is_file():
        # GitHub renders <details> in job summaries and comments: the table can be long
        lines += [f"## Metrics vs `{base_ref}`", "", "<details><summary>dvc metrics diff</summary>"]
        lines += ["", metrics_diff(root, base_ref), "", "</details>", ""]
    if result.versus_champion:
        lines += ["## Candidate vs the current champion", "", "<details><summary>imgcls compare"]
        lines += ["</summary>", "", result.versus_champion, "", "</details>", ""]
    lines += ["## Data validation", "", validation_summary(validation_file(root, cfg)), ""]
    image = root / cfg.confusion_image
    where = f"`{cfg.confusion_image}`" if image.is_file() else "_not produced_"
    lines += ["## Confusion matrix", "", f"{where} (in the workflow's `retrain-report` artifact)"]
    lines += ["", "## MLflow", "", mlflow_link(root / cfg.run_file), ""]
    # every part above can quote tool output (DVC errors, metrics diff, file names): redact once
    return redact("\n".join(lines))


def write_report(text: str, path: Path) -> None:
    """Write the report file and append it to GitHub's job summary when running in Actions."""
    text = redact(text)  # idempotent; also holds for a report not made by build_report
    write_text(path, text)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:  # GitHub's file: append, never replace
            fh.write(text + "\n")
