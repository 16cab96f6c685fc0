"""What a study searches and how its best trial is reproduced (study identity, `dvc exp run -S`)."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls import tracking
from imgcls.config import (
    CategoricalDist,
    Distribution,
    FloatDist,
    IntDist,
    Params,
)

if TYPE_CHECKING:
    import optuna

from imgcls.tune.common import _RUNTIME_KEYS

log = logging.getLogger("imgcls.tune")


def metric_and_direction(params: Params) -> tuple[str, str]:
    """The epoch-row key optimised and whether it is maximised (default: `train.monitor`)."""
    metric = params.tune.metric or params.train.monitor
    direction = params.tune.direction
    if direction == "auto":
        direction = "minimize" if metric.endswith("loss") else "maximize"
    return metric, direction


def default_storage(params: Params) -> str:
    """`tune.storage`, else `optuna.db` beside a SQLite MLflow store (else at the repo root)."""
    if params.tune.storage:
        return params.tune.storage
    uri = tracking.resolve_uri(params.tracking)
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve().parent
    else:  # a tracking server: the study stays with the repository
        folder = tracking.repo_root()
    return f"sqlite:///{folder / 'optuna.db'}"


def study_name(params: Params, splits_sha256: str) -> str:
    """`tune.study_name`, else `<experiment>-tune-<hash>` of what the trials train and seek.

    Same fixed params, data, space and metric: the same study (a rerun resumes it). Change any
    of them and earlier trials no longer answer the question, so a new study starts.
    """
    if params.tune.study_name:
        return params.tune.study_name
    fixed = {k: params.to_dict()[k] for k in ("base", "model", "augment", "train")}
    for key in _RUNTIME_KEYS:
        fixed["train"].pop(key, None)
    for key in params.tune.space:  # the searched values vary by trial
        _set_dotted(fixed, key, "<searched>")
    blob = {
        "fixed": fixed,
        "space": {k: v.model_dump() for k, v in params.tune.space.items()},
        "metric": metric_and_direction(params),
        "data": splits_sha256,
    }
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params.tracking.experiment}-tune-{digest}"


def _set_dotted(data: Any, key: str, value: Any) -> None:
    """Set a dotted key (`augment.train.0.p`) in nested dicts / lists, if its parent exists."""
    parts = key.split(".")
    for part in parts[:-1]:
        data = data[int(part)] if isinstance(data, list) else data.setdefault(part, {})
    if isinstance(data, list):
        data[int(parts[-1])] = value
    else:
        data[parts[-1]] = value


def _get_dotted(data: Any, key: str) -> Any:
    """The value at a dotted key, or KeyError."""
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


# ---------------------------------------------------------------------- sampling


def suggest(trial: optuna.Trial, space: Mapping[str, Distribution]) -> dict[str, Any]:
    """One value per searched key, drawn by the trial's sampler."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if isinstance(dist, FloatDist):
            values[key] = trial.suggest_float(
                key, dist.low, dist.high, log=dist.log, step=dist.step
            )
        elif isinstance(dist, IntDist):
            values[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            values[key] = trial.suggest_categorical(key, dist.choices)
    return values


def baseline_values(params: Params) -> dict[str, Any] | None:
    """params.yaml's own values of the searched keys, or None if one lies outside the space."""
    data = params.to_dict()
    values = {}
    for key, dist in params.tune.space.items():
        try:
            value = _get_dotted(data, key)
        except (KeyError, IndexError):
            return None  # e.g. a model kwarg params.yaml does not set: no baseline to copy
        if not _inside(value, dist):
            log.info(
                "tune: params.yaml's %s = %r is outside the space: no baseline trial", key, value
            )
            return None
        values[key] = value
    return values


def _inside(value: Any, dist: Distribution) -> bool:
    """Whether Optuna would accept `value` as a fixed value of `dist`."""
    if isinstance(dist, CategoricalDist):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dist, IntDist) and (value != int(value) or (value - dist.low) % dist.step):
        return False
    return dist.low <= value <= dist.high


# ---------------------------------------------------------------------- the command DVC runs


def dvc_value(value: Any) -> str:
    """A value in Hydra's override grammar (what `dvc exp run -S` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # round-trips: the experiment trains on exactly the trial's value
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return text if text.replace("_", "").replace("-", "").isalnum() else json.dumps(text)


def dvc_command(best: Mapping[str, Any], params_path: Path, raw: Mapping[str, Any]) -> str:
    """`dvc exp run -S key=value ...` for the best trial (`+key` where the file lacks the key)."""
    prefix = (
        ""
        if params_path.name == "params.yaml" and len(params_path.parts) == 1
        else (f"{params_path.as_posix()}:")
    )
    args = []
    for key, value in best.items():
        try:
            _get_dotted(raw, key)
            plus = ""
        except (KeyError, IndexError, TypeError):
            plus = "+"  # DVC only adds a key that params.yaml lacks when asked with `+`
        args += ["-S", shlex.quote(f"{prefix}{plus}{key}={dvc_value(value)}")]
    return " ".join(["dvc", "exp", "run", *args])


# ---------------------------------------------------------------------- one trial
