"""Multi-label strata: label combinations with enough groups, rare ones pooled, plus labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix, csr_matrix

from imgcls.task import join_labels, split_labels


@dataclass(frozen=True)
class Strata:
    """How multi-label rows are stratified: one stratum per label combination, rare ones pooled."""

    min_groups: int  # a combination with at least this many groups is its own stratum
    groups: dict[str, int]  # combination -> number of groups holding it
    stratum: dict[str, str]  # combination -> stratum ("combination:<set>" or "rare:<label>")
    pooled: dict[str, list[str]]  # rarest label -> the rare combinations pooled under it


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


def multi_label_columns(
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
