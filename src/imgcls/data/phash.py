"""Perceptual-hash search: pairs of distinct 64-bit pHashes within a Hamming distance, bounded work.

The candidate stage of :mod:`imgcls.data.near_duplicates`. Multi-index hashing: exact-match
buckets over keys made of bands of the hash. The number of bands adapts to the data (finer keys
when buckets are crowded), and a bucket that stays crowded is searched in a window of
`max_bucket` neighbours per hash, with a warning naming what was skipped. The work is at most
linear in the number of hashes times the window on any input: never all pairs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

log = logging.getLogger("imgcls.phash")

PHASH_RE = r"^[0-9a-f]{16}$"
# A hash is compared with at most this many others sharing one key (a window over the bucket,
# in hash order). Bounds the search at about 5 x MAX_BUCKET comparisons per hash.
MAX_BUCKET = 64
SAMPLE = 20_000  # hashes drawn to estimate each plan's candidate count
MAX_KEYS = 80  # most exact-match keys (sort passes) a plan may use
# Up to this many hashes, all pairs (blocked XOR + popcount): exact whatever the input, in a
# bounded ~0.1 s; a dense cluster of a few thousand hashes needs no window.
BRUTE_MAX = 3000
# A plan is run exactly (window EXACT_FACTOR x max_bucket, a safety net for crowds the sample
# missed) when its estimated work is below EXACT_FACTOR x max_bucket comparisons per hash
# (1M random hashes: ~20; tight clusters of 75 near-identical images: ~500 at threshold 10).
# Above that the input is a crowd, and the window is max_bucket.
EXACT_FACTOR = 8
# Relative costs, measured on numpy 2 / one core (~100 ns each): one key costs a sort of all
# hashes, one candidate a gather + XOR + popcount; the plan with the lowest sum wins.
COST_PER_KEY_HASH = 1.0
COST_PER_CANDIDATE = 1.0


@dataclass(frozen=True)
class SearchStats:
    """What one search did: its plan, candidates compared, and comparisons the window skipped."""

    bands: int  # the 64 bits were cut into this many bands
    per_key: int  # bands that make one key (pigeonhole: two close hashes agree on that many)
    keys: int  # exact-match keys searched (sort passes)
    compared: int  # candidate comparisons made
    skipped: int  # comparisons left out in crowded buckets (0: the result is exact)
    crowded: int  # hashes that sat in a bucket larger than the window


def parse_phashes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Parse 16-hex-char pHashes into uint64; returns (hashes of well-formed rows, their mask)."""
    s = values.astype("string")
    ok = s.str.fullmatch(PHASH_RE).fillna(False).to_numpy(dtype=bool)
    good = s[ok].str.cat()
    # big-endian so the first hex char is the most significant nibble, like int(h, 16)
    hashes = np.frombuffer(bytes.fromhex(good or ""), dtype=">u8").astype(np.uint64)
    return hashes, ok


def same_value_pairs(codes: np.ndarray) -> np.ndarray:
    """Pairs linking each index to the first index with the same code (a spanning star)."""
    values, first = np.unique(codes, return_index=True)
    leader = first[np.searchsorted(values, codes)]
    idx = np.arange(codes.size)
    keep = leader != idx
    return np.stack([leader[keep], idx[keep]], axis=1)


def close_hash_pairs(uniq: np.ndarray, threshold: int, max_bucket: int = MAX_BUCKET) -> np.ndarray:
    """Pairs (i < j) of distinct hashes within `threshold` bits; exact unless buckets crowd.

    See :func:`search_close_pairs` for the method and the bound.
    """
    return search_close_pairs(uniq, threshold, max_bucket)[0]


