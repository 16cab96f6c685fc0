"""The train stage's entry: start the MLflow logger first, then import torch and train.

Kept free of heavy imports on purpose: :func:`run_train_stage` starts the logger process (a
fail-fast probe of the store, milliseconds) *before* importing torch, albumentations and
scikit-learn (~4 s), so the logger imports mlflow and opens the store on the core those
imports leave idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgcls.config import Params
from imgcls.tracking import finish_train_run, is_main_rank, start_train_run
from imgcls.training.timing import StageClock


@dataclass(frozen=True)
class TrainPaths:
    """Every file the train stage reads or writes (as declared in dvc.yaml)."""

    splits: Path = Path("data/processed/splits.csv")
    cache_dir: Path = Path("data/cache")  # decode cache; probe/ holds the settings probe's
    model: Path = Path("models/model.pt")
    checkpoint: Path = Path("models/checkpoints/last.pt")
    metrics: Path = Path("metrics/train.json")  # headline (DVC metric)
    details: Path = Path("reports/train_details.json")  # every figure of the best epoch
    history: Path = Path("plots/train.csv")
    run_file: Path = Path("models/run.json")
    reports: Path = Path("reports")  # the data stages' reports, logged with the run


def run_train_stage(paths: TrainPaths, params: Params) -> str | None:
    """Train, write every output; the summary line (None on ranks other than 0).

    Under `torchrun --nproc_per_node=N` every process runs the stage; only rank 0 talks to
    MLflow and writes outputs, the others just train their share of each batch. Every part's
    seconds go to `timing` in the metrics file (the stage's parts) and in the details file (with
    each epoch's), and to the run's `time/<part>_s` metrics.
    """
    clock = StageClock()
    run = None
    if is_main_rank():
        run = start_train_run(params, splits_csv=paths.splits, reports_dir=paths.reports)
    clock.mark("tracking_start")
    # Imported only now (torch & co, ~4 s): meanwhile the logger imports mlflow.
    import pandas as pd

    from imgcls.data.augment import serialize
    from imgcls.io import write_csv, write_json
    from imgcls.models.bundle import save_bundle
    from imgcls.training import distributed
    from imgcls.training.figures import augmentation_grid
    from imgcls.training.train import TrainContext, load_training_data, train_metrics, train_model

    clock.mark("imports")
    ctx = TrainContext.create(params, distributed.from_env())
    if run is not None:
        run.set_tags({"device": str(ctx.device)})
        run.log_dict(serialize(ctx.transform), "config/augment.train.json")
    try:
        with distributed.main_first(ctx.dist):  # rank 0 fills the decode cache, others reuse it
            data = load_training_data(
                params, paths.splits, Path.cwd(), paths.cache_dir, progress=ctx.dist.is_main
            )
        clock.mark("data")
        if run is not None:
            run.check()
            grid = augmentation_grid(
                *data.part("train"), data.classes, ctx.transform, seed=params.base.seed
            )  # tens of ms; the logger process only uploads it
            run.log_image(grid, "figures/augmentation_grid.png")
            clock.mark("figures")
        result, meta = train_model(
            params,
            data,
            checkpoint_path=paths.checkpoint,
            ctx=ctx,
            run=run,
            probe_cache=paths.cache_dir / "probe",
        )
        clock.mark("fit")
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    finally:
        distributed.teardown()
    if not ctx.dist.is_main:
        return None
    save_bundle(paths.model, result.model, meta)
    clock.mark("model_save")
    epochs = result.extra.get("timing", [])
    probe = result.extra.get("probe")
    clock.split(
        "fit",
        {
            "probe": probe["seconds"] if probe else 0.0,
            **{p: sum(e[f"{p}_s"] for e in epochs) for p in ("train", "val", "checkpoint", "log")},
        },
    )  # what is left of fit: building the model, batches, optimiser (and resume reading)
    if run is not None:
        run.log_metrics(clock.metrics())
    best = {"best_epoch": result.best_epoch, "best_value": result.best_value}
    run_info = finish_train_run(run, **best, monitor=params.train.monitor)
    clock.mark("tracking_wait")
    write_csv(paths.history, pd.DataFrame(result.history))
    headline, details = train_metrics(result)
    details["timing"] = clock.report(epochs)
    # the stage's parts as a DVC metric (`dvc metrics show`, `dvc exp show`): where the stage's
    # seconds went, per run and per experiment; each epoch's own stay in the details file
    headline["timing"] = clock.report()
    if probe is not None:  # absent when nothing was probed (deterministic, fixed settings)
        details["probe"] = probe
    write_json(paths.details, details)
    write_json(paths.metrics, headline)
    write_json(paths.run_file, run_info)
    return f"train: best epoch {result.best_epoch}, {params.train.monitor} {result.best_value:.4f}"
