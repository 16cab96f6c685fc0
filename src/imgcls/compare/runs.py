"""Finding the two runs (run id, DVC experiment, models:/ URI) and reading their artifacts."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgcls.errors import ImgclsError

PREDICTIONS = "evaluation/predictions_test.csv"
DETAILS = "evaluation/eval_details.json"
CONFUSION = "evaluation/confusion_matrix.json"


class CompareError(ImgclsError):
    """The runs cannot be found, read or compared."""


@dataclass(frozen=True)
class RunData:
    """One evaluated run as compare needs it."""

    ref: str  # as the user wrote it
    run_id: str
    name: str  # run name (the DVC experiment's for `dvc exp run`)
    params: dict[str, str]
    tags: dict[str, str]
    details: dict[str, Any]  # eval_details.json: test keys bare, val keys `val_`-prefixed
    classes: list[str]
    confusion: np.ndarray | None  # (K, K) counts of test; None for multi-label
    predictions: pd.DataFrame  # path, label, predicted, confidence, correct


def client_for(uri: str) -> Any:
    """An MlflowClient for `uri` (bounded retries for a server)."""
    from mlflow.tracking import MlflowClient

    from imgcls.tracking.store import apply_http_defaults

    apply_http_defaults(uri)
    # MLflow draws a progress bar per downloaded file: noise around a short table.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def _model_run_id(client: Any, ref: str) -> str:
    """The run that logged the model version `models:/name@alias` or `models:/name/version`."""
    body = ref.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except Exception as err:  # MlflowException: no such model / alias / version
        raise CompareError(
            f"{ref}: no such registered model version in the store ({str(err)[:200]}); "
            "list them with `mlflow models` / the MLflow UI's Models tab"
        ) from None
    if version.run_id:
        return version.run_id
    source = str(version.source or "")
    if source.startswith("models:/m-"):  # MLflow 3: a logged model, which names its run
        return client.get_logged_model(source.removeprefix("models:/")).source_run_id
    raise CompareError(f"{ref}: model version {version.version} names no run (source {source})")


def _experiment_ids(client: Any) -> list[str]:
    """Every active experiment of the store."""
    return [e.experiment_id for e in client.search_experiments()]


def resolve_run(client: Any, ref: str) -> str:
    """A run id from a run id, a DVC experiment name / run name, or a `models:/` URI."""
    if ref.startswith("models:/"):
        return _model_run_id(client, ref)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref).info.run_id
        except Exception:
            pass  # maybe an experiment named like an id: look it up by name below
    ids = _experiment_ids(client)
    quoted = ref.replace("'", "\\'")
    for query in (f"tags.`dvc.exp_name` = '{quoted}'", f"attributes.run_name = '{quoted}'"):
        runs = client.search_runs(ids, query, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id  # the latest: a rerun of the experiment supersedes
    known = sorted(
        {r.data.tags.get("dvc.exp_name") for r in client.search_runs(ids, max_results=200)}
        - {"", None}
    )
    raise CompareError(
        f"{ref!r} is neither a run id, a DVC experiment with an MLflow run, nor a models:/ URI "
        f"in the store; DVC experiments with runs: {', '.join(known[:20]) or '(none)'} "
        "(`dvc exp show` lists experiments; one run without tracking has no run to compare)"
    )


def _artifact(client: Any, run_id: str, path: str, dest: Path, ref: str) -> Path:
    """Download one artifact of a run, or fail naming it and what to do."""
    try:
        return Path(client.download_artifacts(run_id, path, str(dest)))
    except Exception:
        raise CompareError(
            f"{ref} (run {run_id}) has no artifact {path}: it was not evaluated, or evaluated by "
            "an imgcls older than `imgcls compare`; rerun its evaluate stage "
            "(`dvc exp apply <exp> && dvc repro evaluate`) and compare the new run"
        ) from None


def load_run(client: Any, ref: str, tmp: Path) -> RunData:
    """Resolve `ref` and read what compare needs from the run and its artifacts."""
    run_id = resolve_run(client, ref)
    run = client.get_run(run_id)
    dest = tmp / run_id
    dest.mkdir(parents=True, exist_ok=True)
    details = json.loads(_artifact(client, run_id, DETAILS, dest, ref).read_text())
    table = json.loads(_artifact(client, run_id, CONFUSION, dest, ref).read_text())
    counts = np.asarray(table["counts"], dtype=np.int64)
    predictions = pd.read_csv(
        _artifact(client, run_id, PREDICTIONS, dest, ref),
        keep_default_na=False,
        dtype={"path": str, "label": str, "predicted": str},
    )
    return RunData(
        ref=ref,
        run_id=run_id,
        name=run.info.run_name or run_id[:8],
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        details=details,
        classes=[str(c) for c in table["classes"]],
        confusion=counts if counts.ndim == 2 else None,
        predictions=predictions,
    )
