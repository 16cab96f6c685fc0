"""The evaluate stage: evaluate the saved model, write its outputs, log it to the train run.

Order matters: the model is evaluated first; only when that succeeded are the metrics logged to
the train stage's MLflow run, then the models (`model`, `serving`; the latter registered under
`tracking.register_model`), then the run is marked FINISHED. An evaluation that fails marks the
run FAILED and logs no model, so the registry only holds evaluated models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls import tracking
from imgcls.config import Params

# TODO(issue 16 merge): import from imgcls.data.dataset once SplitData moves there.
from imgcls.data.dataset import SplitData, load_split_data
from imgcls.evaluation.evaluate import Report, evaluate_data, headline_metrics, mlflow_metrics
from imgcls.evaluation.figures import pyplot
from imgcls.inference import publish
from imgcls.io import atomic_path, write_csv, write_json
from imgcls.models.bundle import limits_of, load_bundle
from imgcls.task import task_of


@dataclass(frozen=True)
class EvaluatePaths:
    """Every file the evaluate stage reads or writes (the paths of `dvc.yaml`)."""

    root: Path  # the folder splits.csv's image paths are relative to
    splits: Path
    cache_dir: Path
    model: Path
    run_file: Path  # written by train: the MLflow run to log into
    metrics: Path  # headline (DVC metric)
    details: Path  # every key
    confusion_csv: Path
    figures: Path
    logged_models: Path  # where the models were logged: URIs, registered version


def evaluate_model(paths: EvaluatePaths, params: Params) -> tuple[Report, Any, dict, SplitData]:
    """Load the model and the images, predict every configured split and build the report."""
    clf, meta = load_bundle(paths.model)
    task = task_of(meta)
    # The model's class order (binary: [negative, positive]) and task decide how labels are
    # encoded: class indices, or (N, K) multi-hot for multi-label rows ("cat|dog").
    data = load_split_data(
        paths.splits,
        paths.root,
        meta["image_size"],
        meta["channels"],
        paths.cache_dir,
        classes=meta["classes"],
        task=task,
        max_pixels=limits_of(meta)["max_image_pixels"],  # the limit the model was trained with
    )
    report = evaluate_data(
        clf,
        data,
        params.evaluate,
        where=str(paths.splits),
        task=task,
        thresholds=meta.get("thresholds"),
    )
    return report, clf, meta, data


def write_outputs(paths: EvaluatePaths, report: Report) -> None:
    """The metrics, details, confusion rows, figures and tables, each written atomically."""
    write_json(paths.details, report.metrics)
    write_json(paths.metrics, headline_metrics(report.metrics))
    write_csv(paths.confusion_csv, report.confusion_rows)
    plt = pyplot()
    for name, fig in report.figures.items():
        with atomic_path(paths.figures / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    for name, table in report.tables.items():
        write_json(paths.figures / name, table)
    if report.predictions is not None:  # per image, for `imgcls compare` (fixed / broken)
        write_csv(paths.figures / report.predictions_name, report.predictions)


# Logged at the artifact root: MLflow's compare view lists only the root files the compared runs
# have in common ("No common artifacts to display" when every figure sits in a sub-folder).
ROOT_FIGURES = ("confusion_matrix.png", "pr_curves.png", "misclassified.png")


def log_report(run: tracking.Run, paths: EvaluatePaths, report: Report) -> None:
    """Test / val metrics, tables, predictions and figures into the run (best-effort)."""
    run.log_metrics(mlflow_metrics(report.metrics, report.classes))
    for name, table in report.tables.items():
        run.log_dict(table, f"evaluation/{name}")
    for name in report.figures:
        run.log_artifact(paths.figures / name, None if name in ROOT_FIGURES else "evaluation")
    if report.predictions is not None:
        run.log_artifact(paths.figures / report.predictions_name, "evaluation")
    run.log_artifact(paths.metrics, "evaluation")
    run.log_artifact(paths.details, "evaluation")


def run_evaluate_stage(paths: EvaluatePaths, params: Params) -> Report:
    """Evaluate, write the outputs, log report and models to the train run, then close it."""
    # First: its child process gets model logging ready while this one evaluates.
    publisher = publish.start_publisher(
        paths.run_file, params.tracking.log_model, params.tracking.system_metrics
    )
    run = tracking.resume_run(paths.run_file)  # None when tracking was off for train
    try:
        report, clf, meta, data = evaluate_model(paths, params)
    except BaseException:
        if publisher is not None:
            publisher.close()
        if run is not None:
            run.end("FAILED")
        raise
    write_outputs(paths, report)
    record = publish.empty_record()
    if run is not None:
        log_report(run, paths, report)
        record = publish.empty_record(run.run_id, run.uri)
        if params.tracking.log_model:
            # After the evaluation succeeded and its metrics are on the run: the registry then
            # never holds a model whose evaluation failed.
            log_models = publisher.publish if publisher is not None else publish.log_models
            record = log_models(
                run, paths.model, clf, meta, data.images, params.tracking.register_model
            )
    if publisher is not None:
        publisher.close()  # after the models: it also sampled system metrics until now
    if run is not None:
        run.end("FINISHED")
        run.warn_not_logged("evaluate")
        record["not_logged"] = list(run.not_logged)  # everything this stage could not log
    write_json(paths.logged_models, record)
    return report
