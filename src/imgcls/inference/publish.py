"""Log an evaluated model to its MLflow run: the `mlflow.pytorch` model and the servable pyfunc.

The evaluate stage calls :func:`log_models` once the model's evaluation succeeded, on the run the
train stage started, so the registry only ever holds evaluated models, with their test metrics
on the same run. With `tracking.register_model` (default `imgcls`) the servable model becomes a
new version of that registered model with the alias `challenger` (MLflow aliases replace the
deprecated registry stages); `imgcls promote` then moves `champion` (imgcls.inference.aliases).
Every step is best-effort, like the rest of tracking: a store that drops does not fail the
stage, and what was lost is listed in the returned record's `not_logged`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # `imgcls promote` imports this module's aliases: no torch at CLI start
    from torch import nn

log = logging.getLogger("imgcls.inference")

CHALLENGER = "challenger"  # alias of the newest evaluated version: the candidate to promote
CHAMPION = "champion"  # alias of the promoted version: `models:/<name>@champion` serves it


class ModelRun(Protocol):
    """What :func:`log_models` needs of `imgcls.tracking.Run`."""

    uri: str
    run_id: str
    not_logged: list[str]

    def log_pytorch_model(
        self,
        model: Any,
        *,
        input_example: Any,
        metadata: dict[str, Any],
        registered_name: str | None = None,
        bundle: Path | None = None,
    ) -> str | None: ...


def empty_record(run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """The record when no model was logged (tracking off, or `tracking.log_model: false`)."""
    return {
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "model_uri": None,
        "serving_model_uri": None,
        "registered_model": None,
        "not_logged": [],
    }


def log_models(
    run: ModelRun,
    model_path: Path,
    clf: nn.Module,
    meta: dict[str, Any],
    input_example: np.ndarray,
    registered_name: str | None = None,
) -> dict[str, Any]:
    """Log `model` (mlflow.pytorch) and `serving` (pyfunc, registered) from `model_path`.

    `clf` must be the module loaded from `model_path` (the logged pytorch model is then exactly
    the file's weights); `input_example` holds >= 2 images so the exported batch size stays
    dynamic. Returns the record the evaluate stage writes (URIs None where logging failed).
    """
    from imgcls.inference.serving import log_serving_model_info

    record = empty_record(run.run_id, run.uri)
    lost = len(run.not_logged)
    example = np.array(input_example[:2])  # a writable copy: torch.export rejects mmap'd arrays
    if len(example) >= 2:
        record["model_uri"] = run.log_pytorch_model(
            clf, input_example=example, metadata=dict(meta), bundle=Path(model_path)
        )
    else:  # fewer than 2 images in the whole data set: nothing to export a dynamic batch from
        run.not_logged.append("model")
    try:
        uri, version = log_serving_model_info(model_path, run.run_id, run.uri, registered_name)
    except Exception as err:  # a dropped store must not fail an evaluation that succeeded
        first = (str(err).splitlines() or [""])[0][:300]
        log.warning("MLflow: could not log the serving model: %s: %s", type(err).__name__, first)
        run.not_logged.append("serving model")
    else:
        record["serving_model_uri"] = uri
        if registered_name and version is not None:
            record["registered_model"] = {"name": registered_name, "version": version}
            if set_alias(run.uri, registered_name, version, CHALLENGER):
                record["registered_model"]["alias"] = CHALLENGER
            else:
                run.not_logged.append(f"alias {CHALLENGER}")
    record["not_logged"] = run.not_logged[lost:]
    return record


def set_alias(uri: str, name: str, version: int, alias: str) -> bool:
    """Point `alias` of registered model `name` at `version` (best-effort: False if it failed)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(name, alias, str(version))
    except Exception as err:  # a dropped store must not fail an evaluation that succeeded
        first = (str(err).splitlines() or [""])[0][:300]
        log.warning("MLflow: could not set alias %s of %s: %s", alias, name, first)
        return False
    return True
