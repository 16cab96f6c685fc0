"""`imgcls promote`, and the retrain job's promotion once its gate passed: both move `champion`.

The comparison itself is imgcls.inference.aliases.promote; this module finds the store (as the
pipeline does: `MLFLOW_TRACKING_URI`, else `tracking.uri`, else `mlflow.db` at the root) and the
registered version the evaluate stage wrote to `models/logged_models.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from imgcls.config import load_params
from imgcls.inference.aliases import DEFAULT_METRIC, PromotionError, PromotionRefused, promote
from imgcls.retrain.redaction import redact
from imgcls.tracking import resolve_uri

DEFAULT_NAME = "imgcls"  # tracking.register_model's default


def store_and_name(params_path: Path, name: str | None) -> tuple[str, str]:
    """The tracking URI and registered model name the pipeline of `params_path` uses."""
    from imgcls.config import TrackingConfig

    tracking = load_params(params_path).tracking if params_path.is_file() else TrackingConfig()
    return resolve_uri(tracking, params_path.resolve().parent), (
        name or tracking.register_model or DEFAULT_NAME
    )


def promote_command(
    params_path: Path,
    name: str | None,
    version: int | None,
    run_id: str | None,
    metric: str | None,
    force: bool,
) -> str:
    """`imgcls promote`: promote in the pipeline's store; returns the line to print."""
    uri, name = store_and_name(params_path, name)
    done = promote(
        uri, name, version=version, run_id=run_id, metric=metric or DEFAULT_METRIC, force=force
    )
    return done.describe()


def mlflow_metric(metric: str) -> str:
    """metrics/eval.json key -> the run's metric key (the evaluate stage prefixes test ones)."""
    return metric if metric.startswith(("val_", "train_", "test_")) else f"test_{metric}"


def promote_after_gate(logged_models: Path, metric: str, max_drop: float) -> str:
    """Move champion to the version the evaluate stage registered; one line for the report.

    Never raises: the gate passed and the results are pushed, so a refusal (a better champion
    exists, e.g. from another branch) or an unreachable registry is reported, not fatal.
    """
    try:
        info = json.loads(logged_models.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        info = {}
    registered = info.get("registered_model") if isinstance(info, dict) else None
    uri = info.get("tracking_uri") if isinstance(info, dict) else None
    if not isinstance(registered, dict) or not registered.get("name") or not uri:
        return (
            f"not promoted: {logged_models.name} names no registered version (tracking off, "
            "tracking.register_model null, or the registration failed)"
        )
    try:
        done = promote(
            str(uri),
            str(registered["name"]),
            version=int(registered["version"]),
            metric=mlflow_metric(metric),
            max_drop=max_drop,
        )
    except PromotionRefused as err:
        return f"not promoted: {err}"
    except PromotionError as err:
        return redact(f"not promoted (registry error): {err}")
    return f"promoted: {done.describe()}"