def search_close_pairs(
    uniq: np.ndarray, threshold: int, max_bucket: int = MAX_BUCKET
) -> tuple[np.ndarray, SearchStats]:
    """Pairs (i < j) of distinct hashes within `threshold` bits, and what the search did.

    Pigeonhole: cut the 64 bits into `threshold + k` disjoint bands; two hashes within
    `threshold` bits differ in at most `threshold` bands, so they agree exactly on at least `k`
    of them, hence on one of the C(threshold + k, k) keys made of k bands. k = 1 is the classic
    multi-index hash; a larger k makes longer keys and smaller buckets at the price of more
    sort passes. The k with the lowest estimated cost (sort passes + candidates, counted on a
    sample) is used. A bucket still larger than `max_bucket` (many near-identical hashes: blank
    or low-texture images) is searched in a window: each hash meets its `max_bucket` next
    hashes in that bucket, and the skipped comparisons are counted and logged as a warning.
    """
    uniq = np.asarray(uniq, dtype=np.uint64)
    n = uniq.size
    if n < 2 or threshold < 0:
        return np.empty((0, 2), dtype=np.int64), SearchStats(0, 0, 0, 0, 0, 0)
    if n <= BRUTE_MAX:
        all_pairs = n * (n - 1) // 2
        return _brute_force_pairs(uniq, threshold), SearchStats(0, 0, 0, all_pairs, 0, 0)
    bands, per_key, masks, exact = _plan(uniq, threshold, max_bucket)
    window = max_bucket * EXACT_FACTOR if exact else max_bucket
    found: list[np.ndarray] = []
    compared = skipped = 0
    crowded = np.zeros(n, dtype=bool)
    for mask in masks:
        pairs, c, s = _close_in_buckets(uniq, mask, threshold, window, crowded)
        found.append(pairs)
        compared += c
        skipped += s
    out = unique_pairs(np.concatenate(found), n)
    stats = SearchStats(bands, per_key, len(masks), compared, skipped, int(crowded.sum()))
    if skipped:
        log.warning(
            "near-duplicate search: %d of %d distinct pHashes sit in crowded buckets (more than "
            "%d hashes agree on a %d-of-%d band key: many near-identical images); each was "
            "compared with its %d next hashes there only, %d comparisons skipped, so some close "
            "pairs may be missed. Raise `max_bucket` (imgcls.data.phash.MAX_BUCKET, now %d) to "
            "search further, at proportional cost.",
            stats.crowded,
            n,
            window,
            per_key,
            bands,
            window,
            skipped,
            max_bucket,
        )
    return out, stats


def _plan(uniq: np.ndarray, threshold: int, window: int) -> tuple[int, int, list[np.uint64], bool]:
    """(bands, bands per key, key masks, exact?) of the cheapest pigeonhole plan for these hashes.

    Exactness first: the cheapest plan without a window, if its estimated work is within
    EXACT_FACTOR x window comparisons per hash; otherwise (a crowd no key length splits) the
    plan cheapest with the window applied.
    """
    n = uniq.size
    if threshold >= 64:  # every pair is within 64 bits: one key (mask 0) holds all hashes
        return 1, 0, [np.uint64(0)], False
    rng = np.random.default_rng(0)  # a fixed sample: the same input always gets the same plan
    sample = uniq if n <= SAMPLE else uniq[rng.choice(n, SAMPLE, replace=False)]
    grow = n / sample.size  # a bucket of c sampled hashes stands for about c * grow hashes
    exact: list[tuple[float, int, float]] = []
    capped: list[tuple[float, int]] = []
    plans: list[tuple[int, int, list[np.uint64]]] = []
    for per_key in range(1, 64 - threshold + 1):
        bands = threshold + per_key
        if math.comb(bands, per_key) > MAX_KEYS:
            break
        masks = _key_masks(bands, per_key)
        full, windowed = np.sum([_comparisons(sample & m, grow, window) for m in masks], axis=0)
        sorts = len(masks) * n * COST_PER_KEY_HASH
        exact.append((sorts + full * COST_PER_CANDIDATE, len(plans), full))
        capped.append((sorts + windowed * COST_PER_CANDIDATE, len(plans)))
        plans.append((bands, per_key, masks))
    _, pick, full = min(exact)  # per_key = 1 always fits: threshold + 1 <= 64 bands, 1 key each
    if full <= EXACT_FACTOR * window * n:
        return (*plans[pick], True)
    return (*plans[min(capped)[1]], False)


