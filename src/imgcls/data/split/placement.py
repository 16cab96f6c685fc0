"""Placing free groups into splits: greedy, water-filling, repair and local search.

All of it works on a (groups x classes) share matrix; shares are fractions of a class's rows
(the derivations are in docs/split.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from imgcls.data.split.common import SPLITS, TRAIN


@dataclass
class Placement:
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


def water_fill(deficit: np.ndarray, total: int) -> np.ndarray:
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


def greedy(state: Placement, order: np.ndarray, left: np.ndarray) -> None:
    """Place groups in `order`, each into the eligible split that best closes its classes' gaps.

    `left` counts, per class, the free groups not placed yet (singletons included): when a class
    has no more groups left than splits it is still missing from, covering those splits comes
    before balance, so that every class reaches every split whenever it has enough groups.
    """
    indptr, indices, data = state.weights.indptr, state.weights.indices, state.weights.data
    elig = state.eligible
    rows = elig[:, None]  # broadcasts against each group's classes: np.ix_ per call cost 3x more
    for g in order:
        idx, w = indices[indptr[g] : indptr[g + 1]], data[indptr[g] : indptr[g + 1]]
        # d/dx of sum((share - target)^2): the split most below target for these classes wins.
        score = (state.shares[rows, idx] - state.target[rows, idx]) @ w
        absent = state.holders[rows, idx] == 0  # (eligible, classes of g)
        urgent = absent.any(axis=0) & (left[idx] <= absent.sum(axis=0)) & state.cover[idx]
        if urgent.any():
            need = absent[:, urgent].sum(axis=1)
            score = np.where(need == need.max(), score, np.inf)
        state.put(g, int(elig[int(np.argmin(score))]))
        left[idx] -= 1


def fill_singletons(state: Placement, singles: np.ndarray, n_per_class: np.ndarray) -> None:
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
        x = cover + water_fill(deficit - cover, len(members) - int(cover.sum()))
        start = 0
        for s, n in zip(elig, x, strict=True):
            state.assign[members[start : start + n]] = s
            state.shares[s, c] += n / n_per_class[c]
            state.holders[s, c] += n
            start += n


def _objective_gain(state: Placement, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (group, split): change of sum((share - target)^2) if the group moved there."""
    w = state.weights[groups]
    dev = state.shares - state.target  # (splits, classes)
    pull = np.asarray(w @ dev.T)  # (groups, splits): w . dev[s]
    here = pull[np.arange(len(groups)), state.assign[groups]]
    sq = np.asarray(w.multiply(w).sum(axis=1)).ravel()
    return 2 * (pull - here[:, None]) + 2 * sq[:, None], pull


def _pinned_by_coverage(state: Placement, groups: np.ndarray) -> np.ndarray:
    """Groups whose move would remove a class (or the last group) from their split."""
    alone = ((state.holders == 1) & state.cover).astype(float)  # (splits, classes)
    hit = np.asarray((state.weights[groups] > 0).astype(float) @ alone.T)  # (groups, splits)
    return hit[np.arange(len(groups)), state.assign[groups]] > 0


def improve(state: Placement, groups: np.ndarray, max_steps: int, swap_limit: int) -> int:
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


def _best_swap(state: Placement, groups: np.ndarray, pull: np.ndarray) -> bool:
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


def repair_empty(
    state: Placement, positive: np.ndarray, free: np.ndarray, size: np.ndarray, keys: np.ndarray
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


def cover_train(state: Placement, free: np.ndarray, size: np.ndarray, keys: np.ndarray) -> int:
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
    state: Placement,
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


def new_placement(
    gc: csr_matrix,
    assign: np.ndarray,
    eligible: np.ndarray,
    frac: np.ndarray,
    cover: np.ndarray | None = None,
) -> Placement:
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
    return Placement(weights, eligible, target, shares, holders, assign, cover)
