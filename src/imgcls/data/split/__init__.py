"""Group-stratified train / val / test split: leak-proof by construction and stable as data grows.

One job per module: :mod:`.assignment` (the algorithm, `assign_splits`), :mod:`.fixed` (groups
fixed by the previous split or the delivered test set), :mod:`.placement` (greedy,
water-filling, local search), :mod:`.strata` (multi-label strata), :mod:`.report` and
:mod:`.markdown` (the reports), :mod:`.run` (the split stage). Details: docs/split.md.
"""

from imgcls.data.split.assignment import assign_splits
from imgcls.data.split.common import (
    EXCLUDED_ATTR,
    EXCLUDED_COLUMNS,
    SPLITS,
    WARNINGS_ATTR,
    SplitError,
)
from imgcls.data.split.markdown import excluded_strips, render_split_markdown
from imgcls.data.split.report import near_duplicate_pairs, split_report
from imgcls.data.split.run import SplitPaths, run_split
from imgcls.data.split.strata import Strata, multi_label_strata, stratum_min_groups

__all__ = [
    "EXCLUDED_ATTR",
    "EXCLUDED_COLUMNS",
    "SPLITS",
    "WARNINGS_ATTR",
    "SplitError",
    "SplitPaths",
    "Strata",
    "assign_splits",
    "excluded_strips",
    "multi_label_strata",
    "near_duplicate_pairs",
    "render_split_markdown",
    "run_split",
    "split_report",
    "stratum_min_groups",
]
