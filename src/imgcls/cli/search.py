"""`imgcls lr-find` and `imgcls tune`: choosing the learning rate and the hyperparameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcls.config import load_params


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


def add_lr_find_parser(sub: argparse._SubParsersAction) -> None:
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


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
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
