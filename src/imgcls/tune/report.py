"""The study's results: trials table, history and importance figures, best.yaml, the summary."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

import yaml

from imgcls import tracking
from imgcls.config import (
    Params,
)
from imgcls.io import write_csv, write_text

if TYPE_CHECKING:
    import optuna

from imgcls.tune.common import TuneOptions, TuneResult
from imgcls.tune.objective import _short
from imgcls.tune.space import dvc_command

log = logging.getLogger("imgcls.tune")


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or None before the first one completes."""
    try:
        return study.best_trial
    except ValueError:
        return None


# ---------------------------------------------------------------------- the whole search


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
