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
columns of :func:`_multi_label_columns`: one stratum per label combination with enough groups,
rare combinations pooled by their rarest label, plus one column per individual label. Every
free group (one-image groups too) goes through the greedy, so each label reaches every split
it has groups for, train first.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from imgcls.config import SplitConfig
from imgcls.errors import ImgclsError
from imgcls.task import join_labels, split_labels

log = logging.getLogger("imgcls.split")

SPLITS: tuple[str, ...] = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
# When the old rows of one (since merged) group sat in different splits, the earliest split in
# this order wins: an image the previous model trained on must never move into val or test.
_RANK = {name: i for i, name in enumerate(SPLITS)}
WARNINGS_ATTR = "split_warnings"  # DataFrame.attrs key: warnings raised while assigning
EXCLUDED_ATTR = "split_excluded"  # DataFrame.attrs key: rows kept out of every split, and why
EXCLUDED_COLUMNS = ("path", "label", "source_split", "twin", "twin_label", "reason", "similarity")
# Share of the previous rows whose grouping must have changed before stable mode gives way to a
# fresh split: growth re-groups a few rows (a new near-duplicate), a new rule most of them.
REGROUP_SHARE = 0.5
DEVIATION_WARN_PP = 2.0  # the quality target: per-class share within 2 pp of target
_REQUIRED = ("label", "group")
_FIX_PREVIOUS = "delete data/processed/splits.csv or set split.stable: false to split from scratch"
_MAX_EXAMPLES = 5
# Local search runs over at most this many free groups (beyond, greedy + water-filling is
# already within a fraction of a point); pair swaps cost O(groups^2) per step.
LOCAL_SEARCH_MAX_GROUPS = 5000
SWAP_MAX_GROUPS = 600
MAX_REPORTED_COMBINATIONS = 1000  # combination x split rows in reports/split.json
MAX_REPORTED_EXCLUDED = 1000  # excluded rows listed in reports/split.json (the count is complete)
MAX_MARKDOWN_EXCLUDED = 100  # ... and in reports/split.md


class SplitError(ImgclsError):
    """Rows that cannot be split as asked: bad input, too few groups or contradictory params."""


# --------------------------------------------------------------------------- input checks


def _check_frame(df: pd.DataFrame, what: str, required: tuple[str, ...], fix: str) -> None:
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


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """Column as stripped strings, or empty strings when absent."""
    if name not in df.columns:
        return pd.Series("", index=df.index, dtype=object)
    return df[name].fillna("").astype(str).str.strip()


# --------------------------------------------------------------------------- grouping


