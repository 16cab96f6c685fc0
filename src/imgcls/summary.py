"""`imgcls summary`: what the last pipeline run produced, in a few lines a person reads.

It reads only the stage outputs (metrics/eval.json, reports/eval_details.json,
metrics/train.json, models/run.json, models/logged_models.json) and git; no torch, no MLflow
import, so it answers in a fraction of a second after `dvc repro`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from imgcls.errors import ImgclsError
from imgcls.retrain import UI_URL_ENV  # the MLflow UI's public address, as for the CI report

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
WIDTH = 100  # longest line, so that the summary reads in a terminal (store paths excepted)

# Headline keys in the order they are printed, with the words used for them.
LABELS = {
    "accuracy": "accuracy",
    "subset_accuracy": "subset accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "macro-F1",
    "f1_micro": "micro-F1",
    "hamming_loss": "Hamming loss",
    "f1_at_threshold": "F1 at threshold",
    "precision_at_threshold": "precision at threshold",
    "recall_at_threshold": "recall at threshold",
    "average_precision": "average precision",
}
FIGURES = ("confusion_matrix.png", "misclassified.png", "pr_curves.png")


@dataclass(frozen=True)
class SummaryPaths:
    """The files the summary reads (defaults match dvc.yaml)."""

    metrics: Path = Path("metrics/eval.json")
    details: Path = Path("reports/eval_details.json")
    train: Path = Path("metrics/train.json")
    run_file: Path = Path("models/run.json")
    figures: Path = Path("reports/figures")
    logged_models: Path = Path("models/logged_models.json")  # written by evaluate


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ImgclsError(f"{path} is not valid JSON ({err}); rerun `dvc repro`") from None
    return data if isinstance(data, dict) else None


def committed_metrics(path: Path, ref: str) -> dict[str, Any] | None:
    """`path` as committed at `ref` (None outside git, before the first commit, or if absent)."""
    proc = subprocess.run(
        ["git", "show", f"{ref}:./{path.as_posix()}"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def headline_line(metrics: Mapping[str, Any]) -> str:
    """`test: accuracy 0.9556, balanced accuracy 0.9553, macro-F1 0.9551` (the keys present)."""
    parts = [f"{label} {metrics[k]:.4f}" for k, label in LABELS.items() if k in metrics]
    if "threshold" in metrics:
        parts.append(f"(threshold {metrics['threshold']:.3f})")
    return "test: " + ", ".join(parts)


def change_line(now: Mapping[str, Any], before: Mapping[str, Any] | None, ref: str) -> str:
    """The headline keys' change against the committed metrics, or why there is none."""
    if before is None:
        return f"vs {ref}: no committed metrics to compare with"
    keys = [k for k in LABELS if isinstance(now.get(k), float | int) and k in before]
    if not keys:
        return f"vs {ref}: no headline metric in common with the committed file"
    if all(now[k] == before[k] for k in keys):
        return f"vs {ref}: unchanged (these are the committed metrics)"
    changes = [f"{LABELS[k]} {now[k] - before[k]:+.4f} (was {before[k]:.4f})" for k in keys]
    return wrap_items(f"vs {ref}: ", changes)


def wrap_items(prefix: str, items: list[str], width: int = WIDTH) -> str:
    """`prefix` + comma-separated items, wrapped between items (continuations indented)."""
    lines = [prefix]
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(lines[-1]) + len(piece) > width and lines[-1].strip():
            lines.append("  ")
        lines[-1] += piece + " "
    return "\n".join(line.rstrip() for line in lines)


def worst_class_line(details: Mapping[str, Any] | None, multilabel: bool) -> str | None:
    """The test class (label) with the lowest F1, with its recall, precision and support."""
    if not details:
        return None
    # every class has a `support_<class>` test key (val's are `val_support_...`)
    names = [k.removeprefix("support_") for k in details if k.startswith("support_")]
    scored = [(details[f"f1_{n}"], n) for n in names if f"f1_{n}" in details]
    if not scored:
        return None
    f1, name = min(scored)
    what = "label" if multilabel else "class"
    return (
        f"worst {what} by F1: {name} (F1 {f1:.4f}, recall {details.get(f'recall_{name}', 0):.4f},"
        f" precision {details.get(f'precision_{name}', 0):.4f}, {details[f'support_{name}']} "
        f"test images)"
    )