def _key_masks(bands: int, per_key: int) -> list[np.uint64]:
    """Bit masks of every key made of `per_key` of `bands` interleaved bands.

    Any partition of the bits keeps the pigeonhole argument; interleaving (band b takes bits
    b, b + bands, ...) mixes low- and high-frequency DCT bits in every band, whose values are far
    less skewed than contiguous runs of bits: 4x fewer candidates on Fashion-MNIST.
    """
    band = [sum(1 << bit for bit in range(b, 64, bands)) for b in range(bands)]
    return [np.uint64(sum(band[b] for b in combo)) for combo in combinations(range(bands), per_key)]


def _comparisons(keys: np.ndarray, grow: float, window: int) -> tuple[float, float]:
    """Estimated comparisons for one key: all pairs per bucket, and with the window applied."""
    counts = run_lengths(np.sort(keys))
    size = counts[counts > 1] * grow
    pairs = size * (size - 1) / 2
    return float(pairs.sum()), float(np.minimum(pairs, size * window).sum())


def _close_in_buckets(
    uniq: np.ndarray, mask: np.uint64, threshold: int, window: int, crowded: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """Close pairs among hashes sharing `uniq & mask`: (pairs, compared, skipped).

    Sorted by key, bucket members are adjacent: step s compares every position with the one s
    further on while both share a key, so a bucket of c hashes costs min(c, window) steps.
    """
    keys = uniq & mask
    order = np.argsort(keys)
    sk = keys[order]
    same = sk[:-1] == sk[1:]
    counts = run_lengths(sk)  # bucket sizes, in sorted order
    big = counts > window + 1
    if big.any():
        # stable sort of the sorted hashes: a crowded bucket's window holds its nearest values
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for s, c in zip(starts[big], counts[big], strict=True):
            crowded[order[s : s + c]] = True
    sh = uniq[order]
    active = np.flatnonzero(same)
    found: list[np.ndarray] = []
    compared = 0
    step = 1
    while active.size and step <= window:
        compared += active.size
        hit = np.bitwise_count(sh[active] ^ sh[active + step]) <= threshold
        found.append(np.stack([order[active[hit]], order[active[hit] + step]], axis=1))
        step += 1
        # sorted keys: if i matches i + step it matched every position in between too
        active = active[active + step < sk.size]
        active = active[sk[active] == sk[active + step]]
    c = counts[big].astype(np.int64)
    full = int((c * (c - 1) // 2).sum())
    done = int((c * window - window * (window + 1) // 2).sum())  # steps 1..window in each
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return pairs, compared, full - done


def unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Each pair of indices below `n` once, as (i < j), sorted (a pair may be listed twice)."""
    if not len(pairs):
        return np.empty((0, 2), dtype=np.int64)
    lo = np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    hi = np.maximum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
    code = sorted_unique(lo * n + hi)  # n <= 2**31 hashes fit: no overflow
    return np.stack([code // n, code % n], axis=1)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2.3's hash-based unique is 10x slower on many int64 codes)."""
    v = np.sort(values)
    return v[np.concatenate([[True], v[1:] != v[:-1]])] if v.size else v


def run_lengths(sorted_values: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in a sorted array."""
    if not sorted_values.size:
        return np.empty(0, dtype=np.int64)
    edge = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.diff(np.concatenate([[0], edge, [sorted_values.size]]))


def _brute_force_pairs(uniq: np.ndarray, threshold: int, block: int = 256) -> np.ndarray:
    """All pairs within `threshold` bits by XOR + popcount in blocks (upper triangle only)."""
    found = [np.empty((0, 2), dtype=np.int64)]
    for start in range(0, uniq.size, block):
        rows = uniq[start : start + block]
        dist = np.bitwise_count(rows[:, None] ^ uniq[None, start:])  # (block, n - start)
        i, j = np.nonzero(dist <= threshold)
        keep = j > i  # upper triangle: each pair once, no self-pairs
        found.append(np.stack([start + i[keep], start + j[keep]], axis=1))
    return unique_pairs(np.concatenate(found), uniq.size)