def _components(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row component id after merging groups that share a sha256, plus names and #merges."""
    groups = _column(df, "group").to_numpy()
    sha = _column(df, "sha256").to_numpy()
    g_names, g_codes = np.unique(groups, return_inverse=True)
    has_sha = sha != ""
    s_names, s_codes = np.unique(sha[has_sha], return_inverse=True)
    n_g, n_s = len(g_names), len(s_names)
    # Bipartite graph group <-> file digest; its connected components are the merged groups.
    rows = g_codes[has_sha]
    cols = n_g + s_codes
    graph = coo_matrix(
        (np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_g + n_s, n_g + n_s)
    )
    n_comp, comp_of_node = connected_components(graph, directed=False)
    comp_of_group = comp_of_node[:n_g]
    used = np.unique(comp_of_group)
    merged = n_g - len(used)
    # Name each component after its lexicographically smallest group (validate's convention);
    # g_names is sorted, so the first group met per component is the smallest.
    first = pd.Series(np.arange(n_g)).groupby(comp_of_group).min()
    remap = np.full(n_comp, -1, dtype=np.int64)
    order = np.argsort(g_names[first.to_numpy()], kind="stable")
    remap[first.index.to_numpy()[order]] = np.arange(len(order))
    names = g_names[first.to_numpy()[order]]
    return remap[comp_of_group[g_codes]], names, merged


def _order_keys(seed: int, names: np.ndarray) -> np.ndarray:
    """Seeded hash per group name: a tie-break that ignores input row order."""
    salt = f"imgcls-split:{seed}:".encode()
    keys = [
        int.from_bytes(hashlib.blake2b(salt + str(n).encode(), digest_size=8).digest(), "big")
        for n in names
    ]
    return np.asarray(keys, dtype=np.uint64)


# --------------------------------------------------------------------------- previous split


def _previous_rank(valid: pd.DataFrame, previous: pd.DataFrame) -> np.ndarray:
    """Per-row rank (0 train, 1 val, 2 test, nan new) of the split it had in `previous`."""
    _check_frame(previous, "previous splits.csv", ("split",), _FIX_PREVIOUS)
    split = _column(previous, "split")
    bad = ~split.isin(SPLITS)
    if bad.any():
        raise SplitError(
            f"previous splits.csv: {int(bad.sum())} row(s) with split not in train/val/test "
            f"(e.g. {split[bad].unique()[:3].tolist()}); {_FIX_PREVIOUS}"
        )
    rank = split.map(_RANK).astype(float)
    best = np.full(len(valid), np.nan)
    # A row is "old" if its file (path or bytes) or its group was seen before.
    for key in ("path", "sha256", "group"):
        if key not in valid.columns or key not in previous.columns:
            continue
        prev_key = _column(previous, key)
        known = rank[prev_key != ""].groupby(prev_key[prev_key != ""]).min()
        mapped = _column(valid, key).map(known).to_numpy(dtype=float)
        best = np.fmin(best, mapped)
    return best


# --------------------------------------------------------------------------- multi-label


@dataclass(frozen=True)
class Strata:
    """How multi-label rows are stratified: one stratum per label combination, rare ones pooled."""

    min_groups: int  # a combination with at least this many groups is its own stratum
    groups: dict[str, int]  # combination -> number of groups holding it
    stratum: dict[str, str]  # combination -> stratum ("combination:<set>" or "rare:<label>")
    pooled: dict[str, list[str]]  # rarest label -> the rare combinations pooled under it


def _check_label_sets(df: pd.DataFrame, what: str) -> None:
    """Multi-label: raise SplitError for a label cell with no label in it ("|")."""
    empty = _column(df, "label").map(lambda x: not split_labels(x))
    if empty.any():
        where = df.loc[empty, "path"].head(3).tolist() if "path" in df.columns else []
        raise SplitError(
            f"{what}: {int(empty.sum())} row(s) whose label set holds no label (e.g. {where}); "
            "rerun ingest and validate (data.multi_label: true writes sets like 'cat|dog')"
        )


def _label_sets(labels: pd.Series) -> list[list[str]]:
    """Each row's individual labels, sorted and unique ("dog|cat|dog" -> ["cat", "dog"])."""
    return [split_labels(join_labels(split_labels(x))) for x in labels]


def multi_label_strata(labels: pd.Series, groups: np.ndarray, min_groups: int) -> Strata:
    """Stratify by label combination where it has `min_groups` groups; pool the rest.

    A rarer combination joins the pool of its rarest label (fewest groups, then name), so the
    labels that most need placing with care drive where their rows go; the per-label columns
    of the split (see :func:`_multi_label_columns`) then keep every label in every split it
    has enough groups for.
    """
    sets = _label_sets(labels)
    combos = [join_labels(x) for x in sets]
    per_combo = pd.DataFrame({"c": combos, "g": groups}).drop_duplicates().groupby("c").size()
    flat = pd.DataFrame(
        {"l": [lab for x in sets for lab in x], "g": np.repeat(groups, [len(x) for x in sets])}
    )
    per_label = flat.drop_duplicates().groupby("l").size()
    stratum: dict[str, str] = {}
    pooled: dict[str, list[str]] = {}
    for combo, n in per_combo.items():
        if n >= min_groups:
            stratum[combo] = f"combination:{combo}"
            continue
        rarest = min(split_labels(combo), key=lambda lab: (int(per_label[lab]), lab))
        stratum[combo] = f"rare:{rarest}"
        pooled.setdefault(rarest, []).append(combo)
    counts = {str(c): int(n) for c, n in per_combo.items()}
    return Strata(min_groups, counts, stratum, {k: sorted(v) for k, v in sorted(pooled.items())})


def stratum_min_groups(frac: np.ndarray) -> int:
    """Groups a combination needs to be its own stratum: enough for one in the smallest split.

    With 0.7 / 0.15 / 0.15 that is 7 (7 x 0.15 >= 1); a smaller stratum could only be cut
    1 / 1 / 1, far from the fractions, and would drag its labels' shares with it.
    """
    positive = frac[frac > 0]
    return max(len(positive), int(np.ceil(1.0 / positive.min() - 1e-9)))


def _multi_label_columns(
    labels: pd.Series, comp: np.ndarray, n_groups: int, min_groups: int
) -> tuple[csr_matrix, np.ndarray, Strata]:
    """(groups, columns) row counts over strata and individual labels, the coverage mask, strata.

    Balancing strata keeps label co-occurrence alike across splits; balancing individual
    labels (a row counts once for each of its labels) keeps every label's share on target.
    Only label columns are covered (reach every split first, train first): a rare stratum
    missing from val is fine, a label missing from train is not.
    """
    strata = multi_label_strata(labels, comp, min_groups)
    sets = _label_sets(labels)
    row_strata = [strata.stratum[join_labels(x)] for x in sets]
    names = sorted(set(row_strata)) + sorted({f"label:{lab}" for x in sets for lab in x})
    col = {name: i for i, name in enumerate(names)}
    rows = np.repeat(comp, [1 + len(x) for x in sets])
    cols = [
        c for st, x in zip(row_strata, sets, strict=True) for c in (st, *(f"label:{v}" for v in x))
    ]
    gc = coo_matrix(
        (np.ones(len(rows)), (rows, np.fromiter((col[c] for c in cols), np.int64, len(cols)))),
        shape=(n_groups, len(names)),
    ).tocsr()
    cover = np.array([name.startswith("label:") for name in names], dtype=bool)
    return gc, cover, strata


# --------------------------------------------------------------------------- placement


@dataclass
class _Placement:
    """Mutable state of one assignment; shares are fractions of a class's rows."""

    weights: csr_matrix  # (groups, classes): share of each class that a group holds
    eligible: np.ndarray  # splits that free groups may go to
    target: np.ndarray  # (splits, classes): target share
    shares: np.ndarray  # (splits, classes): share placed so far
    holders: np.ndarray  # (splits, classes): number of placed groups holding the class
    assign: np.ndarray  # (groups,): split index, -1 = not placed yet
    # (classes,): columns that must reach every split they can (all of them, except the
    # multi-label strata, which only steer the balance)
    cover: np.ndarray

    def put(self, g: int, s: int) -> None:
        """Place (or move) group g into split s."""
        lo, hi = self.weights.indptr[g], self.weights.indptr[g + 1]
        idx, w = self.weights.indices[lo:hi], self.weights.data[lo:hi]
        old = self.assign[g]
        if old >= 0:
            self.shares[old, idx] -= w
            self.holders[old, idx] -= 1
        self.shares[s, idx] += w
        self.holders[s, idx] += 1
        self.assign[g] = s


def _water_fill(deficit: np.ndarray, total: int) -> np.ndarray:
    """Integers x >= 0 summing to `total` that minimise sum((x - deficit)^2)."""
    if total <= 0:
        return np.zeros(len(deficit), dtype=np.int64)
    d = np.sort(deficit)[::-1]
    level = 0.0
    for k in range(1, len(d) + 1):
        level = (d[:k].sum() - total) / k
        if k == len(d) or d[k] <= level:
            break
    x = np.maximum(deficit - level, 0.0)
    base = np.floor(x).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:  # largest remainder; the stable sort breaks ties toward train, val, test
        base[np.argsort(-(x - base), kind="stable")[:short]] += 1
    return base


def _greedy(state: _Placement, order: np.ndarray, left: np.ndarray) -> None:
    """Place groups in `order`, each into the eligible split that best closes its classes' gaps.

    `left` counts, per class, the free groups not placed yet (singletons included): when a class
    has no more groups left than splits it is still missing from, covering those splits comes
    before balance, so that every class reaches every split whenever it has enough groups.
    """
    indptr, indices, data = state.weights.indptr, state.weights.indices, state.weights.data
    elig = state.eligible
    for g in order:
        idx, w = indices[indptr[g] : indptr[g + 1]], data[indptr[g] : indptr[g + 1]]
        # d/dx of sum((share - target)^2): the split most below target for these classes wins.
        score = (state.shares[np.ix_(elig, idx)] - state.target[np.ix_(elig, idx)]) @ w
        absent = state.holders[np.ix_(elig, idx)] == 0  # (eligible, classes of g)
        urgent = absent.any(axis=0) & (left[idx] <= absent.sum(axis=0)) & state.cover[idx]
        if urgent.any():
            need = absent[:, urgent].sum(axis=1)
            score = np.where(need == need.max(), score, np.inf)
        state.put(g, int(elig[int(np.argmin(score))]))
        left[idx] -= 1


def _fill_singletons(state: _Placement, singles: np.ndarray, n_per_class: np.ndarray) -> None:
    """Give each class's one-image groups to the eligible splits by that class's deficit."""
    if len(singles) == 0:
        return
    elig = state.eligible
    single_class = state.weights[singles].indices  # one class per one-image group
    for c in np.unique(single_class):
        members = singles[single_class == c]  # already in seeded-hash order
        deficit = (state.target[elig, c] - state.shares[elig, c]) * n_per_class[c]
        # First one image into each split the class is still missing from (largest deficit
        # first), then the rest by deficit.
        absent = np.flatnonzero(state.holders[elig, c] == 0)
        cover = np.zeros(len(elig), dtype=np.int64)
        cover[absent[np.argsort(-deficit[absent], kind="stable")][: len(members)]] = 1
        x = cover + _water_fill(deficit - cover, len(members) - int(cover.sum()))
        start = 0
        for s, n in zip(elig, x, strict=True):
            state.assign[members[start : start + n]] = s
            state.shares[s, c] += n / n_per_class[c]
            state.holders[s, c] += n
            start += n


def _objective_gain(state: _Placement, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (group, split): change of sum((share - target)^2) if the group moved there."""
    w = state.weights[groups]
    dev = state.shares - state.target  # (splits, classes)
    pull = np.asarray(w @ dev.T)  # (groups, splits): w . dev[s]
    here = pull[np.arange(len(groups)), state.assign[groups]]
    sq = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    return 2 * (pull - here[:, None]) + 2 * sq[:, None], pull


def _pinned_by_coverage(state: _Placement, groups: np.ndarray) -> np.ndarray:
    """Groups whose move would remove a class (or the last group) from their split."""
    alone = ((state.holders == 1) & state.cover).astype(float)  # (splits, classes)
    hit = np.asarray((state.weights[groups] > 0).astype(float) @ alone.T)  # (groups, splits)
    return hit[np.arange(len(groups)), state.assign[groups]] > 0


def _improve(state: _Placement, groups: np.ndarray, max_steps: int, swap_limit: int) -> int:
    """Local search: best single move, else best swap, while the squared deviation drops."""
    groups = groups[np.isin(state.assign[groups], state.eligible)]  # repair may use others
    if len(groups) < 2:
        return 0
    blocked = np.ones(len(SPLITS), dtype=bool)
    blocked[state.eligible] = False
    steps = 0
    while steps < max_steps:
        delta, pull = _objective_gain(state, groups)
        delta[:, blocked] = np.inf
        delta[np.arange(len(groups)), state.assign[groups]] = np.inf
        delta[_pinned_by_coverage(state, groups)] = np.inf
        best = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if delta[best] < -1e-12:
            state.put(int(groups[best[0]]), int(best[1]))
            steps += 1
            continue
        if len(groups) > swap_limit or not _best_swap(state, groups, pull):
            break
        steps += 1
    return steps


def _best_swap(state: _Placement, groups: np.ndarray, pull: np.ndarray) -> bool:
    """Apply the swap of two groups between splits that lowers the deviation most, if any."""
    a = state.assign[groups]
    w = state.weights[groups]
    here = pull[np.arange(len(groups)), a]
    sq = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    cross = np.asarray((w @ w.T).todense())  # (groups, groups): w_g . w_h
    x = pull[:, a] - here[:, None]  # (g, h): g's pull toward h's split
    # Squared deviation change when g and h trade splits (derivation in docs/split.md).
    delta = 2 * (x + x.T) + 2 * (sq[:, None] + sq[None, :] - 2 * cross)
    delta[a[:, None] == a[None, :]] = np.inf
    delta[np.triu_indices(len(groups))] = np.inf  # each unordered pair once
    candidates = np.flatnonzero(delta.ravel() < -1e-12)
    for flat in candidates[np.argsort(delta.ravel()[candidates], kind="stable")][:64]:
        i, j = divmod(int(flat), len(groups))
        g, h, sg, sh = int(groups[i]), int(groups[j]), int(a[i]), int(a[j])
        before = (state.holders[[sg, sh]] > 0) & state.cover
        state.put(g, sh)
        state.put(h, sg)
        if not (before & (state.holders[[sg, sh]] == 0)).any():
            return True
        state.put(g, sg)  # undo: the swap would drop a class from one of the two splits
        state.put(h, sh)
    return False


def _repair_empty(
    state: _Placement, positive: np.ndarray, free: np.ndarray, size: np.ndarray, keys: np.ndarray
) -> list[str]:
    """Move the smallest free group into each positive-fraction split left empty."""
    notes = []
    for s in positive:
        if (state.assign == s).any():
            continue
        per_split = np.bincount(state.assign, minlength=len(SPLITS))
        cand = np.flatnonzero(free & (per_split[state.assign] >= 2))
        if len(cand) == 0:
            return notes  # the caller reports the empty split
        g = int(cand[np.lexsort((keys[cand], size[cand]))[0]])
        notes.append(
            f"split '{SPLITS[s]}' would have been empty; moved the smallest group "
            f"({int(size[g])} image(s)) there from '{SPLITS[state.assign[g]]}'"
        )
        state.put(g, int(s))
    return notes


def _cover_train(state: _Placement, free: np.ndarray, size: np.ndarray, keys: np.ndarray) -> int:
    """Multi-label: give each label still missing from train one of its groups; returns moves.

    With overlapping labels the greedy's coverage rule can be pulled two ways and leave a label
    out of train, which training cannot recover from. Candidates are free groups holding the
    label whose split keeps another group; a move that keeps every label in its old split wins,
    then the smallest group. Failing that, a swap with a train group whose labels all stay in
    train; failing that (e.g. every group is a label's only one), it is left as it is.
    """
    if TRAIN not in state.eligible:
        return 0
    moves = 0
    present = state.weights > 0  # (groups, columns)
    for c in np.flatnonzero(state.cover & (state.holders[TRAIN] == 0)):
        if state.holders[TRAIN, c] > 0:  # an earlier move brought it along
            continue
        per_split = np.bincount(state.assign[state.assign >= 0], minlength=len(SPLITS))
        holding = np.flatnonzero(np.asarray(present[:, c].todense()).ravel())
        away = holding[free[holding] & (state.assign[holding] != TRAIN)]
        cand = away[per_split[state.assign[away]] >= 2]
        if len(cand):
            pinned = _pinned_by_coverage(state, cand)
            state.put(int(cand[np.lexsort((keys[cand], size[cand], pinned))[0]]), TRAIN)
            moves += 1
            continue
        if len(away) and _swap_into_train(state, c, away, free, size, keys):
            moves += 1
    return moves


def _swap_into_train(
    state: _Placement,
    c: int,
    away: np.ndarray,
    free: np.ndarray,
    size: np.ndarray,
    keys: np.ndarray,
) -> bool:
    """Swap the smallest group holding column c with a train group, if no other label loses."""
    g = int(away[np.lexsort((keys[away], size[away]))[0]])
    old = int(state.assign[g])
    mates = np.flatnonzero(free & (state.assign == TRAIN))
    # Labels missing from train may leave `old` for train (that is the point); no other may.
    others = np.vstack([state.cover, state.cover & (state.holders[TRAIN] > 0)])
    for h in mates[np.lexsort((keys[mates], size[mates]))]:
        before = (state.holders[[TRAIN, old]] > 0) & others
        state.put(g, TRAIN)
        state.put(int(h), old)
        if not (before & (state.holders[[TRAIN, old]] == 0)).any():
            return True
        state.put(int(h), TRAIN)  # undo: another label would leave train or `old`
        state.put(g, old)
    return False


# --------------------------------------------------------------------------- delivered test set


def _leaks_into_test(valid: pd.DataFrame, near_pairs: pd.DataFrame | None) -> pd.DataFrame:
    """Rows not delivered as test that would leak into the delivered test rows, with a twin each.

    A row leaks when it shares a group or the bytes (sha256) with a delivered test row, or is a
    verified near-duplicate of one (`near_pairs`: validate's path, twin, similarity). The twin
    named is the closest evidence: a near-duplicate partner, else a byte-identical test file,
    else the first test row of the group.
    """
    is_test = (_column(valid, "source_split") == "test").to_numpy()
    paths = _column(valid, "path" if "path" in valid.columns else "group").to_numpy()
    labels = _column(valid, "label").to_numpy()
    comp = _components(valid)[0]
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
    sha = _column(valid, "sha256").to_numpy()
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
            "source_split": _column(valid, "source_split").to_numpy()[leak],
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
    old = previous.assign(_p=_column(previous, "path")).drop_duplicates("_p")
    old = old.set_index("_p")["group"].astype(str)
    new = pd.Series(_column(valid, "group").to_numpy(), index=_column(valid, "path").to_numpy())
    new = new[~new.index.duplicated()]
    common = new.index.intersection(old.index)
    if not len(common):
        return 0.0
    pairs = pd.DataFrame({"old": old.reindex(common).to_numpy(), "new": new[common].to_numpy()})
    old_spans = pairs.groupby("old")["new"].transform("nunique") > 1
    new_spans = pairs.groupby("new")["old"].transform("nunique") > 1
    return float((old_spans | new_spans).mean())


# --------------------------------------------------------------------------- public API


def _fractions(cfg: SplitConfig) -> np.ndarray:
    """Target fractions in SPLITS order."""
    return np.array([cfg.train, cfg.val, cfg.test], dtype=float)


def _pin_previous(
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


def _pin_source_test(
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
    source_test = (_column(valid, "source_split") == "test").to_numpy()
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
    _check_frame(valid, "valid.csv", _REQUIRED, "it is written by the validate stage")
    if multi_label:
        _check_label_sets(valid, "valid.csv")
    if len(valid) == 0:
        raise SplitError(
            "valid.csv: no rows to split; every image was quarantined or none was found "
            "(see reports/validation.json)"
        )
    warnings: list[str] = []
    frac = _fractions(cfg)
    positive = np.flatnonzero(frac > 0)
    excluded = pd.DataFrame(columns=list(EXCLUDED_COLUMNS))
    if cfg.respect_source_split and (_column(valid, "source_split") == "test").any():
        excluded = _leaks_into_test(valid, near_pairs)
        if len(excluded):
            warnings.append(
                f"{len(excluded)} row(s) not delivered as test are duplicates, near-duplicates "
                "or group mates of delivered test images; they are kept out of train and val "
                "(they would leak) and listed with their test twin in reports/split.json"
            )
            valid = valid.drop(index=valid.index[excluded.index.to_numpy()])
        excluded = excluded.reset_index(drop=True)

    comp, names, merged = _components(valid)
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
        gc, cover, strata = _multi_label_columns(
            _column(valid, "label"), comp, n_groups, stratum_min_groups(frac)
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
        classes, cls = np.unique(_column(valid, "label").to_numpy(), return_inverse=True)
        gc = coo_matrix((np.ones(len(valid)), (comp, cls)), shape=(n_groups, len(classes)))
        gc = gc.tocsr()
    gc.sum_duplicates()
    size = np.bincount(comp, minlength=n_groups).astype(np.int64)  # images per group
    keys = _order_keys(seed, names)

    assign = np.full(n_groups, -1, dtype=np.int64)
    if previous is not None and len(previous) and cfg.stable:  # stable: false re-splits all
        _pin_previous(valid, previous, comp, frac, assign, warnings)
    n_kept = int((assign >= 0).sum())
    use_source = _pin_source_test(valid, cfg, comp, assign, warnings)
    n_source = int((assign >= 0).sum()) - n_kept
    eligible = positive[positive != TEST] if use_source else positive
    if len(eligible) == 0:
        raise SplitError(
            "params split: train and val are both 0, so rows that did not arrive as "
            "source_split=test have nowhere to go; give train (and val) a positive fraction"
        )

    state = _new_placement(gc, assign, eligible, frac, cover)
    free = assign < 0
    left = np.asarray((gc[free] > 0).sum(axis=0)).ravel()
    if multi_label:
        # A one-image group still holds a stratum and 1+ labels, which water-filling (one
        # class per image) cannot place: every free group goes through the greedy.
        order = np.flatnonzero(free)
        _greedy(state, order[np.lexsort((keys[order], -size[order]))], left)
    else:
        multi = np.flatnonzero(free & (size > 1))
        multi = multi[np.lexsort((keys[multi], -size[multi]))]  # largest first
        singles = np.flatnonzero(free & (size == 1))
        singles = singles[np.argsort(keys[singles], kind="stable")]
        _greedy(state, multi, left)
        _fill_singletons(state, singles, np.bincount(cls).astype(float))
    warnings += _repair_empty(state, positive, free, size, keys)
    if multi_label and (moved := _cover_train(state, free, size, keys)):
        log.info("multi-label split: moved %d group(s) to train so that every label has one", moved)
    empty = [SPLITS[s] for s in positive if not (state.assign == s).any()]
    if empty:
        raise _empty_split_error(empty, n_groups, n_kept, n_source)
    free_groups = np.flatnonzero(free)
    if len(free_groups) <= LOCAL_SEARCH_MAX_GROUPS:
        _improve(state, free_groups, max_steps=4 * len(free_groups), swap_limit=SWAP_MAX_GROUPS)

    out = valid.copy()
    out["split"] = np.asarray(SPLITS, dtype=object)[state.assign[comp]]
    warnings += _coverage_warnings(out, cfg, multi_label)
    for w in warnings:
        log.warning("%s", w)
    out.attrs[WARNINGS_ATTR] = warnings
    out.attrs[EXCLUDED_ATTR] = excluded
    return out


def _new_placement(
    gc: csr_matrix,
    assign: np.ndarray,
    eligible: np.ndarray,
    frac: np.ndarray,
    cover: np.ndarray | None = None,
) -> _Placement:
    """Initial state: fixed groups placed, targets for what the free groups must fill."""
    n_per_class = np.asarray(gc.sum(axis=0)).ravel()
    weights = csr_matrix(gc.multiply(1.0 / n_per_class[None, :]))
    weights.sort_indices()
    n_cls = gc.shape[1]
    shares = np.zeros((len(SPLITS), n_cls))
    holders = np.zeros((len(SPLITS), n_cls), dtype=np.int64)
    present = (gc > 0).astype(np.int64)
    for s in range(len(SPLITS)):
        rows = assign == s
        shares[s] = np.asarray(weights[rows].sum(axis=0)).ravel()
        holders[s] = np.asarray(present[rows].sum(axis=0)).ravel()
    # Splits outside `eligible` hold only fixed groups; the eligible ones share the rest.
    outside = np.setdiff1d(np.arange(len(SPLITS)), eligible)
    target = np.zeros((len(SPLITS), n_cls))
    target[outside] = shares[outside]
    rest = 1.0 - shares[outside].sum(axis=0)
    target[eligible] = np.outer(frac[eligible] / frac[eligible].sum(), rest)
    cover = np.ones(n_cls, dtype=bool) if cover is None else cover
    return _Placement(weights, eligible, target, shares, holders, assign, cover)


# --------------------------------------------------------------------------- report


def _target_shares(counts: pd.DataFrame, cfg: SplitConfig, use_source: bool) -> pd.DataFrame:
    """Per-class target share per split; with a source test set its share is taken as given."""
    frac = pd.Series(_fractions(cfg), index=list(SPLITS))
    totals = counts.sum(axis=1).replace(0, np.nan)
    target = pd.DataFrame({s: frac[s] for s in SPLITS}, index=counts.index)
    if use_source:
        test_share = counts["test"] / totals
        tv = frac["train"] + frac["val"]
        for s in ("train", "val"):
            target[s] = (frac[s] / tv if tv else 0.0) * (1 - test_share)
        target["test"] = test_share
    return target.fillna(0.0)


def _label_view(splits: pd.DataFrame, multi_label: bool) -> pd.DataFrame:
    """The rows class statistics count: as given, or one per (row, label) for label sets."""
    if not multi_label:
        return splits
    parts = _column(splits, "label").map(split_labels)
    return splits.assign(label=parts).explode("label").reset_index(drop=True)


def _split_rows(splits: pd.DataFrame) -> pd.Series:
    """Rows per split (SPLITS order)."""
    return _column(splits, "split").value_counts().reindex(list(SPLITS), fill_value=0).astype(int)


def _counts(splits: pd.DataFrame) -> pd.DataFrame:
    """Rows per class (index) x split (columns, in SPLITS order)."""
    table = pd.crosstab(_column(splits, "label"), _column(splits, "split"))
    return table.reindex(columns=list(SPLITS), fill_value=0).astype(int)


def _deviation(counts: pd.DataFrame, target: pd.DataFrame) -> tuple[float, str, str]:
    """Worst |actual - target| per-class share in percentage points, with its class and split."""
    totals = counts.sum(axis=1).replace(0, np.nan)
    dev = (counts.div(totals, axis=0) - target).abs().fillna(0.0) * 100
    if dev.empty:
        return 0.0, "", ""
    stacked = dev.stack()
    label, split = stacked.idxmax()
    return float(stacked.max()), str(label), str(split)


def _uses_source(splits: pd.DataFrame, cfg: SplitConfig) -> bool:
    """Whether the source's own test set fixed the test split."""
    return bool(cfg.respect_source_split and (_column(splits, "source_split") == "test").any())


def _coverage_warnings(
    splits: pd.DataFrame, cfg: SplitConfig, multi_label: bool = False
) -> list[str]:
    """Classes (labels) missing from a non-empty split (say where they went), large deviations."""
    noun = "label" if multi_label else "class"
    splits = _label_view(splits, multi_label)
    counts = _counts(splits)
    present = [s for s in SPLITS if counts[s].sum() > 0]
    grp = _column(splits, "group")
    lab = _column(splits, "label")
    notes = []
    for label, row in counts.iterrows():
        missing = [s for s in present if row[s] == 0]
        if not missing:
            continue
        groups = grp[lab == label].unique()
        went = ", ".join(f"{s}: {int(row[s])}" for s in SPLITS if row[s] > 0)
        if len(groups) == 1:
            notes.append(
                f"{noun} '{label}' lives in one group ('{groups[0]}', {int(row.sum())} image(s)) "
                f"so it cannot appear in every split; it went to {went} and is missing from "
                f"{', '.join(missing)}"
            )
        else:
            notes.append(
                f"{noun} '{label}' ({len(groups)} groups) is missing from {', '.join(missing)}; "
                f"its images went to {went}"
            )
    worst, label, split = _deviation(counts, _target_shares(counts, cfg, _uses_source(splits, cfg)))
    if worst > DEVIATION_WARN_PP:
        notes.append(
            f"worst per-{noun} share deviation is {worst:.1f} pp ({noun} '{label}' in {split}), "
            f"above {DEVIATION_WARN_PP:g} pp: groups are large relative to that {noun} (finer "
            "groups or more data help; stable: true also keeps an old imbalance)"
        )
    return notes


def near_duplicate_pairs(
    splits: pd.DataFrame, near_pairs: pd.DataFrame
) -> list[tuple[str, str, float]]:
    """Verified near-duplicate pairs (validate's) whose two files sit in different splits."""
    if not len(near_pairs) or "path" not in splits.columns:
        return []
    where = pd.Series(_column(splits, "split").to_numpy(), index=_column(splits, "path"))
    where = where[~where.index.duplicated()]
    sa = where.reindex(near_pairs["path"].astype(str)).to_numpy()
    sb = where.reindex(near_pairs["twin"].astype(str)).to_numpy()
    cross = pd.notna(sa) & pd.notna(sb) & (sa != sb)
    hit = near_pairs[cross]
    return [
        (str(a), str(b), float(s))
        for a, b, s in zip(hit["path"], hit["twin"], hit["similarity"], strict=True)
    ]


def _shared(splits: pd.DataFrame, key: str) -> list[str]:
    """Values of column `key` that occur in more than one split."""
    if key not in splits.columns:
        return []
    values = _column(splits, key)
    keep = values != ""
    n = pd.DataFrame({"k": values[keep], "s": _column(splits, "split")[keep]})
    per = n.drop_duplicates().groupby("k").size()
    return sorted(per[per > 1].index.tolist())


def split_report(
    splits: pd.DataFrame,
    cfg: SplitConfig,
    near_pairs: pd.DataFrame | None = None,
    *,
    multi_label: bool = False,
) -> dict[str, Any]:
    """JSON-able summary: class x split counts, groups, target vs actual shares, leakage checks.

    `near_pairs`: validate's verified near-duplicate pairs; None = that check is skipped.
    `multi_label`: `counts`, `class_shares` and the deviations are per individual label (a row
    counts once for each of its labels); `label_combinations` and `strata` are added. Rows that
    `assign_splits` excluded (`.attrs[EXCLUDED_ATTR]`) are listed under `excluded`.
    """
    _check_frame(splits, "splits", (*_REQUIRED, "split"), "pass what assign_splits returned")
    if multi_label:
        _check_label_sets(splits, "splits")
    counts = _counts(_label_view(splits, multi_label))
    use_source = _uses_source(splits, cfg)
    target = _target_shares(counts, cfg, use_source)
    worst, w_label, w_split = _deviation(counts, target)
    params_target = _target_shares(counts, cfg, use_source=False)
    worst_params, _, _ = _deviation(counts, params_target)
    totals = _split_rows(splits)
    n = int(totals.sum())
    groups = _column(splits, "group")
    split_col = _column(splits, "split")
    frac = dict(zip(SPLITS, _fractions(cfg).tolist(), strict=True))

    shared_groups = _shared(splits, "group")
    shared_sha = _shared(splits, "sha256")
    near_checked = near_pairs is not None
    near = near_duplicate_pairs(splits, near_pairs) if near_pairs is not None else []

    process = list(splits.attrs.get(WARNINGS_ATTR, []))
    derived = _coverage_warnings(splits, cfg, multi_label)
    for w in derived:
        if w not in process:  # assign_splits already logged its own copy
            log.warning("%s", w)
    if not near_checked:
        msg = "near-duplicate check skipped (no verified near-duplicate pairs were given)"
        log.warning("%s", msg)
        derived.append(msg)
    warnings = process + [w for w in derived if w not in process]

    report: dict[str, Any] = {
        "rows": n,
        "groups": int(groups.nunique()),
        "classes": len(counts),
        "params": {**frac, "stable": cfg.stable, "respect_source_split": cfg.respect_source_split},
        "target_basis": "source_test_fixed" if use_source else "params",
        "splits": {
            s: {
                "rows": int(totals[s]),
                "groups": int(groups[split_col == s].nunique()),
                "share": round(float(totals[s]) / n, 6) if n else 0.0,
                "target_share": frac[s],
            }
            for s in SPLITS
        },
        "groups_per_split": {s: int(groups[split_col == s].nunique()) for s in SPLITS},
        "counts": {
            str(label): {s: int(row[s]) for s in SPLITS} for label, row in counts.iterrows()
        },
        "class_shares": {
            str(label): {
                s: {
                    "actual": round(float(row[s]) / max(int(row.sum()), 1), 6),
                    "target": round(float(target.loc[label, s]), 6),
                }
                for s in SPLITS
            }
            for label, row in counts.iterrows()
        },
        "worst_deviation_pp": round(worst, 3),
        "worst_deviation_at": {"label": w_label, "split": w_split},
        "worst_deviation_vs_params_pp": round(worst_params, 3),
        # class x split cells left empty although that split holds other classes
        "missing_class_splits": int(((counts == 0) & (totals > 0)).to_numpy().sum()),
        "leakage": {
            "no_shared_group": not shared_groups,
            "no_shared_sha256": not shared_sha,
            "no_near_duplicate": (not near) if near_checked else None,
            "shared_groups": len(shared_groups),
            "shared_sha256": len(shared_sha),
            "near_duplicate_pairs": len(near),
            "examples": {
                "groups": shared_groups[:_MAX_EXAMPLES],
                "sha256": shared_sha[:_MAX_EXAMPLES],
                "near_duplicates": [list(p) for p in near[:_MAX_EXAMPLES]],
            },
        },
        "warning_count": len(warnings),
        "warnings": warnings,
        "excluded": _excluded_report(splits.attrs.get(EXCLUDED_ATTR)),
    }
    if multi_label:
        report.update(_multi_label_report(splits, cfg))
    return report


def _excluded_report(excluded: pd.DataFrame | None) -> dict[str, Any]:
    """Rows kept out of every split because they would leak into the delivered test set."""
    if excluded is None or not len(excluded):
        return {"rows": 0, "by_reason": {}, "by_label": {}, "rows_listed": []}
    table = excluded.sort_values(["reason", "path"])
    listed = [
        {
            k: (None if isinstance(v, float) and np.isnan(v) else v)
            for k, v in zip(EXCLUDED_COLUMNS, row, strict=True)
        }
        for row in table[list(EXCLUDED_COLUMNS)].head(MAX_REPORTED_EXCLUDED).itertuples(index=False)
    ]
    return {
        "rows": len(excluded),
        "by_reason": {str(k): int(v) for k, v in excluded["reason"].value_counts().items()},
        "by_label": {str(k): int(v) for k, v in excluded["label"].value_counts().items()},
        "rows_listed": listed,
    }


def render_split_markdown(report: dict[str, Any], figure: str | None = None) -> str:
    """The human split report: rows per class and split, leakage, excluded rows with twins."""
    lines = ["# Split", ""]
    sp = report["splits"]
    lines.append(
        ", ".join(f"{s}: {sp[s]['rows']} rows in {sp[s]['groups']} groups" for s in SPLITS)
        + f"; worst per-class share deviation {report['worst_deviation_pp']:.2f} pp."
    )
    lines += ["", "| class | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for label, row in report["counts"].items():
        lines.append(f"| {label} | " + " | ".join(str(row[s]) for s in SPLITS) + " |")
    leak = report["leakage"]
    near = leak["no_near_duplicate"]
    lines += [
        "",
        "## Leakage checks",
        "",
        f"- groups in two splits: {leak['shared_groups']}",
        f"- byte-identical files in two splits: {leak['shared_sha256']}",
        "- verified near-duplicate pairs in two splits: "
        + ("not checked" if near is None else str(leak["near_duplicate_pairs"])),
    ]
    ex = report.get("excluded") or {"rows": 0}
    if ex["rows"]:
        lines += [
            "",
            f"## Kept out of train and val ({ex['rows']} rows)",
            "",
            "The test split is exactly the delivered test set. These rows were not delivered as "
            "test but duplicate (or share a group with) a delivered test image, so training on "
            "them would leak the test set; they are in no split.",
            "",
            "| path | label | test twin | twin's label | why | similarity |",
            "|---|---|---|---|---|---|",
        ]
        for r in ex["rows_listed"][:MAX_MARKDOWN_EXCLUDED]:
            simil = "" if r["similarity"] is None else f"{r['similarity']:.4f}"
            lines.append(
                f"| {r['path']} | {r['label']} | {r['twin']} | {r['twin_label']} | "
                f"{r['reason']} | {simil} |"
            )
        if ex["rows"] > MAX_MARKDOWN_EXCLUDED:
            lines.append(f"\n…and {ex['rows'] - MAX_MARKDOWN_EXCLUDED} more (reports/split.json).")
        if figure:
            lines += ["", f"![each excluded row beside its test twin]({figure})"]
    if report["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def excluded_strips(report: dict[str, Any], limit: int = 24) -> list[tuple[str, list[str]]]:
    """(caption, [row, twin]) per excluded row, for the thumbnail sheet."""
    return [
        (
            f"{r['label']} vs test {r['twin_label']}: {r['reason'].split(' of ')[0]}",
            [r["path"], r["twin"]],
        )
        for r in (report.get("excluded") or {}).get("rows_listed", [])[:limit]
    ]


def _multi_label_report(splits: pd.DataFrame, cfg: SplitConfig) -> dict[str, Any]:
    """Multi-label extras: rows per label combination x split, and how combinations were pooled."""
    combos = _column(splits, "label").map(lambda x: join_labels(split_labels(x)))
    table = pd.crosstab(combos, _column(splits, "split"))
    table = table.reindex(columns=list(SPLITS), fill_value=0).astype(int)
    table = table.loc[sorted(table.index, key=lambda c: (-int(table.loc[c].sum()), c))]
    comp = _components(splits)[0]
    strata = multi_label_strata(_column(splits, "label"), comp, stratum_min_groups(_fractions(cfg)))
    return {
        "multi_label": True,
        "label_combinations": {
            str(c): {s: int(row[s]) for s in SPLITS}
            for c, row in table.head(MAX_REPORTED_COMBINATIONS).iterrows()
        },
        "label_combinations_truncated": max(0, len(table) - MAX_REPORTED_COMBINATIONS),
        "strata": {
            "min_groups": strata.min_groups,
            "combinations": len(strata.groups),
            "stratified": sum(st.startswith("combination:") for st in strata.stratum.values()),
            "pooled_by_rarest_label": strata.pooled,
        },
    }
