"""Groups whose split is fixed before placement: the previous split (stable) and the delivered
test set, with the rows that would leak into it kept out.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from imgcls.config import SplitConfig
from imgcls.data.split.common import (
    RANK,
    SPLITS,
    TEST,
    SplitError,
    check_frame,
    column,
    merged_components,
)

log = logging.getLogger("imgcls.split")  # one logger for the whole split
# Share of the previous rows whose grouping must have changed before stable mode gives way to a
# fresh split: growth re-groups a few rows (a new near-duplicate), a new rule most of them.
REGROUP_SHARE = 0.5
_FIX_PREVIOUS = "delete data/processed/splits.csv or set split.stable: false to split from scratch"


def _previous_rank(valid: pd.DataFrame, previous: pd.DataFrame) -> np.ndarray:
    """Per-row rank (0 train, 1 val, 2 test, nan new) of the split it had in `previous`."""
    check_frame(previous, "previous splits.csv", ("split",), _FIX_PREVIOUS)
    split = column(previous, "split")
    bad = ~split.isin(SPLITS)
    if bad.any():
        raise SplitError(
            f"previous splits.csv: {int(bad.sum())} row(s) with split not in train/val/test "
            f"(e.g. {split[bad].unique()[:3].tolist()}); {_FIX_PREVIOUS}"
        )
    rank = split.map(RANK).astype(float)
    best = np.full(len(valid), np.nan)
    # A row is "old" if its file (path or bytes) or its group was seen before.
    for key in ("path", "sha256", "group"):
        if key not in valid.columns or key not in previous.columns:
            continue
        prev_key = column(previous, key)
        known = rank[prev_key != ""].groupby(prev_key[prev_key != ""]).min()
        mapped = column(valid, key).map(known).to_numpy(dtype=float)
        best = np.fmin(best, mapped)
    return best


def leaks_into_test(valid: pd.DataFrame, near_pairs: pd.DataFrame | None) -> pd.DataFrame:
    """Rows not delivered as test that would leak into the delivered test rows, with a twin each.

    A row leaks when it shares a group or the bytes (sha256) with a delivered test row, or is a
    verified near-duplicate of one (`near_pairs`: validate's path, twin, similarity). The twin
    named is the closest evidence: a near-duplicate partner, else a byte-identical test file,
    else the first test row of the group.
    """
    is_test = (column(valid, "source_split") == "test").to_numpy()
    paths = column(valid, "path" if "path" in valid.columns else "group").to_numpy()
    labels = column(valid, "label").to_numpy()
    comp = merged_components(valid)[0]
    has_test = np.bincount(comp, weights=is_test, minlength=comp.max() + 1) > 0
    twin = pd.Series("", index=range(len(valid)), dtype=object)
    reason = pd.Series("", index=range(len(valid)), dtype=object)
    sim = pd.Series(np.nan, index=range(len(valid)))
    # same group (possibly merged by validate through duplicates): the group's first test row
    first_test = pd.Series(paths[is_test]).groupby(comp[is_test]).min()
    grouped = ~is_test & has_test[comp]
    twin[grouped] = first_test.reindex(comp[grouped]).to_numpy()
    reason[grouped] = "same group as a delivered test image"
    # byte-identical to a test file: a sharper reason than the group
    sha = column(valid, "sha256").to_numpy()
    test_sha = pd.Series(paths[is_test]).groupby(sha[is_test]).min()
    test_sha = test_sha[test_sha.index != ""]
    exact = ~is_test & pd.Series(sha).isin(test_sha.index).to_numpy()
    twin[exact] = test_sha.reindex(sha[exact]).to_numpy()
    reason[exact] = "exact duplicate of a delivered test image"
    sim[exact] = 1.0
    # verified near-duplicate of a test file, in any group (bounded clusters may cut a chain)
    if near_pairs is not None and len(near_pairs):
        index = pd.Series(np.arange(len(valid)), index=paths)
        index = index[~index.index.duplicated()]  # paths are unique in a valid.csv; be safe
        pa = index.reindex(near_pairs["path"].astype(str)).to_numpy()
        pb = index.reindex(near_pairs["twin"].astype(str)).to_numpy()
        known = ~(np.isnan(pa) | np.isnan(pb))
        pa, pb = pa[known].astype(np.int64), pb[known].astype(np.int64)
        s = pd.to_numeric(near_pairs["similarity"], errors="coerce").to_numpy()[known]
        for a, b in ((pa, pb), (pb, pa)):  # a leaks if b is a delivered test row
            hit = ~is_test[a] & is_test[b] & ~exact[a]
            best = pd.DataFrame({"a": a[hit], "b": b[hit], "s": s[hit]})
            best = best.sort_values(["a", "s"], ascending=[True, False]).drop_duplicates("a")
            better = best["s"].to_numpy() > sim.reindex(best["a"]).fillna(-2).to_numpy()
            best = best[better]
            twin[best["a"].to_numpy()] = paths[best["b"].to_numpy()]
            reason[best["a"].to_numpy()] = "verified near-duplicate of a delivered test image"
            sim[best["a"].to_numpy()] = best["s"].to_numpy()
    leak = (reason != "").to_numpy()
    by_path = pd.Series(labels, index=paths)
    out = pd.DataFrame(
        {
            "path": paths[leak],
            "label": labels[leak],
            "source_split": column(valid, "source_split").to_numpy()[leak],
            "twin": twin[leak].to_numpy(),
            "twin_label": by_path[~by_path.index.duplicated()].reindex(twin[leak]).to_numpy(),
            "reason": reason[leak].to_numpy(),
            "similarity": sim[leak].to_numpy(),
        },
        index=np.flatnonzero(leak),
    )
    return out


def _regrouped_share(valid: pd.DataFrame, previous: pd.DataFrame) -> float:
    """Share of the rows in both tables whose grouping changed (not just a group's name).

    A row counts as changed when its old group now spans several groups or its new group
    spans several old ones. Growth changes a few rows (a new near-duplicate joins two groups),
    a new `data.group` rule most of them.
    """
    if "path" not in valid.columns or "path" not in previous.columns:
        return 0.0
    old = previous.assign(_p=column(previous, "path")).drop_duplicates("_p")
    old = old.set_index("_p")["group"].astype(str)
    new = pd.Series(column(valid, "group").to_numpy(), index=column(valid, "path").to_numpy())
    new = new[~new.index.duplicated()]
    common = new.index.intersection(old.index)
    if not len(common):
        return 0.0
    pairs = pd.DataFrame({"old": old.reindex(common).to_numpy(), "new": new[common].to_numpy()})
    old_spans = pairs.groupby("old")["new"].transform("nunique") > 1
    new_spans = pairs.groupby("new")["old"].transform("nunique") > 1
    return float((old_spans | new_spans).mean())


def pin_previous(
    valid: pd.DataFrame,
    previous: pd.DataFrame,
    comp: np.ndarray,
    frac: np.ndarray,
    assign: np.ndarray,
    warnings: list[str],
) -> None:
    """Stable mode: every group seen in `previous` keeps its split (train > val > test).

    If the grouping itself changed for most rows (a new `data.group` rule), the old assignment
    means nothing for the new groups and would leak or empty splits: nothing is pinned, a
    warning says so, and the split starts afresh.
    """
    regrouped = _regrouped_share(valid, previous)
    if regrouped > REGROUP_SHARE:
        warnings.append(
            f"the grouping changed for {regrouped:.0%} of the rows since the previous "
            "splits.csv (data.group or the duplicate rules changed?); their old splits do not "
            "fit the new groups, so every group was split afresh (split.stable applies to data "
            "that grows, not to a new definition of a group)"
        )
        return
    n_groups = len(assign)
    row_rank = _previous_rank(valid, previous)
    grp_rank = pd.Series(row_rank).groupby(comp).min().reindex(range(n_groups)).to_numpy()
    seen = pd.DataFrame({"g": comp, "r": row_rank}).dropna().drop_duplicates()
    conflict = seen.groupby("g").size().reindex(range(n_groups), fill_value=0).to_numpy() > 1
    if conflict.any():
        warnings.append(
            f"{int(conflict.sum())} group(s) hold rows that were in different splits in the "
            "previous splits.csv (groups merged since); each was kept whole in the earliest of "
            "train > val > test, so no image the previous model trained on moves to val/test "
            "(after changing data.group.by, re-split once with split.stable: false)"
        )
    pinned = ~np.isnan(grp_rank)
    pin = np.where(pinned, np.nan_to_num(grp_rank, nan=0), -1).astype(np.int64)
    dead = pinned & (frac[np.maximum(pin, 0)] == 0)
    if dead.any():
        warnings.append(
            f"{int(dead.sum())} group(s) were in a split whose fraction is now 0; placed again"
        )
    assign[pinned & ~dead] = pin[pinned & ~dead]
    log.info(
        "stable split: %d of %d groups keep their previous split",
        int((assign >= 0).sum()),
        n_groups,
    )


def pin_source_test(
    valid: pd.DataFrame,
    cfg: SplitConfig,
    comp: np.ndarray,
    assign: np.ndarray,
    warnings: list[str],
) -> bool:
    """respect_source_split: groups of delivered test rows go to test; True if there are any.

    Rows that shared a group with test rows were excluded before, so these groups hold test
    rows only, and the test split is exactly the delivered test set, even if the previous
    splits.csv (stable mode) had some of them elsewhere.
    """
    source_test = (column(valid, "source_split") == "test").to_numpy()
    if not (cfg.respect_source_split and source_test.any()):
        return False
    if cfg.test == 0:
        raise SplitError(
            f"params split: test is 0 but respect_source_split is true and "
            f"{int(source_test.sum())} row(s) arrived as source_split=test; set split.test > 0 "
            "or split.respect_source_split: false"
        )
    n_groups = len(assign)
    has_src = np.bincount(comp, weights=source_test, minlength=n_groups) > 0
    overruled = has_src & (assign >= 0) & (assign != TEST)
    if overruled.any():
        warnings.append(
            f"{int(overruled.sum())} group(s) of rows delivered as test were in train/val in "
            "the previous splits.csv; they are test now (the delivered test set is never "
            "trained on), so models trained on the previous split saw part of the test set"
        )
    assign[has_src] = TEST
    grown = (assign == TEST) & ~has_src
    if grown.any():  # e.g. a splits.csv from before this rule, or from group-wise moves
        warnings.append(
            f"{int(grown.sum())} group(s) were in test in the previous splits.csv but hold no "
            "row delivered as test; they were placed again (the test split is exactly the "
            "delivered test set)"
        )
        assign[grown] = -1
    return True
