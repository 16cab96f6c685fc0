"""The `imgcls` command: helpers around the pipeline (`dvc repro` runs the stages themselves)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from imgcls import __version__
from imgcls.config import ConfigError, load_params
from imgcls.errors import ImgclsError


def _cmd_models(args: argparse.Namespace) -> None:
    """List our registered models and, optionally, timm names matching a pattern."""
    from imgcls.models import list_custom_models

    print("imgcls models: " + ", ".join(list_custom_models()))
    if args.timm:
        import timm

        names = timm.list_models(args.timm)
        print(f"timm models matching {args.timm!r} ({len(names)}):")
        for name in names:
            print(f"  {name}")
    else:
        print("any timm model name also works (list them with: imgcls models --timm 'resnet*')")


def _cmd_params(args: argparse.Namespace) -> None:
    """Validate a params file and print it with every default filled in."""
    params = load_params(args.params)
    print(yaml.safe_dump(params.to_dict(), sort_keys=False), end="")


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


def _add_summary_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_retrain_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_promote_parser(sub: argparse._SubParsersAction) -> None:
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


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model / --model-uri, shared by predict and export."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--model",
        type=Path,
        help="model file written by the train stage (default: models/model.pt), or an MLflow "
        "model URI such as models:/imgcls@champion",
    )
    g.add_argument(
        "--model-uri",
        metavar="URI",
        help="an MLflow model instead: runs:/<run_id>/model or models:/<name>/<version>",
    )


def _cmd_predict(args: argparse.Namespace) -> None:
    """Predict files / folders / globs and print or write a table, CSV or JSON."""
    from imgcls.inference import predict
    from imgcls.io import write_csv, write_json, write_text

    fmt = args.format or _format_from_suffix(args.output)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = None if args.model_uri else (args.model or Path("models/model.pt"))
    predictor = predict.load_predictor(model, args.model_uri, args.device)
    preds = predict.predict_paths(
        predictor,
        args.paths,
        batch_size=args.batch_size,
        top_k=args.top_k,
        workers=args.workers,
        progress=not args.no_progress,
    )
    k = min(args.top_k, len(predictor.classes))
    if fmt == "csv":
        frame = predict.to_frame(preds, k)
        text = None if args.output else frame.to_csv(index=False)
        if args.output:
            write_csv(args.output, frame)
    elif fmt == "json":
        records = predict.to_records(preds)
        text = None if args.output else json.dumps(records, indent=2) + "\n"
        if args.output:
            write_json(args.output, records)
    else:
        text = predict.format_table(preds)
        if args.output:
            write_text(args.output, text)
            text = None
    if text is not None:
        sys.stdout.write(text)
    failed = sum(p.error is not None for p in preds)
    if failed == len(preds):
        raise predict.PredictError(f"none of the {len(preds)} inputs could be predicted")
    if failed:
        print(
            f"imgcls predict: {failed} of {len(preds)} inputs failed (see their error rows)",
            file=sys.stderr,
        )
    elif args.output:
        print(f"imgcls predict: {len(preds)} predictions -> {args.output}", file=sys.stderr)


def _format_from_suffix(output: Path | None) -> str:
    """csv / json from the output file's suffix, else the readable table."""
    suffix = output.suffix.lower() if output else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "table")


def _cmd_export(args: argparse.Namespace) -> None:
    """Export to ONNX or TorchScript and check it against PyTorch."""
    from imgcls.inference import export
    from imgcls.inference.predict import load_predictor

    model = None if args.model_uri else (args.model or Path("models/model.pt"))
    predictor = load_predictor(model, args.model_uri, "cpu")
    out = args.output or export.default_output(model or Path("models/model.pt"), args.format)
    export.export_model(predictor.model, predictor.meta, args.format, out)
    if args.no_verify:
        print(f"imgcls export: {args.format} model -> {out} (not verified)")
        return
    diff = export.verify_export(predictor.model, out, args.format)
    print(f"imgcls export: {args.format} model -> {out} (max |p - p_torch| = {diff:.1e})")


