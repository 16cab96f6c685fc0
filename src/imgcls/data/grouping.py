"""Group merging, the one rule validate and split share: rows linked by the same group, the same
bytes (sha256) or one near-duplicate cluster are one group, named after its lexicographically
smallest original group.

Validate merges exact duplicates and near-duplicate clusters into `valid.csv`'s `group`; split
merges exact duplicates again (a safety net for a `valid.csv` written by other means) and numbers
the merged groups.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from imgcls.data.phash import same_value_pairs


def star_edges(centre: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """(k, 2) edges from each near-duplicate cluster's centre to its members (-1 = no cluster).

    A star, never the verified pairs themselves: those may chain, the clusters cannot.
    """
    member = np.flatnonzero(cluster >= 0)
    return np.stack([centre[cluster[member]], member], axis=1)


def components(
    n: int, link_codes: Iterable[np.ndarray], edges: np.ndarray | None = None
) -> np.ndarray:
    """Component id per row: rows sharing a code >= 0 in any `link_codes`, or an edge, are one."""
    parts = [] if edges is None else [edges]
    for codes in link_codes:
        known = np.flatnonzero(codes >= 0)  # -1 (a null key) links nothing
        if known.size:
            parts.append(known[same_value_pairs(codes[known])])
    e = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)
    if not e.size:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def smallest_name(names: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Per row: the lexicographically smallest of `names` within its component."""
    return pd.Series(names).groupby(comp).transform("min").to_numpy()


def merge_duplicates(
    images: pd.DataFrame, centre: np.ndarray | None = None, cluster: np.ndarray | None = None
) -> np.ndarray:
    """Validate's merged group per image row: same group, same sha256 or one near-dup cluster.

    `images` holds `path`, `group` and `sha256` with nulls for unknown values; a row without a
    group is its own group, named by its path. `centre` / `cluster`: the near-duplicate clusters
    (:class:`imgcls.data.near_duplicates.NearDuplicates`); None = exact duplicates only.
    """
    edges = None if cluster is None or centre is None else star_edges(centre, cluster)
    links = [pd.factorize(images[col])[0] for col in ("group", "sha256")]
    comp = components(len(images), links, edges)
    names = images["group"].fillna(images["path"]).astype(str).to_numpy()
    return smallest_name(names, comp)


def merge_exact(groups: np.ndarray, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Split's view: (component per row, component names sorted, number of groups merged away).

    `groups` and `sha256` are stripped strings ("" sha256 = unknown, links nothing). Components
    are numbered in the order of their names, each the smallest group it holds (as validate's).
    """
    # factorize: a hash table, not np.unique's Python-level sort of object strings (4x at 1M)
    group_codes, group_names = pd.factorize(groups, sort=True)
    sha_codes = pd.factorize(pd.Series(sha256).mask(pd.Series(sha256) == ""))[0]
    merged_names = smallest_name(groups, components(len(groups), [group_codes, sha_codes]))
    comp, names = pd.factorize(merged_names, sort=True)
    return comp, names, len(group_names) - len(names)
