"""Stage `evaluate`: test (and val) metrics, confusion matrix, figures; closes the MLflow run."""

import argparse
from pathlib import Path

from imgcls.config import EvaluateConfig, load_params
from imgcls.evaluation.evaluate import (
    Report,
    evaluate_data,
    headline_metrics,
    mlflow_metrics,
    summary_line,
)
from imgcls.evaluation.figures import pyplot
from imgcls.io import atomic_path, write_csv, write_json
from imgcls.models.bundle import limits_of, load_bundle
from imgcls.stage import run_stage
from imgcls.task import task_of
from imgcls.tracking import resume_run
from imgcls.training.run import load_split_data


def evaluate(args: argparse.Namespace, cfg: EvaluateConfig) -> Report:
    """Load the model and the images, predict every configured split and build the report."""
    clf, meta = load_bundle(args.model)
    task = task_of(meta)
    # The model's class order (binary: [negative, positive]) and task decide how labels are
    # encoded: class indices, or (N, K) multi-hot for multi-label rows ("cat|dog").
    data = load_split_data(
        args.splits,
        Path.cwd(),
        meta["image_size"],
        meta["channels"],
        args.cache_dir,
        classes=meta["classes"],
        task=task,
        max_pixels=limits_of(meta)["max_image_pixels"],  # the limit the model was trained with
    )
    return evaluate_data(
        clf, data, cfg, where=str(args.splits), task=task, thresholds=meta.get("thresholds")
    )


def main() -> None:
    """Evaluate the saved model on the configured splits and write metrics and figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--cache-dir", default="data/cache", type=Path)
    ap.add_argument("--model", default="models/model.pt", type=Path)
    ap.add_argument("--run-file", default="models/run.json", type=Path)
    ap.add_argument("--metrics", default="metrics/eval.json", type=Path)  # headline (DVC metric)
    ap.add_argument("--details", default="reports/eval_details.json", type=Path)  # every key
    ap.add_argument("--confusion-csv", default="plots/confusion.csv", type=Path)
    ap.add_argument("--figures", default="reports/figures", type=Path)
    args = ap.parse_args()
    cfg = load_params(args.params).evaluate
    run = resume_run(args.run_file)  # the train stage's run: this stage logs into it and closes it
    try:
        report = evaluate(args, cfg)
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    write_json(args.details, report.metrics)
    write_json(args.metrics, headline_metrics(report.metrics))
    write_csv(args.confusion_csv, report.confusion_rows)
    plt = pyplot()
    for name, fig in report.figures.items():
        with atomic_path(args.figures / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    for name, table in report.tables.items():
        write_json(args.figures / name, table)

    if run is not None:
        run.log_metrics(mlflow_metrics(report.metrics))
        for name, table in report.tables.items():
            run.log_dict(table, f"evaluation/{name}")
        for name in report.figures:
            run.log_artifact(args.figures / name, "evaluation")
        run.log_artifact(args.metrics, "evaluation")
        run.log_artifact(args.details, "evaluation")
        run.end("FINISHED")
        run.warn_not_logged("evaluate")
    print(f"evaluate: {summary_line(report.main)} -> {args.metrics}")


if __name__ == "__main__":
    run_stage("evaluate", main)
