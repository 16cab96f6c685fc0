"""`imgcls summary`, `imgcls retrain`, `imgcls promote`: what a run gave, what happens to it."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_summary(args: argparse.Namespace) -> None:
    """Print the last run's headline metrics, worst class, change, figures and MLflow run."""
    from imgcls.summary import SummaryPaths, summarize

    paths = SummaryPaths(
        metrics=Path(args.metrics),
        details=Path(args.details),
        train=Path(args.train),
        run_file=Path(args.run_file),
        logged_models=Path(args.logged_models),
    )
    print(summarize(paths, args.against))


def add_summary_parser(sub: argparse._SubParsersAction) -> None:
    """`imgcls summary` and its options (defaults match dvc.yaml's paths)."""
    p = sub.add_parser(
        "summary",
        help="the last pipeline run in a few lines (what `make pipeline` ends with)",
        description="Headline test metrics, the worst class by F1, the change against the "
        "committed metrics, where the figures are and how to open the MLflow run.",
    )
    p.add_argument("--against", default="HEAD", help="git ref to compare with (HEAD)")
    p.add_argument("--metrics", default="metrics/eval.json")
    p.add_argument("--details", default="reports/eval_details.json")
    p.add_argument("--train", default="metrics/train.json")
    p.add_argument("--run-file", default="models/run.json")
    p.add_argument("--logged-models", default="models/logged_models.json")
    p.set_defaults(func=_cmd_summary)


def _cmd_retrain(args: argparse.Namespace) -> None:
    """The CI retrain job: detect change, pull, repro, metric gate, push, commit, report."""
    from imgcls.retrain import RetrainConfig, retrain

    cfg = RetrainConfig(
        root=Path.cwd(),
        base=args.base,
        max_drop=args.max_drop,
        metric=args.metric,
        metrics_file=args.metrics_file,
        data_stage=args.data_stage,
        report=Path(args.report),
        validation_report=args.validation_report,
        confusion_image=args.confusion_image,
        run_file=args.run_file,
        remote=args.remote,
        push=not args.no_push,
        commit=not args.no_commit,
    )
    result = retrain(cfg)
    print(
        f"retrain: done; report in {args.report}"
        + (f", commit {result.commit}" if result.commit else "")
    )


def add_retrain_parser(sub: argparse._SubParsersAction) -> None:
    """`imgcls retrain` and its options (defaults match dvc.yaml's paths)."""
    p = sub.add_parser(
        "retrain",
        help="CI retrain job: pull, dvc repro, metric gate, dvc push, commit dvc.lock, report",
        description="Run what .github/workflows/retrain.yml runs, against any DVC remote: "
        "detect changed data, `dvc pull`, `dvc repro`, fail if the test metric drops more than "
        "--max-drop below the base ref's committed value, else `dvc push` and commit dvc.lock "
        "+ metrics with [skip ci]. See docs/ci.md.",
    )
    p.add_argument("--base", default="main", help="git ref with the baseline metrics (main)")
    p.add_argument("--max-drop", type=float, default=0.02, help="allowed metric drop (0.02)")
    p.add_argument(
        "--metric", default="f1_macro", help="gate metric key (f1_macro = test macro-F1)"
    )
    p.add_argument("--metrics-file", default="metrics/eval.json", help="(metrics/eval.json)")
    p.add_argument("--remote", help="DVC remote name (default: the default remote)")
    p.add_argument("--no-push", action="store_true", help="do not `dvc push`")
    p.add_argument("--no-commit", action="store_true", help="do not commit dvc.lock + metrics")
    p.add_argument("--report", default="reports/retrain.md", help="Markdown report file")
    p.add_argument("--data-stage", default="ingest", help="stage that reads the tracked data")
    p.add_argument("--validation-report", default="reports/validation.md")
    p.add_argument("--confusion-image", default="reports/figures/confusion_matrix.png")
    p.add_argument("--run-file", default="models/run.json", help="MLflow run id file")
    p.set_defaults(func=_cmd_retrain)


def _cmd_promote(args: argparse.Namespace) -> None:
    """Promote a registered version (default: the challenger) to champion unless it is worse."""
    from imgcls.retrain.promote import promote_command

    line = promote_command(
        Path(args.params), args.model, args.version, args.run, args.metric, args.force
    )
    print(f"imgcls promote: {line}")


def add_promote_parser(sub: argparse._SubParsersAction) -> None:
    """`imgcls promote` (see docs/tracking.md#promotion)."""
    p = sub.add_parser(
        "promote",
        help="move the registry alias `champion` to a model version (default: the challenger)",
        description="Point models:/<name>@champion at a registered version: the `challenger` "
        "(the last evaluated pipeline run) unless --version or --run names another. Refused "
        "when it is worse on --metric than the current champion, unless --force. The store: "
        "MLFLOW_TRACKING_URI, else tracking.uri in params.yaml, else mlflow.db.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="registered version number to promote")
    which.add_argument("--run", metavar="RUN_ID", help="the version this MLflow run registered")
    p.add_argument("--model", help="registered model name (default: tracking.register_model)")
    p.add_argument("--metric", help="run metric to compare, higher is better (test_f1_macro)")
    p.add_argument("--force", action="store_true", help="promote even if it is worse")
    p.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    p.set_defaults(func=_cmd_promote)
