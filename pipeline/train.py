"""Stage `train`: fit the configured model on the train split and log the run to MLflow."""

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

import imgcls
from imgcls.config import load_params
from imgcls.data.augment import build_transform, serialize
from imgcls.io import write_csv, write_json
from imgcls.models.bundle import ImageClassifier, save_bundle
from imgcls.stage import run_stage
from imgcls.tracking import Run, git_info, repo_root
from imgcls.training.run import load_split_data, train_model
from imgcls.training.trainer import select_device


def main() -> None:
    """Train, then write the model, train metrics, per-epoch history and the run id file."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--cache-dir", default="data/cache", type=Path)
    ap.add_argument("--model", default="models/model.pt", type=Path)
    ap.add_argument("--checkpoint", default="models/checkpoints/last.pt", type=Path)
    ap.add_argument("--metrics", default="metrics/train.json", type=Path)
    ap.add_argument("--history", default="plots/train.csv", type=Path)
    ap.add_argument("--run-file", default="models/run.json", type=Path)
    ap.add_argument("--reports", default="reports", type=Path)
    args = ap.parse_args()
    params = load_params(args.params)
    cfg = params.train
    data = load_split_data(args.splits, Path.cwd(), cfg.image_size, cfg.channels, args.cache_dir)
    build_transform(params.augment.eval, "augment.eval")  # fail on a bad entry before training

    run = None
    if params.tracking.enabled:
        tags = {
            **git_info(repo_root()),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            "data.splits_sha256": hashlib.sha256(args.splits.read_bytes()).hexdigest(),
            "device": str(select_device(cfg.device)),
            "imgcls.version": imgcls.__version__,
            "model.name": params.model.name,
        }
        run = Run.start(params.tracking, run_name=os.environ.get("DVC_EXP_NAME") or None, tags=tags)
        run.log_params(params.to_dict())
        run.log_text(
            yaml.safe_dump(params.to_dict(), sort_keys=False), "config/params.resolved.yaml"
        )
        run.log_dict(serialize(build_transform(params.augment.train)), "config/augment.train.json")
        for name in ("validation.md", "validation.json", "split.json"):
            if (args.reports / name).is_file():
                run.log_artifact(args.reports / name, "data")

    def on_epoch_end(epoch: int, row: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    try:
        result, meta = train_model(
            params, data, checkpoint_path=args.checkpoint, on_epoch_end=on_epoch_end
        )
    except BaseException:
        if run is not None:
            run.end("FAILED")
        raise
    save_bundle(args.model, result.model, meta)
    history = pd.DataFrame(result.history)
    write_csv(args.history, history)
    best = history[history["epoch"] == result.best_epoch].iloc[0].to_dict()
    write_json(
        args.metrics,
        {
            "best_epoch": result.best_epoch,
            "epochs_run": len(history),
            "stopped_early": result.stopped_early,
            **{k: float(v) for k, v in best.items() if k != "epoch"},
        },
    )
    run_info = {"run_id": None, "tracking_uri": None}
    if run is not None:
        run.log_metrics({"best_epoch": result.best_epoch, f"best_{cfg.monitor}": result.best_value})
        clf = ImageClassifier(result.model.cpu().eval(), meta["mean"], meta["std"])
        example = np.zeros((1, cfg.image_size, cfg.image_size, data.channels), np.uint8)
        run.log_pytorch_model(
            clf,
            input_example=example,
            metadata=meta,
            registered_name=params.tracking.register_model,
        )
        run_info = {"run_id": run.run_id, "tracking_uri": run.uri, "not_logged": run.not_logged}
    write_json(args.run_file, run_info)
    print(f"train: best epoch {result.best_epoch}, {cfg.monitor} {result.best_value:.4f}")


if __name__ == "__main__":
    run_stage("train", main)
