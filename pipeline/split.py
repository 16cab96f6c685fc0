"""Stage `split`: group-stratified train / val / test assignment with leakage checks."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.split import SplitPaths, run_split
from imgcls.stage import run_stage


def main() -> None:
    """Assign every valid row to a split; keep earlier groups where they were when `stable`."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--valid", default="data/interim/valid.csv", type=Path)
    ap.add_argument("--near-duplicates", default="data/interim/near_duplicates.csv", type=Path)
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--report", default="reports/split.json", type=Path)
    ap.add_argument("--markdown", default="reports/split.md", type=Path)
    ap.add_argument("--figure", default="reports/split_excluded.png", type=Path)
    args = vars(ap.parse_args())
    params = load_params(args.pop("params"))
    print(run_split(SplitPaths(**args), params))


if __name__ == "__main__":
    run_stage("split", main)
