"""One trial: train like the train stage, report each epoch to the pruner, log a child run."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls import tracking
from imgcls.config import (
    Params,
    with_overrides,
)

if TYPE_CHECKING:
    import optuna

from imgcls.tune.common import _INTERRUPTED, TuneError, TuneOptions
from imgcls.tune.space import metric_and_direction, suggest

log = logging.getLogger("imgcls.tune")


@dataclass
class _Job:
    """What a worker process needs (plain data: sent to spawned processes)."""

    opts: TuneOptions
    storage: str
    study_name: str
    parent_run_id: str | None
    tracking_uri: str | None
    seed: int
    n_trials: int | None
    target: int
    deadline: float | None
    threads: int | None = None


class _DataCache:
    """splits.csv decoded once per image size / channels / task (trials may change them)."""

    def __init__(self, splits: Path, cache_dir: Path) -> None:
        self.splits, self.cache_dir = splits, cache_dir
        self._loaded: dict[str, Any] = {}

    def get(self, params: Params) -> Any:
        from imgcls.training.train import load_training_data

        cfg = params.train
        key = json.dumps(
            [
                cfg.image_size,
                cfg.channels,
                params.model.head,
                params.model.positive_class,
                params.data.multi_label,
            ]
        )
        if key not in self._loaded:
            self._loaded[key] = load_training_data(
                params, self.splits, Path.cwd(), self.cache_dir, progress=False
            )
        return self._loaded[key]


def make_objective(params: Params, job: _Job, data: _DataCache) -> Callable[[optuna.Trial], float]:
    """The function Optuna calls per trial: train with the suggested values, return the metric."""
    import optuna

    from imgcls.training.loop import NonFiniteLossError, validates_epoch
    from imgcls.training.train import train_model
    from imgcls.training.trainer import TrainingError

    metric, _ = metric_and_direction(params)
    prune = params.tune.pruner.enabled

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, params.tune.space)
        trial_params = with_overrides(params, values, where=f"trial {trial.number}")
        run = _start_child(trial_params, job, trial.number, values)
        if run is not None:
            trial.set_user_attr("mlflow_run_id", run.run_id)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        log.info("trial %d: %s", trial.number, shown)

        def on_epoch_end(epoch: int, row: dict[str, float]) -> None:
            if _INTERRUPTED.is_set():
                raise KeyboardInterrupt
            if run is not None:
                run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if not validates_epoch(trial_params.train, epoch - 1):
                return  # a downscaled epoch of progressive resizing: nothing to judge yet
            if metric not in row:
                keys = ", ".join(k for k in row if k != "epoch")
                raise TuneError(
                    f"tune.metric {metric!r} is not in the epoch rows; use one of {keys}"
                )
            value = float(row[metric])
            trial.report(value, epoch)
            if prune and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {metric} {value:.4f} below the median")

        status, state = "FAILED", "failed"
        try:
            result, _ = train_model(
                trial_params,
                data.get(trial_params),
                checkpoint_path=None,
                on_epoch_end=on_epoch_end,
                progress=False,
                probe_cache=data.cache_dir / "probe",  # the stage's: `dvc exp run` trains alike
            )
            status, state = "FINISHED", "complete"
        except optuna.TrialPruned as err:
            status, state = "KILLED", "pruned"
            trial.set_user_attr("stopped", str(err))
            raise
        except TrainingError as err:
            if not isinstance(err.__context__, NonFiniteLossError):
                raise
            # A diverged trial says "bad region" like a pruned one; failing it would hide that
            # from TPE, which then keeps sampling there.
            status, state = "KILLED", "pruned"
            trial.set_user_attr("stopped", f"diverged: {err}")
            raise optuna.TrialPruned(f"diverged ({err})") from None
        except KeyboardInterrupt:
            status, state = "KILLED", "interrupted"
            raise
        finally:
            if run is not None:
                run.set_tags({"tune.state": state})
                run.end(status)
                run.warn_not_logged(f"tune trial {trial.number}")
        history = {row["epoch"]: row for row in result.history}
        value = float(history[result.best_epoch].get(metric, result.best_value))
        trial.set_user_attr("best_epoch", result.best_epoch)
        if run is not None:
            run.log_metrics({"best_epoch": result.best_epoch, f"best_{metric}": value})
        return value

    return objective


def _short(value: Any) -> str:
    """A value for a log line: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _start_child(
    params: Params, job: _Job, number: int, values: Mapping[str, Any]
) -> tracking.Run | None:
    """The trial's MLflow run, a child of the study's parent run (None without tracking)."""
    if job.parent_run_id is None:
        return None
    tags = {
        "mlflow.parentRunId": job.parent_run_id,
        "mlflow.source.name": "imgcls tune",
        "imgcls.kind": "tune-trial",
        "tune.study": job.study_name,
        "tune.trial": str(number),
        "model.name": params.model.name,
    }
    cfg = params.tracking.model_copy(update={"uri": job.tracking_uri})
    run = tracking.Run.start(cfg, run_name=f"trial-{number}", tags=tags)
    resolved = params.to_dict()
    run.log_params({k: resolved[k] for k in ("base", "model", "augment", "train")})
    run.log_dict(dict(values), "tune/trial_params.json")
    return run


# ---------------------------------------------------------------------- workers