def train_line(train: Mapping[str, Any] | None) -> str | None:
    """`train: best epoch 3 of 3, 11.2 s; val accuracy 0.9621`."""
    if not train or "best_epoch" not in train:
        return None
    line = f"train: best epoch {train['best_epoch']} of {train.get('epochs_run', '?')}"
    if "train_time_s" in train:
        line += f", {train['train_time_s']:.1f} s"
    if "val_accuracy" in train:
        line += f"; val accuracy {train['val_accuracy']:.4f}"
    return line


def without_password(uri: str) -> str:
    """An http(s) URI without its user-info part (a terminal may be shared or recorded)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def mlflow_lines(run_file: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Where the run's MLflow page is: a URL, or the one command that serves it."""
    env = os.environ if env is None else env
    info = read_json(run_file)
    if info is None:
        return [f"MLflow: no run recorded ({run_file} is missing)"]
    run_id, uri = info.get("run_id"), str(info.get("tracking_uri") or "")
    if not run_id:
        return ["MLflow: tracking was off for this run (tracking.enabled: false)"]
    ui = env.get(UI_URL_ENV, "").strip().rstrip("/")
    if ui.startswith(("http://", "https://")):
        return [f"MLflow run: {ui}/#/runs/{run_id}"]
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        return [f"MLflow run: {without_password(uri)}/#/runs/{run_id}"]
    return [
        f"MLflow run {run_id}, in a store on this machine; to open it:",
        f"  mlflow ui --backend-store-uri {uri}",
        f"  then {LOCAL_UI}/#/runs/{run_id}",
    ]


def model_line(logged_models: Path) -> str | None:
    """The evaluated model the evaluate stage logged: its registered version, or its URI."""
    info = read_json(logged_models) or {}
    registered = info.get("registered_model")
    if isinstance(registered, dict) and registered.get("name"):
        alias = registered.get("alias")  # `challenger` until `imgcls promote` makes it champion
        uri = f"models:/{registered['name']}/{registered.get('version')}"
        if alias:
            uri = f"models:/{registered['name']}@{alias} (version {registered.get('version')})"
            champion = f"models:/{registered['name']}@champion"
            return f"model: {uri}; promote: imgcls promote, serve: {champion}"
        return f"model: {uri} (serve: mlflow models serve -m {uri} --env-manager local)"
    if info.get("serving_model_uri"):
        return f"model: {info['serving_model_uri']} (logged, not registered)"
    return None


def figures_line(figures: Path) -> str | None:
    """The figures that exist, and the command that draws DVC's plots."""
    found = [name for name in FIGURES if (figures / name).is_file()]
    if not found:
        return None
    return f"figures: {figures}/ ({', '.join(found)})"


def summarize(paths: SummaryPaths, ref: str = "HEAD", env: Mapping[str, str] | None = None) -> str:
    """The whole summary as text (a few lines)."""
    metrics = read_json(paths.metrics)
    if metrics is None:
        raise ImgclsError(f"{paths.metrics} does not exist; run the pipeline first (`dvc repro`)")
    details = read_json(paths.details)
    lines = [headline_line(metrics)]
    if "val_f1_macro" in metrics:
        lines[0] += f"; val macro-F1 {metrics['val_f1_macro']:.4f}"
    optional = [
        worst_class_line(details, "subset_accuracy" in metrics),
        train_line(read_json(paths.train)),
        change_line(metrics, committed_metrics(paths.metrics, ref), ref),
        figures_line(paths.figures),
    ]
    lines += [line for line in optional if line]
    if details is not None:
        lines.append(f"every number: {paths.details}; curves: dvc plots show --open")
    lines += mlflow_lines(paths.run_file, env)
    lines += [line for line in [model_line(paths.logged_models)] if line]
    return "\n".join(lines)
