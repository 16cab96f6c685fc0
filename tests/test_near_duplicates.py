"""Near-duplicate detection: verified on real image files, bounded clusters that cannot chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageEnhance

from imgcls.config import ValidateConfig
from imgcls.data.imageinfo import inspect_image
from imgcls.data.manifest import MANIFEST_COLUMNS
from imgcls.data.near_duplicates import (
    centre_clusters,
    find_near_duplicates,
    similarity,
    thumbnails,
)
from imgcls.data.validation import render_markdown, validate_manifest


def garment(seed: int, side: int = 64) -> Image.Image:
    """A smooth random picture on a black background, like a product photo: big, flat areas."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 256, (6, 6), dtype=np.uint8)
    body = Image.fromarray(small).resize((side // 2, side // 2), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(body, (side // 4, side // 4))
    return canvas


def with_print(img: Image.Image, seed: int) -> Image.Image:
    """The same picture with a different 'print' in one small patch: a distinct item."""
    arr = np.asarray(img).copy()
    rng = np.random.default_rng(seed)
    s = img.width
    y, x = s // 2 - s // 12, s // 2 - s // 12
    arr[y : y + s // 6, x : x + s // 6] = rng.integers(0, 256, (s // 6, s // 6))
    return Image.fromarray(arr)


def save(root: Path, rel: str, img: Image.Image, **kw: object) -> str:
    """Write an image under root; return its relative path."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return rel


def describe(root: Path, rels: list[str], labels: list[str]) -> pd.DataFrame:
    """A manifest for the files, as ingest writes it (one group per file)."""
    rows = [
        {"path": r, "label": lab, "group": r, "source_split": "", **inspect_image(root / r, 10**8)}
        for r, lab in zip(rels, labels, strict=True)
    ]
    return pd.DataFrame(rows)[list(MANIFEST_COLUMNS)]


def detect(root: Path, df: pd.DataFrame, **kw: object):
    """find_near_duplicates on a manifest, with the stage's defaults."""
    sizes = df[["width", "height"]].to_numpy(dtype=np.int64)
    return find_near_duplicates(
        df["path"], df["sha256"], df["phash"], 4, root=root, sizes=sizes, **kw
    )


def test_planted_copies_are_found_and_similar_distinct_images_are_not(tmp_path: Path) -> None:
    """Re-encoded, resized and brightened copies join their original; a new print does not."""
    rels, labels = [], []
    for i in range(12):
        img = garment(i)
        rels.append(save(tmp_path, f"person{i}/orig.png", img))
        labels.append(f"c{i % 3}")
    copies = {
        "person0/jpeg.jpg": (garment(0).convert("RGB"), {"quality": 70}),
        "person1/resized.png": (garment(1).resize((70, 70), Image.Resampling.BICUBIC), {}),
        "person2/bright.png": (ImageEnhance.Brightness(garment(2)).enhance(1.15), {}),
    }
    for rel, (img, kw) in copies.items():
        rels.append(save(tmp_path, rel, img, **kw))
        labels.append(f"c{int(rel[6]) % 3}")
    rels.append(save(tmp_path, "person3/other_print.png", with_print(garment(3), 99)))
    labels.append("c0")
    df = describe(tmp_path, rels, labels)
    found = detect(tmp_path, df)
    cluster = dict(zip(df["path"], found.cluster, strict=True))
    for i, rel in enumerate(copies):
        assert cluster[rel] >= 0 and cluster[rel] == cluster[f"person{i}/orig.png"], rel
    assert cluster["person3/other_print.png"] != cluster["person3/orig.png"] or (
        cluster["person3/orig.png"] < 0
    )
    # nothing else was merged: the 9 other originals are distinct pictures
    assert (found.cluster >= 0).sum() == 2 * len(copies)
    assert found.unverifiable == 0


def test_a_chain_of_small_steps_never_becomes_one_cluster(tmp_path: Path) -> None:
    """Each image is a near-duplicate of the next; the first and last are not alike at all."""
    base = np.asarray(garment(5), dtype=np.float64)
    other = np.asarray(garment(6), dtype=np.float64)
    steps = [((1 - t) * base + t * other).astype(np.uint8) for t in np.linspace(0, 1, 26)]
    rels = [save(tmp_path, f"step{k:02d}.png", Image.fromarray(a)) for k, a in enumerate(steps)]
    df = describe(tmp_path, rels, ["a"] * len(rels))
    found = detect(tmp_path, df, max_detail_difference=10.0)  # similarity gate only
    assert len(found.pairs) >= 20  # neighbours verify, so transitive closure would chain all
    thumbs = np.stack([thumbnails(tmp_path / r)[0] for r in rels])
    for c, centre in enumerate(found.centre):
        members = np.flatnonzero(found.cluster == c)
        # every member is a verified near-duplicate of its centre: bounded radius
        s = similarity(thumbs[members], np.repeat(thumbs[[centre]], len(members), axis=0))
        assert (s >= 0.997).all()
    assert np.bincount(found.cluster[found.cluster >= 0]).max() < len(rels) // 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.integers(0, 19)), max_size=60))
def test_centre_clusters_members_are_all_adjacent_to_their_centre(edges) -> None:
    """On any graph: each member is linked to its centre, and clusters are disjoint."""
    pairs = np.array(sorted({tuple(sorted(e)) for e in edges if e[0] != e[1]}), dtype=np.int64)
    pairs = pairs.reshape(-1, 2)
    cluster, centres = centre_clusters(20, pairs, np.ones(len(pairs)))
    linked = {tuple(p) for p in pairs.tolist()}
    for node in np.flatnonzero(cluster >= 0):
        c = int(centres[cluster[node]])
        assert node == c or (min(node, c), max(node, c)) in linked
    # every verified pair ends up clustered on at least one side (nothing silently dropped)
    for a, b in linked:
        assert cluster[a] >= 0 or cluster[b] >= 0


def test_flat_images_match_only_flat_images_of_one_tone() -> None:
    black = np.zeros((2, 256), dtype=np.float32)
    grey = np.full((2, 256), 128, dtype=np.float32)
    texture = np.random.default_rng(0).integers(0, 256, (2, 256)).astype(np.float32)
    assert similarity(black, black + 2).tolist() == [1.0, 1.0]
    assert similarity(black, grey).tolist() == [0.0, 0.0]
    assert similarity(black, texture).tolist() == [0.0, 0.0]


def test_unreadable_files_lose_their_pairs_not_the_run(tmp_path: Path) -> None:
    """A candidate whose file vanished is counted as unverifiable and merged with nothing."""
    rels = [save(tmp_path, "a.png", garment(1)), save(tmp_path, "b.jpg", garment(1), quality=80)]
    df = describe(tmp_path, rels, ["x", "x"])
    (tmp_path / "b.jpg").unlink()
    found = detect(tmp_path, df)
    assert found.unverifiable == 1 and (found.cluster < 0).all()


def test_validation_reports_largest_merged_groups_and_warns_on_mixed_classes(
    tmp_path: Path,
) -> None:
    """A merged group spanning classes is flagged as suspicious in JSON and Markdown."""
    rels, labels = [], []
    for i in range(12):
        for label in ("a", "b"):
            rels.append(save(tmp_path, f"{label}/{i:02d}.png", garment(100 * i + ord(label))))
            labels.append(label)
    rels.append(save(tmp_path, "b/copy_of_a00.jpg", garment(ord("a")).convert("RGB"), quality=85))
    labels.append("b")
    df = describe(tmp_path, rels, labels)
    cfg = ValidateConfig(max_merged_group_share=0.1)  # the pair is 1/12 of class a
    result = validate_manifest(df, cfg, root=tmp_path)
    assert result.ok  # warnings only
    s = result.report["summary"]
    assert (s["merged_groups"], s["merged_group_rows"], s["largest_merged_group"]) == (1, 2, 2)
    [group] = result.report["largest_merged_groups"]
    assert group["classes"] == {"a": 1, "b": 1} and group["new_classes"] == 1
    warned = [o for o in result.report["expectations"] if o["batch"] == "merged_groups"]
    assert [o["success"] for o in warned] == [False, True]  # spans classes; share is small
    assert "a/00.png" in " ".join(warned[0]["examples"])
    md = render_markdown(result.report, figure="validation_groups.png")
    assert "## Largest merged groups (1 groups, 2 rows)" in md
    assert "**spans classes: suspicious**" in md
    assert "![thumbnails of the largest merged groups, one row each](validation_groups.png)" in md
    pairs = result.near_pairs
    assert pairs[["path", "twin"]].values.tolist() == [["a/00.png", "b/copy_of_a00.jpg"]]
    assert pairs["similarity"].iloc[0] >= 0.997


def test_merged_group_larger_than_its_class_share_is_warned(tmp_path: Path) -> None:
    """Five copies of one image in a class of twelve: a merged group with 5/12 of the class."""
    rels, labels = [], []
    for i in range(12):
        rels.append(save(tmp_path, f"a/{i:02d}.png", garment(i)))
        labels.append("a")
        rels.append(save(tmp_path, f"b/{i:02d}.png", garment(500 + i)))
        labels.append("b")
    for q in (60, 70, 80, 90):
        rels.append(save(tmp_path, f"a/copy{q}.jpg", garment(0).convert("RGB"), quality=q))
        labels.append("a")
    df = describe(tmp_path, rels, labels)
    result = validate_manifest(df, ValidateConfig(max_merged_group_share=0.2), root=tmp_path)
    [group] = result.report["largest_merged_groups"]
    assert group["rows"] == 5 and group["class_share"] == pytest.approx(5 / 16)
    share = [o for o in result.report["expectations"] if "holds more than 20%" in o["title"]]
    assert len(share) == 1 and not share[0]["success"]


def test_pairs_scored_in_chunks_match_one_pass(tmp_path: Path, monkeypatch) -> None:
    """Scoring in chunks (flat memory for millions of pairs) changes no pair and no score."""
    import imgcls.data.near_duplicates as nd

    rels, labels = [], []
    for i in range(4):
        rels.append(save(tmp_path, f"p{i}/orig.png", garment(i)))
        rels.append(save(tmp_path, f"p{i}/copy.jpg", garment(i).convert("RGB"), quality=85))
        rels.append(
            save(tmp_path, f"p{i}/bright.png", ImageEnhance.Brightness(garment(i)).enhance(1.1))
        )
        labels += [f"c{i}"] * 3
    df = describe(tmp_path, rels, labels)
    whole = detect(tmp_path, df)
    monkeypatch.setattr(nd, "PAIR_CHUNK", 1)
    chunked = detect(tmp_path, df)
    assert len(whole.pairs) >= 8 and whole.skipped == 0
    assert np.array_equal(whole.pairs, chunked.pairs)
    assert np.array_equal(whole.similarity, chunked.similarity)
    assert np.array_equal(whole.detail, chunked.detail, equal_nan=True)
