"""Near-duplicate clusters that cannot chain: pHash candidates, verified on pixels, bounded radius.

Three steps (rationale and measured quality in docs/split.md and bench/RESULTS.md):

1. **Candidates.** Files are collapsed to one representative per sha256 (byte-identical copies are
   exact duplicates, grouped elsewhere); pairs of representatives whose 64-bit pHashes are within
   `threshold` bits are candidates (:mod:`imgcls.data.phash`: multi-index hashing, exact on
   ordinary data, a counted and logged window on crowds, never all pairs). Only the files of
   candidate pairs are opened in step 2.
2. **Verification.** pHash collides for different objects on tiny or low-texture images (28-px
   glyphs, flat backgrounds), so each candidate pair is checked on the images themselves: both
   are reduced to a 16x16 grayscale thumbnail (antialiased bilinear), normalised to zero mean
   and unit variance (so brightness and contrast changes do not matter), and their Pearson
   correlation must reach `min_similarity`. Re-encoded and resized copies score above 0.997;
   different garments of one silhouette mostly below. Images of one size must also agree in
   detail: on 32x32 normalised thumbnails, no 4x4-pixel block may differ by more than
   `max_detail_difference` on average (a different print on the same shirt fails here, a JPEG
   re-encode does not). Resized copies skip this gate (resampling blurs detail by itself), and
   so do images under 16 px a side (there is no detail to compare, only JPEG's blocks).
3. **Bounded clusters.** Verified pairs are *not* closed transitively (that chained 11,147
   Fashion-MNIST images into one group). Each cluster has a centre, and every member is a
   verified near-duplicate *of the centre*: centres are picked greedily, most verified
   neighbours first. The correlation distance sqrt(2 (1 - r)) is a metric, so two members of a
   cluster are at most twice the radius apart. A verified pair whose files end up in different
   clusters is kept in :attr:`NearDuplicates.pairs`, so the split can still keep it out of
   train when one side is a delivered test image.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from imgcls.data.imageinfo import (
    DEFAULT_MAX_PIXELS,
    open_image,
    to_gray,
)
from imgcls.data.phash import MAX_BUCKET, parse_phashes, search_close_pairs, unique_pairs

log = logging.getLogger("imgcls.near_duplicates")

THUMB = 16  # thumbnail side for verification: detail enough for 28-px glyphs, blind to noise
DETAIL = 32  # side of the detail thumbnail (same-size pairs)
BLOCK = 4  # detail block side: 8 x 8 blocks of 4 x 4 pixels
DETAIL_MIN_SIDE = 16  # images smaller than this (both sides) skip the detail gate
DEFAULT_MIN_SIMILARITY = 0.997  # measured: bench/bench_near_duplicates.py, bench/RESULTS.md
DEFAULT_MAX_DETAIL_DIFFERENCE = 0.15  # same; in standard deviations of the image
FLAT_STD = 1.0  # gray levels: a thumbnail this flat has no structure to correlate
FLAT_MEAN_TOLERANCE = 8.0  # gray levels: two flat images are duplicates if this close
BUCKET_ALL_PAIRS = 64  # identical-hash buckets up to this size are compared pairwise
PARALLEL_MIN = 4000  # thumbnails to load before worker processes pay off
PAIR_CHUNK = 8192  # pairs scored at once: bounds the float64 temporaries (~70 MB at 32x32)


@dataclass
class NearDuplicates:
    """Verified near-duplicate pairs and the bounded clusters built from them (row positions)."""

    pairs: np.ndarray  # (P, 2) verified pairs of row positions, i < j
    similarity: np.ndarray  # (P,) thumbnail correlation of each verified pair
    detail: np.ndarray  # (P,) largest block difference (NaN: sizes differ, not checked)
    hamming: np.ndarray  # (P,) pHash distance of each verified pair
    cluster: np.ndarray  # (n,) cluster id per row, -1 = in no cluster (copies of a rep included)
    centre: np.ndarray  # (clusters,) row position of each cluster's centre
    candidates: int  # candidate pairs the pHash index proposed
    unverifiable: int  # candidate pairs whose images could not be read (left unmerged)
    skipped: int = 0  # hash comparisons the crowded-bucket window left out (0: search exact)

    @property
    def cut(self) -> int:
        """Verified pairs whose rows are not in one cluster (the radius bound cut the chain)."""
        if not len(self.pairs):
            return 0
        a, b = self.cluster[self.pairs[:, 0]], self.cluster[self.pairs[:, 1]]
        return int(((a != b) | (a < 0)).sum())

    def pair_table(self, paths: np.ndarray) -> pd.DataFrame:
        """Verified pairs as `path,twin,similarity,detail,hamming,same_cluster` rows, sorted."""
        a, b = paths[self.pairs[:, 0]], paths[self.pairs[:, 1]]
        first = np.where(a <= b, a, b) if len(a) else a
        second = np.where(a <= b, b, a) if len(a) else b
        same = self.cluster[self.pairs[:, 0]] == self.cluster[self.pairs[:, 1]]
        table = pd.DataFrame(
            {
                "path": first.astype(str),
                "twin": second.astype(str),
                "similarity": np.round(self.similarity, 5),
                "detail": np.round(self.detail, 4),
                "hamming": self.hamming.astype(int),
                "same_cluster": same & (self.cluster[self.pairs[:, 0]] >= 0),
            }
        )
        return table.sort_values(["path", "twin"]).reset_index(drop=True)


def empty_result(n: int) -> NearDuplicates:
    """No pairs, no clusters (search off, or nothing to compare)."""
    return NearDuplicates(
        np.empty((0, 2), dtype=np.int64),
        np.empty(0),
        np.empty(0),
        np.empty(0, dtype=np.int64),
        np.full(n, -1, dtype=np.int64),
        np.empty(0, dtype=np.int64),
        0,
        0,
    )


def find_near_duplicates(
    paths: pd.Series,
    sha256: pd.Series,
    phash: pd.Series,
    threshold: int,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    root: Path | str = ".",
    sizes: np.ndarray | None = None,
    max_detail_difference: float = DEFAULT_MAX_DETAIL_DIFFERENCE,
    workers: int = 0,
    max_bucket: int = MAX_BUCKET,
) -> NearDuplicates:
    """Candidate pairs by pHash, verified on thumbnails, clustered around centres (module doc).

    `sizes`: (n, 2) width, height per row; pairs of one size also pass the detail gate.
    `max_bucket`: the pHash search's window in crowded buckets (:mod:`imgcls.data.phash`).
    Only the images of candidate pairs are opened, so the cost follows the candidates, not n.
    """
    n = len(paths)
    if threshold < 0 or n < 2:
        return empty_result(n)
    hashes, ok = parse_phashes(phash.reset_index(drop=True))
    pos = np.flatnonzero(ok)
    # one representative per file content: copies with the same bytes follow it
    sha = pd.Series(sha256.to_numpy()[pos]).fillna("").astype(str)
    sha = sha.mask(sha == "", pd.Series(pos.astype(str)))  # no digest: its own content
    codes = pd.factorize(sha)[0]
    first = pd.Series(np.arange(len(codes))).groupby(codes).min().to_numpy()
    rep_pos, rep_hash = pos[first], hashes[first]
    cand, skipped = _candidates(rep_hash, threshold, max_bucket)
    result = empty_result(n)
    result.candidates = len(cand)
    result.skipped = skipped
    if not len(cand):
        return result
    rows = rep_pos[cand]  # (C, 2) row positions
    involved = np.unique(rows)
    coarse, fine, good = load_thumbnails([str(paths.iloc[i]) for i in involved], root, workers)
    slot = np.full(n, -1, dtype=np.int64)
    slot[involved] = np.arange(len(involved))
    sa, sb = slot[rows[:, 0]], slot[rows[:, 1]]
    readable = good[sa] & good[sb]
    result.unverifiable = int((~readable).sum())
    sim = np.full(len(rows), -1.0)
    sim[readable] = _scored(similarity, coarse, sa[readable], sb[readable])
    detail = np.full(len(rows), np.nan)
    if sizes is not None:  # only pairs that passed the first gate: few, and the costly check
        same = (sim >= min_similarity) & (sizes[rows[:, 0]] == sizes[rows[:, 1]]).all(axis=1)
        # Below DETAIL_MIN_SIDE px the 32-px detail thumbnail is an upsampled blur: it would
        # measure JPEG's 8x8 blocks, not content (digits: 8x8 px).
        same &= sizes[rows[:, 0]].min(axis=1) >= DETAIL_MIN_SIDE
        detail[same] = _scored(detail_difference, fine, sa[same], sb[same])
    keep = (sim >= min_similarity) & ~(detail > max_detail_difference)
    result.pairs = np.sort(rows[keep], axis=1)
    result.similarity = sim[keep]
    result.detail = detail[keep]
    result.hamming = np.bitwise_count(rep_hash[cand[keep, 0]] ^ rep_hash[cand[keep, 1]])
    rep_cluster, centres = centre_clusters(len(first), cand[keep], sim[keep])
    # every row takes its representative's cluster
    result.cluster = np.full(n, -1, dtype=np.int64)
    result.cluster[pos] = rep_cluster[codes]
    result.centre = rep_pos[centres]
    return result


def candidate_pairs(hashes: np.ndarray, threshold: int, max_bucket: int = MAX_BUCKET) -> np.ndarray:
    """Index pairs (i < j) of hashes within `threshold` bits, every pair listed.

    Rows sharing one hash are compared pairwise up to BUCKET_ALL_PAIRS rows per hash; a larger
    bucket (a flood of blank images) is linked as a star to its first row, which bounds the work.
    Distinct hashes: :func:`imgcls.data.phash.search_close_pairs` (exact unless buckets crowd).
    """
    return _candidates(hashes, threshold, max_bucket)[0]


def _candidates(hashes: np.ndarray, threshold: int, max_bucket: int) -> tuple[np.ndarray, int]:
    """Candidate pairs (i < j) and the comparisons the crowded-bucket window skipped."""
    if threshold < 0 or hashes.size < 2:
        return np.empty((0, 2), dtype=np.int64), 0
    uniq, inverse = np.unique(hashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(uniq))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = [_within_buckets(order, starts, counts)]
    skipped = 0
    if threshold > 0 and uniq.size > 1:
        upairs, stats = search_close_pairs(uniq, threshold, max_bucket)
        skipped = stats.skipped
        out.append(_across_buckets(order, starts, counts, upairs))
    return unique_pairs(np.concatenate(out), hashes.size), skipped


def _within_buckets(order: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pairs inside each identical-hash bucket: all pairs, or a star for huge buckets."""
    found = [np.empty((0, 2), dtype=np.int64)]
    for b in np.flatnonzero(counts > 1):
        members = order[starts[b] : starts[b] + counts[b]]
        if len(members) <= BUCKET_ALL_PAIRS:
            i, j = np.triu_indices(len(members), k=1)
            found.append(np.stack([members[i], members[j]], axis=1))
        else:
            found.append(np.stack([np.full(len(members) - 1, members[0]), members[1:]], axis=1))
    return np.concatenate(found)


