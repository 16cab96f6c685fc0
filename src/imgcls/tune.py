"""`imgcls tune`: an Optuna search recorded in MLflow, reproduced by DVC (docs/tune.md).

Optuna samples (TPE, seeded from `base.seed`) the `tune.space` of params.yaml; every trial trains
like the train stage on the existing `data/processed/splits.csv`, reports each epoch's value to
a median pruner and is one MLflow child run under the study's parent run. The study lives in a
SQLite file next to the MLflow store under a name derived from what its trials train, so a rerun
resumes it. The end result is `reports/tune/best.yaml` and the `dvc exp run -S ...` command that
turns the best trial into a DVC experiment: tune searches, DVC reproduces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from imgcls import tracking
from imgcls.config import (
    CategoricalDist,
    Distribution,
    FloatDist,
    IntDist,
    Params,
    load_params,
    with_overrides,
)
from imgcls.errors import ImgclsError
from imgcls.io import write_csv, write_text

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("imgcls.tune")

# Keys of the train section that change how fast a trial runs, not what it learns.
_RUNTIME_KEYS = ("device", "num_workers", "cpu_threads")
# A SQLite study shared by several worker processes: wait for the lock instead of failing.
_SQLITE_TIMEOUT_S = 60
# Set by Ctrl-C: a KeyboardInterrupt raised inside a finaliser (gc after each trial, SQLAlchemy)
# is printed and dropped by Python, so the next epoch end or trial end raises it again.
_INTERRUPTED = threading.Event()
# Heartbeats let a rerun mark trials of a killed process as failed (after the grace period).
_HEARTBEAT_S, _GRACE_S = 10, 30


class TuneError(ImgclsError):
    """The search cannot start or go on (no data, bad metric, ...)."""


@dataclass
class TuneOptions:
    """What `imgcls tune` was asked for (command-line values win over `tune:`)."""

    params_path: Path = Path("params.yaml")
    splits: Path = Path("data/processed/splits.csv")
    cache_dir: Path = Path("data/cache")
    out_dir: Path = Path("reports/tune")
    n_trials: int | None = None
    timeout: float | None = None
    jobs: int = 1


@dataclass
class TuneResult:
    """How the study stands after this invocation."""

    study_name: str
    storage: str
    metric: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    baseline_value: float | None
    counts: dict[str, int]
    ran_now: int
    wall_s: float
    command: str | None
    parent_run_id: str | None
    files: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------- study identity


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

    from imgcls.training.loop import NonFiniteLossError
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


def _open_study(
    storage: str, name: str, direction: str, params: Params, seed: int, *, create: bool = False
) -> optuna.Study:
    """The study with a TPE sampler seeded from `seed` and the configured median pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    rdb: Any = storage
    if "://" in storage:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(
            storage,
            engine_kwargs={"connect_args": {"timeout": _SQLITE_TIMEOUT_S}}
            if storage.startswith("sqlite")
            else {},
            heartbeat_interval=_HEARTBEAT_S,
            grace_period=_GRACE_S,
        )
    cfg = params.tune
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner.startup_trials,
            # steps are epoch numbers (1-based); Optuna prunes from step n_warmup_steps on
            n_warmup_steps=cfg.pruner.warmup_epochs + 1,
        )
        if cfg.pruner.enabled
        else optuna.pruners.NopPruner()
    )
    if create:
        return optuna.create_study(
            storage=rdb,
            study_name=name,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    return optuna.load_study(storage=rdb, study_name=name, sampler=sampler, pruner=pruner)


def _finished(study: optuna.Study) -> int:
    """Trials that count towards `n_trials`: completed and pruned ones (failed ones do not)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_job(job: _Job) -> None:
    """Run trials until `n_trials` ran, the study reached `target` or the deadline passed.

    One worker: with `--jobs N`, each of N spawned processes runs this on the shared study.
    """
    from imgcls.stage import setup_logging

    setup_logging()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    params = load_params(job.opts.params_path)
    _, direction = metric_and_direction(params)
    study = _open_study(job.storage, job.study_name, direction, params, job.seed)
    objective = make_objective(params, job, _DataCache(job.opts.splits, job.opts.cache_dir))
    parent = (
        tracking.Run(job.tracking_uri, job.parent_run_id)
        if job.parent_run_id and job.tracking_uri
        else None
    )

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _report_trial(study, trial, parent)
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        if _finished(study) >= job.target:
            study.stop()

    timeout = None if job.deadline is None else max(job.deadline - time.time(), 0.001)
    study.optimize(
        objective,
        n_trials=job.n_trials,
        timeout=timeout,
        callbacks=[after_trial],
        gc_after_trial=True,
    )
    if parent is not None:
        parent.warn_not_logged("tune")


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: remember it (see _INTERRUPTED), then interrupt as Python would."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _report_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, parent: tracking.Run | None
) -> None:
    """One line per finished trial; the parent run gets its value at step = trial number."""
    from optuna.trial import TrialState

    best = _best_trial(study)
    best_text = f" (best {best.value:.4f}, trial {best.number})" if best else ""
    if trial.state == TrialState.COMPLETE:
        log.info("trial %d: %.4f%s", trial.number, trial.value, best_text)
        if parent is not None:
            parent.log_metrics(
                {"trial_value": trial.value, "best_value": best.value if best else trial.value},
                step=trial.number,
            )
    elif trial.state == TrialState.PRUNED:
        why = trial.user_attrs.get("stopped", "")
        log.info("trial %d: pruned (%s)%s", trial.number, why, best_text)
        if parent is not None:
            parent.log_metrics({"trial_pruned_epoch": trial.last_step or 0}, step=trial.number)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or None before the first one completes."""
    try:
        return study.best_trial
    except ValueError:
        return None


# ---------------------------------------------------------------------- the whole search


def tune(opts: TuneOptions) -> TuneResult:
    """Run (or resume) the study, then write reports/tune/ and log the parent run's summary."""
    start = time.monotonic()
    params = load_params(opts.params_path)
    if not params.tune.space:
        raise TuneError(
            f"{opts.params_path}: tune.space is empty; declare what to search, e.g.\n"
            "tune:\n  space:\n    train.lr: {type: float, low: 0.0003, high: 0.03, log: true}"
        )
    if not opts.splits.is_file():
        raise TuneError(
            f"{opts.splits} not found: tune trains on the pipeline's split; run `dvc repro split` "
            "first"
        )
    if opts.jobs < 1:
        raise TuneError(f"--jobs must be at least 1, got {opts.jobs}")
    metric, direction = metric_and_direction(params)
    splits_sha = tracking.file_sha256(opts.splits)
    name, storage = study_name(params, splits_sha), default_storage(params)
    _ensure_sqlite_folder(storage)
    target = opts.n_trials or params.tune.n_trials
    timeout = opts.timeout if opts.timeout is not None else params.tune.timeout
    study = _open_study(storage, name, direction, params, params.base.seed, create=True)
    done_before = _finished(study)
    if not study.trials and params.tune.baseline_first:
        baseline = baseline_values(params)
        if baseline is not None:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    _close_stale_runs(study, params)
    parent = _parent_run(study, params, opts, name, storage, splits_sha)
    missing = max(target - done_before, 0)
    log.info(
        "tune: study %r in %s: %d of %d trials finished; running %d more (%s %s)",
        name,
        storage,
        done_before,
        target,
        missing,
        direction,
        metric,
    )
    if missing:
        try:
            _run_workers(
                opts, params, parent, storage, name, target, missing, timeout, len(study.trials)
            )
        except BaseException:
            if parent is not None:
                parent.end("KILLED")
            raise
    study = _open_study(storage, name, direction, params, params.base.seed)
    result = _summarise(study, params, opts, parent, storage, metric, direction)
    result.ran_now = _finished(study) - done_before
    result.wall_s = time.monotonic() - start
    if parent is not None:
        parent.log_metrics({"wall_time_s": result.wall_s}, step=len(study.trials))
        parent.end("FINISHED")
        parent.warn_not_logged("tune")
    return result


def _ensure_sqlite_folder(storage: str) -> None:
    """SQLite creates the file but not its folder."""
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(
            parents=True, exist_ok=True
        )


def _run_workers(
    opts: TuneOptions,
    params: Params,
    parent: tracking.Run | None,
    storage: str,
    name: str,
    target: int,
    missing: int,
    timeout: float | None,
    n_existing: int,
) -> None:
    """Run the missing trials here (`--jobs 1`) or in `--jobs` spawned processes."""
    deadline = None if timeout is None else time.time() + timeout
    jobs = min(opts.jobs, missing)
    # Seeded by the trials so far: a resumed study must not redraw its first random trials.
    seeds = [params.base.seed + n_existing + 7919 * i for i in range(jobs)]
    shares = [missing // jobs + (i < missing % jobs) for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    made = [
        _Job(
            opts,
            storage,
            name,
            parent.run_id if parent else None,
            parent.uri if parent else None,
            seed,
            share,
            target,
            deadline,
            threads,
        )
        for seed, share in zip(seeds, shares, strict=True)
    ]
    if jobs == 1:
        run_job(made[0])
        return
    ctx = multiprocessing.get_context("spawn")  # no forked torch / MLflow / SQLite state
    procs = [
        ctx.Process(target=run_job, args=(job,), name=f"tune-{i}") for i, job in enumerate(made)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            proc.join(timeout=30)  # each worker got the Ctrl-C too and marks its trial failed
        raise
    failed = [p.name for p in procs if p.exitcode]
    if failed:
        raise TuneError(f"tune workers {failed} failed; their log above says why")


def _close_stale_runs(study: optuna.Study, params: Params) -> None:
    """Trials a killed process left RUNNING: their MLflow child runs are marked KILLED."""
    from optuna.trial import TrialState

    if not params.tracking.enabled:
        return
    uri = tracking.resolve_uri(params.tracking)
    closed = set(study.user_attrs.get("closed_runs", []))
    stale = [
        t.user_attrs["mlflow_run_id"]
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("mlflow_run_id") not in closed | {None}
    ]
    for run_id in stale:
        tracking.Run(uri, run_id).end("KILLED")
    if stale:  # finished trials are read-only in Optuna: the study remembers what was closed
        study.set_user_attr("closed_runs", sorted(closed | set(stale)))


def _parent_run(
    study: optuna.Study,
    params: Params,
    opts: TuneOptions,
    name: str,
    storage: str,
    splits_sha: str,
) -> tracking.Run | None:
    """The study's parent run: created with the study, reopened when the study resumes."""
    if not params.tracking.enabled:
        return None
    uri = tracking.resolve_uri(params.tracking)
    known = study.user_attrs.get("mlflow_parent_run_id")
    if known and study.user_attrs.get("mlflow_tracking_uri") == uri:
        run = tracking.Run(uri, known)
        run.end("RUNNING")  # visible as running again while the study resumes
        if not run.not_logged:
            run.set_tags({"tune.resumed_at_trial": str(len(study.trials))})
            return run
        log.warning("tune: parent run %s is gone from %s; starting a new one", known, uri)
    tags = {
        **tracking.pipeline_tags(opts.splits),
        "mlflow.source.name": "imgcls tune",
        "imgcls.kind": "tune",
        "tune.study": name,
        "tune.storage": storage,
        "model.name": params.model.name,
    }
    cfg = params.tracking.model_copy(update={"uri": uri})
    run = tracking.Run.start(cfg, run_name=f"tune-{name}", tags=tags)
    resolved = params.to_dict()
    metric, direction = metric_and_direction(params)
    run.log_params(
        {
            **{k: resolved[k] for k in ("base", "model", "augment", "train")},
            "tune": {
                "metric": metric,
                "direction": direction,
                "sampler": f"TPE(seed={params.base.seed}, startup={params.tune.startup_trials})",
                "pruner": "median" if params.tune.pruner.enabled else "none",
                "space": json.dumps({k: v.model_dump() for k, v in params.tune.space.items()}),
            },
        }
    )
    study.set_user_attr("mlflow_parent_run_id", run.run_id)
    study.set_user_attr("mlflow_tracking_uri", uri)
    return run


# ---------------------------------------------------------------------- summary and figures


def _summarise(
    study: optuna.Study,
    params: Params,
    opts: TuneOptions,
    parent: tracking.Run | None,
    storage: str,
    metric: str,
    direction: str,
) -> TuneResult:
    """best.yaml, trials.csv and the two figures; the same to the parent run."""
    from optuna.trial import TrialState

    counts = {
        state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    best = _best_trial(study)
    baseline = next(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("baseline")
        ),
        None,
    )
    raw = yaml.safe_load(opts.params_path.read_text(encoding="utf-8")) or {}
    command = dvc_command(best.params, opts.params_path, raw) if best else None
    out = opts.out_dir
    files = {"best": str(out / "best.yaml"), "trials": str(out / "trials.csv")}
    summary = {
        "study": study.study_name,
        "storage": storage,
        "metric": metric,
        "direction": direction,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "baseline_value": baseline.value if baseline else None,
        "trials": counts,
        "dvc_command": command,
        "mlflow_parent_run_id": parent.run_id if parent else None,
        "mlflow_best_run_id": best.user_attrs.get("mlflow_run_id") if best else None,
    }
    write_text(out / "best.yaml", yaml.safe_dump(summary, sort_keys=False))
    write_csv(out / "trials.csv", trials_frame(study))
    figures = {
        "history": (out / "optimization_history.png", plot_history(study, metric)),
        "importances": (out / "param_importances.png", plot_importances(study)),
    }
    import matplotlib.pyplot as plt

    for key, (path, fig) in figures.items():
        if fig is None:
            continue
        fig.savefig(path, dpi=110, bbox_inches="tight")
        files[key] = str(path)
        if parent is not None:
            parent.log_figure(fig, f"figures/{path.name}")
        plt.close(fig)
    if parent is not None:
        parent.log_dict(summary, "tune/best.yaml")
        parent.log_artifact(out / "trials.csv", "tune")
        parent.log_metrics(
            {
                **({f"best_{metric}": best.value} if best else {}),
                **({f"baseline_{metric}": baseline.value} if baseline else {}),
                **{f"trials_{k}": v for k, v in counts.items()},
            }
        )
        tags = {"tune.trials": json.dumps(counts)}
        if best:
            tags |= {f"best.{k}": str(v) for k, v in best.params.items()}
            tags |= {"tune.best_trial": str(best.number), "tune.dvc_command": command or ""}
            tags["tune.best_run_id"] = best.user_attrs.get("mlflow_run_id", "")
        parent.set_tags(tags)
    return TuneResult(
        study.study_name,
        storage,
        metric,
        direction,
        best.value if best else None,
        dict(best.params) if best else {},
        best.number if best else None,
        baseline.value if baseline else None,
        counts,
        0,
        0.0,
        command,
        parent.run_id if parent else None,
        files,
    )


def trials_frame(study: optuna.Study) -> Any:
    """One row per trial: number, state, value, last epoch, params, MLflow run id."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "epochs": t.last_step,
                "baseline": bool(t.user_attrs.get("baseline")),
                **t.params,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            }
        )
    return pd.DataFrame(rows)


def plot_history(study: optuna.Study, metric: str) -> Any:
    """Each trial's value (pruned ones at their last epoch's value) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    maximise = study.direction.name == "MAXIMIZE"
    fig, ax = plt.subplots(figsize=(7, 4))
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    stopped = [t for t in pruned if t.intermediate_values]
    ax.scatter(
        [t.number for t in stopped],
        [t.intermediate_values[t.last_step] for t in stopped],
        marker="x",
        color="grey",
        label="pruned (last epoch)",
        zorder=2,
    )
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or (t.value > best if maximise else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    for t in done:
        if t.user_attrs.get("baseline"):
            ax.annotate(
                "params.yaml", (t.number, t.value), textcoords="offset points", xytext=(5, -12)
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{study.study_name}: optimisation history")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_importances(study: optuna.Study) -> Any | None:
    """Optuna's parameter importances as bars; None with fewer than 2 completed trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        log.info("tune: parameter importances need 2 completed trials (have %d)", len(done))
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as err:  # e.g. every trial drew the same values
        log.info("tune: no parameter importances: %s", err)
        return None
    if not importances or any(math.isnan(v) for v in importances.values()):
        return None
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (share of the variation in the metric)")
    ax.set_title(f"parameter importances ({len(done)} completed trials)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def format_result(result: TuneResult) -> str:
    """What `imgcls tune` prints at the end."""
    c = result.counts
    lines = [
        f"tune: study {result.study_name!r}: {c.get('complete', 0)} complete, "
        f"{c.get('pruned', 0)} pruned, {c.get('fail', 0)} failed "
        f"({result.ran_now} finished in this run, {result.wall_s:.0f} s)",
    ]
    if result.best_value is None:
        lines.append("no trial completed yet; rerun to continue the study")
        return "\n".join(lines)
    lines.append(f"best: trial {result.best_trial}, {result.metric} {result.best_value:.4f}")
    if result.baseline_value is not None:
        delta = result.best_value - result.baseline_value
        lines.append(f"params.yaml (baseline trial): {result.baseline_value:.4f} ({delta:+.4f})")
    lines += [f"  {k} = {_short(v)}" for k, v in result.best_params.items()]
    lines.append(f"Written: {', '.join(result.files.values())}")
    if result.parent_run_id:
        lines.append(f"MLflow parent run: {result.parent_run_id} (trials are its child runs)")
    lines.append("Reproduce the best trial as a DVC experiment:")
    lines.append(f"  {result.command}")
    return "\n".join(lines)
