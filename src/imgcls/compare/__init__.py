"""`imgcls compare A B`: what changed between two evaluated runs, class by class and image by image.

A and B are MLflow run ids, DVC experiment names (the `dvc.exp_name` tag the train stage sets) or
registered models (`models:/name@alias`, `models:/name/version`). Everything is read from the two
runs' artifacts (the evaluate stage logs `evaluation/eval_details.json`, `confusion_matrix.json`
and `predictions_test.csv`), so any two runs of one store compare, wherever they ran. The result
is written as Markdown + PNG + CSV (default `reports/compare/<A>_vs_<B>/`), logged to B's run
(best-effort) and summarised in the terminal. Two runs compare only when they were tested on the
same images (same `splits.csv` digest, or the same test rows); `force` overrides.
"""

from imgcls.compare.cli import add_compare_parser
from imgcls.compare.diff import Comparison, compare
from imgcls.compare.report import compare_runs, markdown, terminal_table, write_report
from imgcls.compare.runs import CompareError, RunData, load_run, resolve_run

__all__ = [
    "CompareError",
    "Comparison",
    "RunData",
    "add_compare_parser",
    "compare",
    "compare_runs",
    "load_run",
    "markdown",
    "resolve_run",
    "terminal_table",
    "write_report",
]