def _across_buckets(
    order: np.ndarray, starts: np.ndarray, counts: np.ndarray, upairs: np.ndarray
) -> np.ndarray:
    """Expand pairs of close distinct hashes to their rows (first rows only for huge buckets)."""
    if not len(upairs):
        return np.empty((0, 2), dtype=np.int64)
    cu = np.minimum(counts[upairs[:, 0]], BUCKET_ALL_PAIRS)
    cv = np.minimum(counts[upairs[:, 1]], BUCKET_ALL_PAIRS)
    size = cu * cv
    pair_id = np.repeat(np.arange(len(upairs)), size)
    local = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    ia, ib = local // cv[pair_id], local % cv[pair_id]
    a = order[starts[upairs[pair_id, 0]] + ia]
    b = order[starts[upairs[pair_id, 1]] + ib]
    return np.stack([a, b], axis=1)


# --------------------------------------------------------------------------- verification


def thumbnails(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ...]:
    """Grayscale 16x16 and 32x32 float32 thumbnails of an image file (the shared decoder)."""
    with open_image(path, max_pixels) as im:
        im.draft("L", (DETAIL * 2, DETAIL * 2))  # JPEG: decode at a fraction of the size, fast
        im = ImageOps.exif_transpose(im)
        im = to_gray(im)  # exactly as the pHash sees it
        # antialiased bilinear: area-weighted, so both sizes see every source pixel
        small = im.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        large = im.resize((DETAIL, DETAIL), Image.Resampling.BILINEAR)
        return (
            np.asarray(small, dtype=np.float32).ravel(),
            np.asarray(large, dtype=np.float32).ravel(),
        )


