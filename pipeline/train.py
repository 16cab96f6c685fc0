"""Stage `train`: fit the configured model on the train split and log the run to MLflow."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.stage import run_stage
from imgcls.training.stage import TrainPaths, run_train_stage


def main() -> None:
    """Train, then write the model, train metrics, per-epoch history and the run id file."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    for name, default in vars(TrainPaths()).items():  # --splits, --model, --run-file, ...
        ap.add_argument(f"--{name.replace('_', '-')}", default=default, type=Path)
    args = vars(ap.parse_args())
    params = load_params(args.pop("params"))
    summary = run_train_stage(TrainPaths(**args), params)
    if summary:
        print(summary)


if __name__ == "__main__":
    run_stage("train", main)
