"""Stage `split`: group-stratified train / val / test assignment with leakage checks."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.split import assign_splits, split_report
from imgcls.io import read_csv, write_csv, write_json
from imgcls.stage import run_stage


def main() -> None:
    """Assign every valid row to a split; keep earlier groups where they were when `stable`."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--valid", default="data/interim/valid.csv", type=Path)
    ap.add_argument("--splits", default="data/processed/splits.csv", type=Path)
    ap.add_argument("--report", default="reports/split.json", type=Path)
    args = ap.parse_args()
    params = load_params(args.params)
    previous = read_csv(args.splits) if params.split.stable and args.splits.is_file() else None
    multi_label = params.data.multi_label  # label cells are sets "cat|dog": stratify by both
    splits = assign_splits(
        read_csv(args.valid), params.split, params.base.seed, previous, multi_label=multi_label
    )
    report = split_report(
        splits,
        params.split,
        near_duplicate_threshold=params.validate_.near_duplicate_threshold,
        multi_label=multi_label,
    )
    write_csv(args.splits, splits)
    write_json(args.report, report)
    counts = splits["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
    print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_stage("split", main)