def _thumbnails_chunk(args: tuple[list[str], str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thumbnails of a list of paths under root; unreadable files get ok=False (never raises).

    Stored as uint8 (the gray thumbnails are 8-bit, so nothing is lost): 1.3 KB per image.
    """
    paths, root = args
    coarse = np.zeros((len(paths), THUMB * THUMB), dtype=np.uint8)
    fine = np.zeros((len(paths), DETAIL * DETAIL), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        try:
            coarse[i], fine[i] = thumbnails(Path(root) / p)
            ok[i] = True
        except Exception as err:  # a bad file only loses its pairs; ingest reports it
            log.debug("no thumbnail for %s: %s", p, err)
    return coarse, fine, ok


def load_thumbnails(
    paths: list[str], root: Path | str = ".", workers: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 256) and (N, 1024) uint8 thumbnails and a readable mask; several processes for many."""
    n_proc = workers or (os.cpu_count() or 1)
    if len(paths) < PARALLEL_MIN or n_proc <= 1:
        return _thumbnails_chunk((paths, str(root)))
    size = -(-len(paths) // (n_proc * 4))
    chunks = [(paths[i : i + size], str(root)) for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(n_proc) as pool:
        parts = list(pool.map(_thumbnails_chunk, chunks))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _scored(
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    thumbs: np.ndarray,
    sa: np.ndarray,
    sb: np.ndarray,
) -> np.ndarray:
    """`score` of thumbnail pairs (slots sa, sb) in chunks: memory stays flat with many pairs."""
    out = np.empty(len(sa))
    for i in range(0, len(sa), PAIR_CHUNK):
        j = slice(i, i + PAIR_CHUNK)
        out[j] = score(thumbs[sa[j]], thumbs[sb[j]])
    return out


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of thumbnail pairs (rows); flat images match flat images of one tone."""
    flat_a, flat_b = a.std(axis=1) < FLAT_STD, b.std(axis=1) < FLAT_STD
    r = (_normalise(a) * _normalise(b)).mean(axis=1)
    # No structure to correlate: two flat images are copies when of one tone, else distinct.
    tone = np.abs(a.mean(axis=1) - b.mean(axis=1)) <= FLAT_MEAN_TOLERANCE
    r = np.where(flat_a & flat_b, np.where(tone, 1.0, 0.0), r)
    return np.where(flat_a ^ flat_b, 0.0, r)


def detail_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest mean |difference| over 4x4 blocks of normalised 32x32 thumbnails, per pair."""
    if not len(a):
        return np.empty(0)
    za, zb = _normalise(a), _normalise(b)
    grid = DETAIL // BLOCK
    diff = np.abs(za - zb).reshape(len(a), grid, BLOCK, grid, BLOCK).mean(axis=(2, 4))
    return diff.reshape(len(a), -1).max(axis=1)


def _normalise(t: np.ndarray) -> np.ndarray:
    """Rows to zero mean, unit variance (flat rows stay zero)."""
    t = t.astype(np.float64)
    t = t - t.mean(axis=1, keepdims=True)
    return t / np.maximum(t.std(axis=1, keepdims=True), FLAT_STD)


# --------------------------------------------------------------------------- clustering


def centre_clusters(n: int, pairs: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster id per node (-1 = none) and each cluster's centre; members all verified to it.

    Greedy: the node with the most verified neighbours not yet placed becomes a centre and takes
    those neighbours; ties go to the larger summed similarity, then the lower index. Nothing is
    joined through a member, so no chain can form.
    """
    cluster = np.full(n, -1, dtype=np.int64)
    if not len(pairs):
        return cluster, np.empty(0, dtype=np.int64)
    a = np.concatenate([pairs[:, 0], pairs[:, 1]])
    b = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    indptr = np.searchsorted(a, np.arange(n + 1))
    weight = np.bincount(pairs.ravel(), weights=np.repeat(sim, 2), minlength=n)
    # lazy max-heap on (free neighbours, summed similarity): counts only fall, so a popped
    # entry whose count is stale is pushed back with its current count
    heap = [(-int(indptr[v + 1] - indptr[v]), -float(weight[v]), int(v)) for v in np.unique(a)]
    heapq.heapify(heap)
    centres: list[int] = []
    while heap:
        neg_deg, neg_w, c = heapq.heappop(heap)
        if cluster[c] >= 0:
            continue
        nbrs = b[indptr[c] : indptr[c + 1]]
        free = nbrs[cluster[nbrs] < 0]
        if not len(free):
            continue
        if len(free) < -neg_deg:
            heapq.heappush(heap, (-len(free), neg_w, c))
            continue
        cluster[c] = cluster[free] = len(centres)
        centres.append(c)
    return cluster, np.asarray(centres, dtype=np.int64)
