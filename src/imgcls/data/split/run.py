"""The split stage: read valid rows (and the previous split), assign, write splits and reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgcls.config import Params
from imgcls.data.sheets import contact_sheet
from imgcls.data.split.assignment import assign_splits
from imgcls.data.split.common import SPLITS
from imgcls.data.split.markdown import excluded_strips, render_split_markdown
from imgcls.data.split.report import split_report
from imgcls.io import read_csv, write_csv, write_json, write_text


@dataclass(frozen=True)
class SplitPaths:
    """Where the split stage reads and writes (as declared in dvc.yaml)."""

    valid: Path
    near_duplicates: Path
    splits: Path
    report: Path
    markdown: Path
    figure: Path


def run_split(paths: SplitPaths, params: Params) -> str:
    """Assign every valid row to a split, write every output; the line to tell the user.

    With `split.stable` the previous splits.csv keeps earlier groups where they were; with
    `data.multi_label` label cells are sets "cat|dog", stratified by both.
    """
    cfg, multi_label = params.split, params.data.multi_label
    previous = read_csv(paths.splits) if cfg.stable and paths.splits.is_file() else None
    near = read_csv(paths.near_duplicates) if paths.near_duplicates.is_file() else None
    splits = assign_splits(
        read_csv(paths.valid),
        cfg,
        params.base.seed,
        previous,
        multi_label=multi_label,
        near_pairs=near,
    )
    report = split_report(splits, cfg, near, multi_label=multi_label)
    # always written (a declared output); a one-line note when nothing was excluded
    contact_sheet(excluded_strips(report) or [("no row was excluded", [])], paths.figure)
    beside = paths.figure.parent == paths.markdown.parent
    figure = paths.figure.name if beside else str(paths.figure)
    write_csv(paths.splits, splits)
    write_json(paths.report, report)
    write_text(paths.markdown, render_split_markdown(report, figure))
    counts = splits["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    excluded = report["excluded"]["rows"]
    note = f"; {excluded} row(s) kept out (would leak into test): {paths.markdown}"
    return "split: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + (note if excluded else "")
