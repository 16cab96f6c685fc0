"""The study: open or resume it, run its trials (worker processes with --jobs), the parent run."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls import tracking
from imgcls.config import (
    Params,
    load_params,
)

if TYPE_CHECKING:
    import optuna

from imgcls.tune.common import (
    _GRACE_S,
    _HEARTBEAT_S,
    _INTERRUPTED,
    _SQLITE_TIMEOUT_S,
    TuneError,
    TuneOptions,
    TuneResult,
)
from imgcls.tune.objective import _DataCache, _Job, make_objective
from imgcls.tune.report import _best_trial, _summarise
from imgcls.tune.space import baseline_values, default_storage, metric_and_direction, study_name

log = logging.getLogger("imgcls.tune")


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