def _add_predict_export_parsers(sub: argparse._SubParsersAction) -> None:
    """`imgcls predict` and `imgcls export` (see docs/predict.md)."""
    p = sub.add_parser(
        "predict",
        help="predict image files, folders or globs with a trained model",
        description="Predict images with the trained model; preprocessing (size, channels, "
        "normalisation, class names) comes from the model itself. See docs/predict.md.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, globs ('**')")
    _model_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (3)")
    p.add_argument("--format", choices=["table", "csv", "json"], help="default: from --output")
    p.add_argument("--output", "-o", type=Path, help="write here instead of stdout (atomic)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: up to 4)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's, one per core)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser(
        "export",
        help="export the model to ONNX or TorchScript (uint8 images in, probabilities out)",
        description="Export the trained model with its metadata; the export is checked against "
        "PyTorch (max probability difference 1e-4). See docs/predict.md.",
    )
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    _model_args(p)
    p.add_argument(
        "--output", "-o", type=Path, help="default: models/model.onnx / models/model.torchscript.pt"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    p.set_defaults(func=_cmd_export)


def _cmd_lr_find(args: argparse.Namespace) -> None:
    """LR range test on the train split: plot, suggestion, and the command to try it."""
    from imgcls.stage import setup_logging
    from imgcls.training import lr_finder
    from imgcls.training.setup import select_device
    from imgcls.training.train import load_training_data

    setup_logging()
    params = load_params(args.params)
    cfg = params.train
    data = load_training_data(params, args.splits, Path.cwd(), args.cache_dir, progress=True)
    n_train = int((data.frame["split"] == "train").sum())
    print(
        f"lr-find: {args.iters} steps, lr {args.start:g} -> {args.end:g}, {params.model.name}, "
        f"{cfg.optimizer}, batch {cfg.batch_size}, {n_train} train images",
        file=sys.stderr,
    )
    result = lr_finder.find_lr(params, data, start=args.start, end=args.end, iters=args.iters)
    lr_finder.plot_lr_find(result, args.plot)
    print(f"lr-find: {len(result.lrs)} steps{' (stopped: loss diverged)' * result.diverged}")
    print(lr_finder.summary(result))
    print(f"Plot: {args.plot}")
    if args.mlflow:
        device = str(select_device(cfg.device))
        run_id = lr_finder.log_to_mlflow(
            params, result, args.plot, splits_csv=args.splits, device=device
        )
        print(f"MLflow run: {run_id} (experiment {params.tracking.experiment!r})")


def _add_lr_find_parser(sub: argparse._SubParsersAction) -> None:
    """`imgcls lr-find` (see docs/lr-find.md)."""
    p = sub.add_parser(
        "lr-find",
        help="LR range test: plot loss vs learning rate and suggest train.lr",
        description="Train a throwaway copy of the configured model on the train split while "
        "the learning rate grows exponentially; save the loss-vs-LR plot, suggest a value "
        "(steepest descent of the smoothed loss, cross-checked with min-loss / 10) and print "
        "the `dvc exp run` command to try it. See docs/lr-find.md.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    p.add_argument(
        "--splits",
        type=Path,
        default=Path("data/processed/splits.csv"),
        help="splits.csv from `dvc repro split` (data/processed/splits.csv)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="(data/cache)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (10)")
    p.add_argument("--iters", type=int, default=100, help="mini-batch steps of the ramp (100)")
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("reports/lr_find.png"),
        help="loss-vs-LR figure (reports/lr_find.png)",
    )
    p.add_argument(
        "--mlflow",
        action="store_true",
        help="also log plot, curve and suggestion as a run in the configured experiment",
    )
    p.set_defaults(func=_cmd_lr_find)


def _cmd_tune(args: argparse.Namespace) -> None:
    """Optuna search over tune.space; trials in MLflow; print the `dvc exp run` for the best."""
    from imgcls.stage import setup_logging
    from imgcls.tune import TuneOptions, format_result, tune

    setup_logging()
    opts = TuneOptions(
        params_path=Path(args.params),
        splits=args.splits,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        n_trials=args.n_trials,
        timeout=args.timeout,
        jobs=args.jobs,
    )
    try:
        result = tune(opts)
    except KeyboardInterrupt:
        print(
            "imgcls tune: interrupted; rerun the same command to resume the study", file=sys.stderr
        )
        sys.exit(130)
    print(format_result(result))


def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    """`imgcls tune` (see docs/tune.md)."""
    p = sub.add_parser(
        "tune",
        help="search hyperparameters (Optuna; trials as MLflow child runs; DVC reproduces)",
        description="Search tune.space of params.yaml with Optuna (TPE, median pruning per "
        "epoch) on data/processed/splits.csv. Every trial is an MLflow child run of one parent "
        "run; the study is stored next to the MLflow store and a rerun resumes it. Ends with "
        "reports/tune/best.yaml and the `dvc exp run -S ...` command that reproduces the best "
        "trial. See docs/tune.md.",
    )
    p.add_argument("--params", default="params.yaml", help="params file (params.yaml)")
    p.add_argument(
        "--n-trials",
        type=int,
        help="finished trials the study should reach (default: tune.n_trials); "
        "a rerun only runs the missing ones",
    )
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--jobs", type=int, default=1, help="trials in parallel processes (1)")
    p.add_argument(
        "--splits",
        type=Path,
        default=Path("data/processed/splits.csv"),
        help="splits.csv from `dvc repro split` (data/processed/splits.csv)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="(data/cache)")
    p.add_argument("--out", type=Path, default=Path("reports/tune"), help="(reports/tune)")
    p.set_defaults(func=_cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    ap = argparse.ArgumentParser(
        prog="imgcls",
        description="Experiment-tracked image classification. Run the pipeline with `dvc repro`; "
        "these commands help around it.",
    )
    ap.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("models", help="list model names usable as model.name")
    p.add_argument("--timm", metavar="PATTERN", help="also list timm models matching a pattern")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("params", help="validate params.yaml and print the resolved values")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=_cmd_params)
    _add_summary_parser(sub)
    _add_retrain_parser(sub)
    _add_promote_parser(sub)
    _add_predict_export_parsers(sub)
    _add_lr_find_parser(sub)
    _add_tune_parser(sub)
    from imgcls.compare import add_compare_parser  # the command's options live with it

    add_compare_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `imgcls` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ImgclsError, ConfigError) as err:
        print(f"imgcls {args.command}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
