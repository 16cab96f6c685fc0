"""The pHash pair search: exact on ordinary inputs, bounded (with a warning) on crowded ones."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from imgcls.data.phash import MAX_BUCKET, search_close_pairs


def brute(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Every pair (i < j) within `threshold` bits, by comparing each hash with all later ones."""
    out: set[tuple[int, int]] = set()
    for i in range(hashes.size - 1):
        d = np.bitwise_count(hashes[i] ^ hashes[i + 1 :])
        out.update((i, int(j) + i + 1) for j in np.flatnonzero(d <= threshold))
    return out


def flip_bits(rng: np.random.Generator, hashes: np.ndarray, k: int) -> np.ndarray:
    """Each hash with `k` random bits flipped (a bit may be picked twice: at most k differ)."""
    out = hashes.copy()
    for _ in range(k):
        out ^= np.uint64(1) << rng.integers(0, 64, out.size).astype(np.uint64)
    return out


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` uniformly random 64-bit hashes."""
    return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


@pytest.mark.parametrize("threshold", [1, 2, 4, 6, 8])
def test_search_matches_brute_force_on_clustered_and_random_hashes(threshold: int) -> None:
    rng = np.random.default_rng(threshold)
    # 6,000 hashes: above the all-pairs cut-off, so the band index itself answers
    protos = random_hashes(rng, 40)
    clustered = flip_bits(rng, protos[rng.integers(0, 40, 3000)], 4)
    uniq = np.unique(np.concatenate([clustered, random_hashes(rng, 3000)]))
    pairs, stats = search_close_pairs(uniq, threshold)
    assert stats.keys > 0 and stats.skipped == 0  # the index ran, with nothing left out
    assert {tuple(p) for p in pairs.tolist()} == brute(uniq, threshold)
    assert (pairs[:, 0] < pairs[:, 1]).all()


def test_crowded_hashes_finish_in_bounded_work_and_still_find_close_pairs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """50,000 distinct hashes within 4 bits of one prototype share every band; the old search
    fell back to all 1.25e9 pairs. Isolated close pairs elsewhere must all still be found."""
    rng = np.random.default_rng(7)
    proto = np.full(60_000, 0x5A5A_F00F_3C3C_0FF0, dtype=np.uint64)
    crowd = np.unique(flip_bits(rng, proto, 4))[:50_000]
    assert crowd.size == 50_000
    base = random_hashes(rng, 200)
    twins = flip_bits(rng, base, 2)
    uniq = np.unique(np.concatenate([crowd, base, twins]))
    threshold = 4
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="imgcls.phash"):
        pairs, stats = search_close_pairs(uniq, threshold)
    elapsed = time.perf_counter() - start
    # linear work: each hash meets at most MAX_BUCKET others per key (a few keys)
    assert stats.compared <= uniq.size * MAX_BUCKET * stats.keys
    assert stats.keys <= 10 and stats.skipped > 0
    assert elapsed < 60  # ~2 s on one idle core; generous for a shared CI machine
    # nothing found is wrong, and many true pairs in the crowd are found
    d = np.bitwise_count(uniq[pairs[:, 0]] ^ uniq[pairs[:, 1]])
    assert (d <= threshold).all()
    assert len(pairs) > uniq.size * 10
    # every isolated planted pair is found: the window only limits the crowded bucket
    a, b = np.searchsorted(uniq, base), np.searchsorted(uniq, twins)
    a, b = np.minimum(a, b)[a != b], np.maximum(a, b)[a != b]
    found = pairs[:, 0] * uniq.size + pairs[:, 1]
    assert np.isin(a * uniq.size + b, found).all()
    # the warning names how much was left out and the setting that controls it
    text = caplog.text
    assert f"{stats.crowded} of {uniq.size}" in text
    assert f"{stats.skipped} comparisons skipped" in text and "MAX_BUCKET" in text


def test_a_wider_window_finds_more_in_a_crowd() -> None:
    rng = np.random.default_rng(3)
    proto = np.full(4000, 0x0123_4567_89AB_CDEF, dtype=np.uint64)
    uniq = np.unique(flip_bits(rng, proto, 3))
    narrow, s1 = search_close_pairs(uniq, 3, max_bucket=16)
    wide, s2 = search_close_pairs(uniq, 3, max_bucket=4096)
    assert s1.skipped > 0 and s2.skipped == 0
    assert {tuple(p) for p in narrow.tolist()} < {tuple(p) for p in wide.tolist()}
    assert {tuple(p) for p in wide.tolist()} == brute(uniq, 3)


def test_small_dense_inputs_are_searched_exactly_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(5)
    uniq = np.unique(flip_bits(rng, np.full(2000, 0xFFFF_0000_FFFF_0000, dtype=np.uint64), 2))
    with caplog.at_level(logging.WARNING, logger="imgcls.phash"):
        pairs, stats = search_close_pairs(uniq, 3)
    assert stats.skipped == 0 and not caplog.records
    assert {tuple(p) for p in pairs.tolist()} == brute(uniq, 3)


@pytest.mark.parametrize("threshold", [0, 64])
def test_edge_thresholds(threshold: int) -> None:
    rng = np.random.default_rng(0)
    uniq = np.unique(random_hashes(rng, 50))
    pairs, _ = search_close_pairs(uniq, threshold)
    assert {tuple(p) for p in pairs.tolist()} == brute(uniq, threshold)
