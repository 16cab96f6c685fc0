"""`imgcls compare A B` (the subcommand's options live here, next to what it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imgcls.compare.report import compare_runs, terminal_table


def _cmd_compare(args: argparse.Namespace) -> None:
    """`imgcls compare A B`."""
    comp = compare_runs(
        args.a, args.b, args.out, args.tracking_uri, force=args.force, log=not args.no_log
    )
    print(terminal_table(comp, args.rows))


def add_compare_parser(sub: Any) -> None:
    """`imgcls compare` and its options (see docs/compare.md)."""
    p = sub.add_parser(
        "compare",
        help="compare two runs: per-class deltas, confusion difference, fixed / broken images",
        description="Compare two evaluated runs (MLflow run ids, DVC experiment names, or "
        "models:/name@alias | models:/name/version): per-class precision / recall / F1 and "
        "their change, the test confusion difference B − A, the test images B fixed and broke, "
        "and the params that differ. Writes Markdown + PNG + CSV, logs them to B's run. "
        "See docs/compare.md.",
    )
    p.add_argument("a", metavar="A", help="the baseline run")
    p.add_argument("b", metavar="B", help="the run compared with it")
    p.add_argument("--out", type=Path, help="output folder (reports/compare/<A>_vs_<B>)")
    p.add_argument("--tracking-uri", help="MLflow store (default: as the pipeline's)")
    p.add_argument("--force", action="store_true", help="compare even if the test sets differ")
    p.add_argument("--no-log", action="store_true", help="do not log the report to B's run")
    p.add_argument("--rows", type=int, default=10, help="classes in the terminal table (10)")
    p.set_defaults(func=_cmd_compare)
