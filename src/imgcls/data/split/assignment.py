"""Group-stratified train / val / test split: leak-proof by construction and stable as data grows.

Algorithm (details and rationale in docs/split.md):

1. Groups that share a file (same sha256) are merged, so an exact duplicate can never straddle
   two splits even if validate missed it.
2. A delivered test set is never grown: with ``respect_source_split`` the test split is exactly
   the rows delivered as ``source_split=test``. Any other row that would leak into them (same
   group, same bytes, or a verified near-duplicate from ``near_pairs``) is *excluded*: kept out
   of every split and listed with its test twin (``DataFrame.attrs[EXCLUDED_ATTR]``).
   Fixed groups: with ``previous`` (stable mode) every group that already had a split keeps it,
   unless the grouping itself changed (then a fresh split, with a warning); delivered test
   groups go to test.
3. Free groups are placed largest first by a greedy that minimises the squared per-class share
   deviation from the targets, except that a class about to run out of groups first covers the
   splits it is still missing from; one-image groups then fill each class's remaining deficit
   exactly (water-filling), which brings large datasets to ~0 pp deviation.
4. A split with a positive fraction that is still empty takes the smallest group from the split
   that can spare one; if none can, :class:`SplitError`.
5. Local search (best move, else best pair swap) lowers the squared deviation further without
   ever removing a class from a split; this is what helps few, large, mixed-label groups.

Multi-label data (``multi_label=True``, label cells "cat|dog"): the "classes" above become the
columns of :func:`imgcls.data.split.strata.multi_label_columns`: one stratum per label
combination with enough groups, rare combinations pooled by their rarest label, plus one column
per individual label. Every
free group (one-image groups too) goes through the greedy, so each label reaches every split
it has groups for, train first.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix

from imgcls.config import SplitConfig
from imgcls.data.split.common import (
    EXCLUDED_ATTR,
    EXCLUDED_COLUMNS,
    REQUIRED,
    SPLITS,
    TEST,
    WARNINGS_ATTR,
    SplitError,
    check_frame,
    check_label_sets,
    column,
    fractions,
    merged_components,
)
from imgcls.data.split.fixed import leaks_into_test, pin_previous, pin_source_test
from imgcls.data.split.placement import (
    cover_train,
    fill_singletons,
    greedy,
    improve,
    new_placement,
    repair_empty,
)
from imgcls.data.split.report import coverage_warnings
from imgcls.data.split.strata import multi_label_columns, stratum_min_groups

log = logging.getLogger("imgcls.split")  # one logger for the whole split
# Local search runs over at most this many free groups (beyond, greedy + water-filling is
# already within a fraction of a point); pair swaps cost O(groups^2) per step.
LOCAL_SEARCH_MAX_GROUPS = 5000
SWAP_MAX_GROUPS = 600


def _order_keys(seed: int, names: np.ndarray) -> np.ndarray:
    """Seeded hash per group name: a tie-break that ignores input row order."""
    salt = f"imgcls-split:{seed}:".encode()
    keys = [
        int.from_bytes(hashlib.blake2b(salt + str(n).encode(), digest_size=8).digest(), "big")
        for n in names
    ]
    return np.asarray(keys, dtype=np.uint64)


def _empty_split_error(empty: list[str], n_groups: int, n_kept: int, n_source: int) -> SplitError:
    """Explain why a split with a positive fraction got no group, and what to change."""
    n_free = n_groups - n_kept - n_source
    why = [f"of {n_groups} group(s)"]
    if n_kept:
        why.append(f"{n_kept} keep the split they had in the previous splits.csv (stable: true)")
    if n_source:
        why.append(f"{n_source} hold rows that arrived as source_split=test and go to test")
    fixes = ["add data"]
    if n_kept:
        fixes.append("set split.stable: false to re-split from scratch (moves images)")
    if n_source:
        fixes.append("set split.respect_source_split: false")
    fixes.append(f"set split.{empty[0]} to 0")
    return SplitError(
        f"split(s) {', '.join(empty)} would be empty: {', '.join(why)}, and the {n_free} other "
        f"group(s) cannot fill every split; {', or '.join(fixes)}"
    )


def assign_splits(
    valid: pd.DataFrame,
    cfg: SplitConfig,
    seed: int,
    previous: pd.DataFrame | None = None,
    *,
    multi_label: bool = False,
    near_pairs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return `valid` plus a `split` column (train/val/test); SplitError on impossible input.

    `multi_label` (`data.multi_label`): `label` cells are label sets ("cat|dog"), stratified by
    combination and by individual label (module docstring, docs/split.md). `near_pairs`:
    validate's verified near-duplicate pairs (path, twin, similarity). With
    `respect_source_split`, rows that would leak into the delivered test set are left out of
    the result and listed in `.attrs[EXCLUDED_ATTR]`.
    """
    check_frame(valid, "valid.csv", REQUIRED, "it is written by the validate stage")
    if multi_label:
        check_label_sets(valid, "valid.csv")
    if len(valid) == 0:
        raise SplitError(
            "valid.csv: no rows to split; every image was quarantined or none was found "
            "(see reports/validation.json)"
        )
    warnings: list[str] = []
    frac = fractions(cfg)
    positive = np.flatnonzero(frac > 0)
    excluded = pd.DataFrame(columns=list(EXCLUDED_COLUMNS))
    if cfg.respect_source_split and (column(valid, "source_split") == "test").any():
        excluded = leaks_into_test(valid, near_pairs)
        if len(excluded):
            warnings.append(
                f"{len(excluded)} row(s) not delivered as test are duplicates, near-duplicates "
                "or group mates of delivered test images; they are kept out of train and val "
                "(they would leak) and listed with their test twin in reports/split.json"
            )
            valid = valid.drop(index=valid.index[excluded.index.to_numpy()])
        excluded = excluded.reset_index(drop=True)

    comp, names, merged = merged_components(valid)
    if merged:
        warnings.append(
            f"{merged} group(s) were merged into others because they share identical files "
            "(sha256); validate should already group exact duplicates"
        )
    n_groups = len(names)
    if n_groups < len(positive):
        raise SplitError(
            f"valid.csv: only {n_groups} group(s) but {len(positive)} splits have a positive "
            f"fraction ({', '.join(SPLITS[s] for s in positive)}): every group lies in exactly one "
            "split, so add data, use finer groups (data.group.by) or set a split fraction to 0"
        )
    cls = np.empty(0, dtype=np.int64)
    cover = None  # single-label: every class is covered
    if multi_label:
        gc, cover, strata = multi_label_columns(
            column(valid, "label"), comp, n_groups, stratum_min_groups(frac)
        )
        if strata.pooled:
            log.info(
                "multi-label split: %d of %d label combinations have fewer than %d groups and "
                "are pooled by their rarest label",
                sum(map(len, strata.pooled.values())),
                len(strata.groups),
                strata.min_groups,
            )
    else:
        classes, cls = np.unique(column(valid, "label").to_numpy(), return_inverse=True)
        gc = coo_matrix((np.ones(len(valid)), (comp, cls)), shape=(n_groups, len(classes)))
        gc = gc.tocsr()
    gc.sum_duplicates()
    size = np.bincount(comp, minlength=n_groups).astype(np.int64)  # images per group
    keys = _order_keys(seed, names)

    assign = np.full(n_groups, -1, dtype=np.int64)
    if previous is not None and len(previous) and cfg.stable:  # stable: false re-splits all
        pin_previous(valid, previous, comp, frac, assign, warnings)
    n_kept = int((assign >= 0).sum())
    use_source = pin_source_test(valid, cfg, comp, assign, warnings)
    n_source = int((assign >= 0).sum()) - n_kept
    eligible = positive[positive != TEST] if use_source else positive
    if len(eligible) == 0:
        raise SplitError(
            "params split: train and val are both 0, so rows that did not arrive as "
            "source_split=test have nowhere to go; give train (and val) a positive fraction"
        )

    state = new_placement(gc, assign, eligible, frac, cover)
    free = assign < 0
    left = np.asarray((gc[free] > 0).sum(axis=0)).ravel()
    if multi_label:
        # A one-image group still holds a stratum and 1+ labels, which water-filling (one
        # class per image) cannot place: every free group goes through the greedy.
        order = np.flatnonzero(free)
        greedy(state, order[np.lexsort((keys[order], -size[order]))], left)
    else:
        multi = np.flatnonzero(free & (size > 1))
        multi = multi[np.lexsort((keys[multi], -size[multi]))]  # largest first
        singles = np.flatnonzero(free & (size == 1))
        singles = singles[np.argsort(keys[singles], kind="stable")]
        greedy(state, multi, left)
        fill_singletons(state, singles, np.bincount(cls).astype(float))
    warnings += repair_empty(state, positive, free, size, keys)
    if multi_label and (moved := cover_train(state, free, size, keys)):
        log.info("multi-label split: moved %d group(s) to train so that every label has one", moved)
    empty = [SPLITS[s] for s in positive if not (state.assign == s).any()]
    if empty:
        raise _empty_split_error(empty, n_groups, n_kept, n_source)
    free_groups = np.flatnonzero(free)
    if len(free_groups) <= LOCAL_SEARCH_MAX_GROUPS:
        improve(state, free_groups, max_steps=4 * len(free_groups), swap_limit=SWAP_MAX_GROUPS)

    out = valid.copy()
    out["split"] = np.asarray(SPLITS, dtype=object)[state.assign[comp]]
    warnings += coverage_warnings(out, cfg, multi_label)
    for w in warnings:
        log.warning("%s", w)
    out.attrs[WARNINGS_ATTR] = warnings
    out.attrs[EXCLUDED_ATTR] = excluded
    return out
