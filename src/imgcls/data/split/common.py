"""What the split's modules share: split names, input checks, columns, merged groups."""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgcls.config import SplitConfig
from imgcls.data.grouping import merge_exact
from imgcls.errors import ImgclsError
from imgcls.task import split_labels

SPLITS: tuple[str, ...] = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
# When the old rows of one (since merged) group sat in different splits, the earliest split in
# this order wins: an image the previous model trained on must never move into val or test.
RANK = {name: i for i, name in enumerate(SPLITS)}
WARNINGS_ATTR = "split_warnings"  # DataFrame.attrs key: warnings raised while assigning
EXCLUDED_ATTR = "split_excluded"  # DataFrame.attrs key: rows kept out of every split, and why
EXCLUDED_COLUMNS = ("path", "label", "source_split", "twin", "twin_label", "reason", "similarity")
REQUIRED = ("label", "group")


class SplitError(ImgclsError):
    """Rows that cannot be split as asked: bad input, too few groups or contradictory params."""


# --------------------------------------------------------------------------- input checks


def check_frame(df: pd.DataFrame, what: str, required: tuple[str, ...], fix: str) -> None:
    """Raise SplitError if `df` lacks a required column or has blank labels / groups."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SplitError(
            f"{what}: missing column(s) {', '.join(missing)} "
            f"(has: {', '.join(map(str, df.columns))}); {fix}"
        )
    for col in ("label", "group"):
        if col not in required:
            continue
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            where = df.loc[blank, "path"].head(3).tolist() if "path" in df.columns else []
            raise SplitError(
                f"{what}: {int(blank.sum())} row(s) with an empty '{col}' (e.g. {where}); "
                "every row needs a label and a group (ingest sets group = path when data.group.by "
                "is 'none')"
            )


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column as stripped strings, or empty strings when absent."""
    if name not in df.columns:
        return pd.Series("", index=df.index, dtype=object)
    return df[name].fillna("").astype(str).str.strip()


def fractions(cfg: SplitConfig) -> np.ndarray:
    """Target fractions in SPLITS order."""
    return np.array([cfg.train, cfg.val, cfg.test], dtype=float)


def merged_components(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row component id after merging groups that share a sha256, plus names and #merges.

    The merge rule is :mod:`imgcls.data.grouping`'s (validate's): a component is named after its
    smallest group, and components are numbered in name order.
    """
    return merge_exact(column(df, "group").to_numpy(), column(df, "sha256").to_numpy())


def check_label_sets(df: pd.DataFrame, what: str) -> None:
    """Multi-label: raise SplitError for a label cell with no label in it ("|")."""
    empty = column(df, "label").map(lambda x: not split_labels(x))
    if empty.any():
        where = df.loc[empty, "path"].head(3).tolist() if "path" in df.columns else []
        raise SplitError(
            f"{what}: {int(empty.sum())} row(s) whose label set holds no label (e.g. {where}); "
            "rerun ingest and validate (data.multi_label: true writes sets like 'cat|dog')"
        )
