"""Stage `train`: fit the configured model on the train split and log the run to MLflow."""

import argparse
from pathlib import Path

from imgcls import tracking
from imgcls.config import load_params
from imgcls.stage import run_stage


def main() -> None:
    """Train, then write the model, train metrics, per-epoch history and the run id file."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--cache-dir", default="data/cache", type=Path)
    ap.add_argument("--model", default="models/model.pt", type=Path)
    ap.add_argument("--checkpoint", default="models/checkpoints/last.pt", type=Path)
    ap.add_argument("--metrics", default="metrics/train.json", type=Path)  # headline (DVC metric)
    ap.add_argument("--details", default="reports/train_details.json", type=Path)  # best epoch
    ap.add_argument("--history", default="plots/train.csv", type=Path)
    ap.add_argument("--run-file", default="models/run.json", type=Path)
    ap.add_argument("--reports", default="reports", type=Path)
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.train
    # Under `torchrun --nproc_per_node=N` every process runs this file; only rank 0 talks to
    # MLflow and writes outputs, the others just train their share of each batch.
    run = None
    if tracking.is_main_rank():
        # Before the heavy imports below: fails fast (milliseconds) if the store is unusable,
        # then the MLflow logger process imports mlflow and creates the run on the core that
        # these imports (~4 s: torch, albumentations, scikit-learn) leave idle.
        run = tracking.start_pipeline_run(params, splits_csv=args.splits, reports_dir=args.reports)

    import numpy as np
    import pandas as pd

    from imgcls.data.augment import build_transform, serialize
    from imgcls.evaluation.gallery import augmentation_grid
    from imgcls.io import write_csv, write_json
    from imgcls.models.bundle import save_bundle
    from imgcls.training import distributed
    from imgcls.training.run import load_training_data, train_metrics, train_model
    from imgcls.training.trainer import select_device

    dist = distributed.from_env()
    distributed.setup(dist, select_device(cfg.device))
    build_transform(params.augment.eval, "augment.eval")  # fail on a bad entry before training
    augment = build_transform(params.augment.train, "augment.train")
    if run is not None:
        run.set_tags({"device": str(select_device(cfg.device))})
        run.log_dict(serialize(augment), "config/augment.train.json")

    def on_epoch_end(epoch: int, row: dict[str, float]) -> None:
        if run is not None:
            run.check()  # a run that could not be created stops training at the first epoch
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    try:
        with distributed.main_first(dist):  # rank 0 fills the decode cache, the others reuse it
            data = load_training_data(
                params, args.splits, Path.cwd(), args.cache_dir, progress=dist.is_main
            )
        if run is not None:
            run.check()
            grid = augmentation_grid(
                *data.part("train"), data.classes, augment, seed=params.base.seed
            )  # tens of ms; the logger process only uploads it
            run.log_image(grid, "figures/augmentation_grid.png")
        result, meta = train_model(
            params, data, checkpoint_path=args.checkpoint, on_epoch_end=on_epoch_end, dist=dist
        )
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    finally:
        distributed.teardown()
    if not dist.is_main:
        return
    save_bundle(args.model, result.model, meta)
    # The logger process logs both models from the saved bundle while this one writes the
    # other outputs.
    run_info = tracking.finish_train_run(
        run,
        params,
        best_epoch=result.best_epoch,
        best_value=result.best_value,
        input_example=np.asarray(data.images[:2]),  # 2 samples: keeps the batch size dynamic
        metadata=meta,
        model_path=args.model,
    )
    write_csv(args.history, pd.DataFrame(result.history))
    headline, details = train_metrics(result)
    write_json(args.details, details)
    write_json(args.metrics, headline)
    write_json(args.run_file, run_info())
    print(f"train: best epoch {result.best_epoch}, {cfg.monitor} {result.best_value:.4f}")


if __name__ == "__main__":
    run_stage("train", main)
