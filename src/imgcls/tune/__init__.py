"""`imgcls tune`: an Optuna search recorded in MLflow, reproduced by DVC (docs/tune.md).

Optuna samples (TPE, seeded from `base.seed`) the `tune.space` of params.yaml; every trial trains
like the train stage on the existing `data/processed/splits.csv`, reports each epoch's value to
a median pruner and is one MLflow child run under the study's parent run. The study lives in a
SQLite file next to the MLflow store under a name derived from what its trials train, so a rerun
resumes it. The end result is `reports/tune/best.yaml` and the `dvc exp run -S ...` command that
turns the best trial into a DVC experiment: tune searches, DVC reproduces.
"""

from imgcls.tune.common import TuneError, TuneOptions, TuneResult
from imgcls.tune.report import format_result, plot_history, plot_importances, trials_frame
from imgcls.tune.space import (
    baseline_values,
    dvc_command,
    dvc_value,
    metric_and_direction,
    study_name,
    suggest,
)
from imgcls.tune.study import tune

__all__ = [
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "baseline_values",
    "dvc_command",
    "dvc_value",
    "format_result",
    "metric_and_direction",
    "plot_history",
    "plot_importances",
    "study_name",
    "suggest",
    "trials_frame",
    "tune",
]
