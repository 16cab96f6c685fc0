"""Stage `split`: group-stratified train / val / test assignment with leakage checks."""

import argparse
from pathlib import Path

from imgcls.config import load_params
from imgcls.data.near_duplicates import contact_sheet
from imgcls.data.split import assign_splits, excluded_strips, render_split_markdown, split_report
from imgcls.io import read_csv, write_csv, write_json, write_text
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
    args = ap.parse_args()
    params = load_params(args.params)
    previous = read_csv(args.splits) if params.split.stable and args.splits.is_file() else None
    near = read_csv(args.near_duplicates) if args.near_duplicates.is_file() else None
    multi_label = params.data.multi_label  # label cells are sets "cat|dog": stratify by both
    splits = assign_splits(
        read_csv(args.valid),
        params.split,
        params.base.seed,
        previous,
        multi_label=multi_label,
        near_pairs=near,
    )
    report = split_report(splits, params.split, near, multi_label=multi_label)
    # always written (a declared output); a one-line note when nothing was excluded
    contact_sheet(excluded_strips(report) or [("no row was excluded", [])], args.figure)
    figure = args.figure.name if args.figure.parent == args.markdown.parent else str(args.figure)
    write_csv(args.splits, splits)
    write_json(args.report, report)
    write_text(args.markdown, render_split_markdown(report, figure))
    counts = splits["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
    excluded = report["excluded"]["rows"]
    note = f"; {excluded} row(s) kept out (would leak into test): {args.markdown}"
    print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + (note if excluded else ""))


if __name__ == "__main__":
    run_stage("split", main)
