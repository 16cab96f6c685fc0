"""The data contract: each expectation fails on a small real dataset with a readable message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls.config import ConfigError, ValidateConfig, parse_params
from imgcls.data.imageinfo import inspect_image
from imgcls.data.manifest import MANIFEST_COLUMNS
from imgcls.data.near_duplicates import candidate_pairs
from imgcls.data.phash import parse_phashes
from imgcls.data.validation import DataContractError, ValidationResult, validate_manifest
from imgcls.io import read_csv, write_csv

DS = "data/raw/ds"


# --------------------------------------------------------------------------- helpers


def pattern(seed: int, size: tuple[int, int] = (16, 16), mode: str = "L") -> Image.Image:
    """A smooth random image: 4x4 random blocks upsampled, so its pHash is stable and distinct."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    small = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8).squeeze()
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).convert(mode)


def write_image(root: Path, label: str, name: str, img: Image.Image) -> Path:
    """Save a PNG under data/raw/ds/<label>/."""
    path = root / DS / label / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_dataset(root: Path, counts: dict[str, int], seed: int = 0) -> None:
    """One folder of distinct small PNGs per class."""
    for k, (label, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            write_image(root, label, f"{i:03d}.png", pattern(seed * 10_000 + k * 1000 + i))


def manifest(root: Path) -> pd.DataFrame:
    """Describe every file under data/raw/ds the way ingest does; round-trip through CSV."""
    rows = []
    for path in sorted((root / DS).rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            info = inspect_image(path, max_pixels=10_000_000)
            rows.append(
                {"path": rel, "label": path.parent.name, "group": rel, "source_split": "", **info}
            )
    df = pd.DataFrame(rows)[list(MANIFEST_COLUMNS)]
    write_csv(root / "manifest.csv", df)
    return read_csv(root / "manifest.csv")  # exactly what the stage reads: strings + Int64


def run(df: pd.DataFrame, root: Path | None = None, **cfg: object) -> ValidationResult:
    """Validate with test-sized params; `root`: where the manifest's paths are (else cwd)."""
    return validate_manifest(df, ValidateConfig(**cfg), root=root or Path.cwd())


def failed(result: ValidationResult) -> list[str]:
    """Titles of the failed critical expectations."""
    return [f["title"] for f in result.failures]


def outcome(result: ValidationResult, title_part: str) -> dict:
    """The report entry of the one expectation whose title contains `title_part`."""
    hits = [o for o in result.report["expectations"] if title_part in o["title"]]
    assert len(hits) == 1, [o["title"] for o in result.report["expectations"]]
    return hits[0]


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    """Three classes of twelve distinct 16x16 grayscale PNGs."""
    make_dataset(tmp_path, {"a": 12, "b": 12, "c": 12})
    return tmp_path


# --------------------------------------------------------------------------- clean data


def test_clean_dataset_passes_with_nothing_quarantined(clean: Path) -> None:
    df = manifest(clean)
    result = run(df)
    assert result.ok, result.summary()
    assert result.failures == []
    assert all(o["success"] for o in result.report["expectations"])
    s = result.report["summary"]
    assert (s["rows"], s["valid"], s["quarantined"]) == (36, 36, 0)
    assert s["exact_duplicate_sets"] == 0 and s["near_duplicate_clusters"] == 0
    assert result.report["quarantine"] == []
    assert result.valid["path"].tolist() == df["path"].tolist()
    assert result.valid["group"].tolist() == df["group"].tolist()  # nothing to merge
    assert list(result.valid.columns) == list(MANIFEST_COLUMNS)
    # labels were not configured: the set found is recorded
    assert result.report["labels"] == {
        "configured": None,
        "found": ["a", "b", "c"],
        "counts": {"a": 12, "b": 12, "c": 12},
    }
    json.dumps(result.report, allow_nan=False)  # strict JSON, no numpy scalars, no NaN
    assert result.markdown.startswith("# Data validation: PASSED")
    assert "validation passed: 36 of 36 rows valid" in result.summary()


def test_valid_rows_round_trip_through_csv(clean: Path) -> None:
    result = run(manifest(clean))
    write_csv(clean / "valid.csv", result.valid)
    back = read_csv(clean / "valid.csv")
    pd.testing.assert_frame_equal(back, result.valid.reset_index(drop=True))


# --------------------------------------------------------------------------- structure


def test_missing_column_fails(clean: Path) -> None:
    result = run(manifest(clean).drop(columns=["phash"]))
    assert not result.ok
    assert failed(result) == ["column `phash` is present"]
    assert "expect_column_to_exist" in result.summary()
    assert result.valid.empty


def test_missing_path_column_names_the_columns_present(clean: Path) -> None:
    result = run(manifest(clean).drop(columns=["path"]))
    assert failed(result) == ["column `path` is present"]
    assert "no column `path` (columns present: label, group, source_split" in result.summary()
    assert result.report["quarantine"] == []


def test_empty_manifest_fails_readably(clean: Path) -> None:
    result = run(manifest(clean).iloc[0:0])
    assert "at least 2 classes" in failed(result)
    assert "observed 0, expected at least 2" in result.summary()
    assert "no decodable images to count" in result.summary()
    json.dumps(result.report, allow_nan=False)


def test_not_a_dataframe_is_an_error() -> None:
    with pytest.raises(DataContractError, match="expected a pandas DataFrame"):
        validate_manifest([{"path": "x.png"}], ValidateConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize("column", ["label", "group", "sha256"])
def test_required_value_missing_fails(clean: Path, column: str) -> None:
    df = manifest(clean)
    df.loc[4, column] = "  "  # blank counts as missing
    result = run(df)
    assert not result.ok
    assert f"`{column}` is filled in for every row" in failed(result)
    assert f"{df.loc[4, 'path']} ({column}=missing)" in result.summary()
    assert "1 of 36 rows" in result.summary()


def test_duplicate_path_fails(clean: Path) -> None:
    df = manifest(clean)
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    result = run(df)
    assert "each file is listed once" in failed(result)
    assert df.loc[0, "path"] in result.summary()


def test_malformed_sha256_fails(clean: Path) -> None:
    df = manifest(clean)
    df.loc[2, "sha256"] = df.loc[2, "sha256"].upper()
    result = run(df)
    assert failed(result) == ["`sha256` is a 64-char lowercase hex digest"]
    assert df.loc[2, "path"] in result.summary()


def test_unknown_source_split_fails(clean: Path) -> None:
    df = manifest(clean)
    df.loc[7, "source_split"] = "training"
    result = run(df)
    assert failed(result) == ["`source_split` is train, val, test or empty"]
    assert f"{df.loc[7, 'path']} (source_split='training')" in result.summary()


@pytest.mark.parametrize("column", ["width", "mode", "phash"])
def test_decoded_image_property_missing_fails(clean: Path, column: str) -> None:
    df = manifest(clean)
    df.loc[3, column] = None if column == "width" else ""
    result = run(df)
    assert f"`{column}` is filled in for every decodable image" in failed(result)
    assert df.loc[3, "path"] in result.summary()


def test_malformed_phash_fails(clean: Path) -> None:
    df = manifest(clean)
    df.loc[5, "phash"] = "xyz"
    result = run(df)
    assert failed(result) == ["`phash` is a 16-char lowercase hex 64-bit perceptual hash"]
    assert f"{df.loc[5, 'path']} (phash='xyz')" in result.summary()


# --------------------------------------------------------------------------- quarantine


def _break_files(root: Path, n: int) -> list[str]:
    """Add `n` undecodable files to class a: text, a truncated PNG, an empty file."""
    paths = []
    for i in range(n):
        path = root / DS / "a" / f"broken{i}.png"
        if i % 3 == 0:
            path.write_bytes(b"this is not an image")
        elif i % 3 == 1:
            good = write_image(root, "a", f"tmp{i}.png", pattern(999 + i, (64, 64)))
            path.write_bytes(good.read_bytes()[:200])
            good.unlink()
        else:
            path.write_bytes(b"")
        paths.append(path.relative_to(root).as_posix())
    return paths


def test_undecodable_file_is_quarantined_below_threshold(clean: Path) -> None:
    broken = _break_files(clean, 1)
    df = manifest(clean)
    result = run(df)
    assert result.ok, result.summary()
    assert broken[0] not in result.valid["path"].tolist()
    assert len(result.valid) == 36
    reason = df.set_index("path").loc[broken[0], "error"]  # ingest's words, e.g. "not an image"
    assert reason
    assert result.report["quarantine"] == [{"path": broken[0], "label": "a", "reason": reason}]
    assert result.report["summary"]["quarantined"] == 1
    assert "## Quarantined files (1)" in result.markdown
    assert broken[0] in result.markdown


def test_too_many_undecodable_files_is_a_hard_failure(clean: Path) -> None:
    broken = _break_files(clean, 3)  # 3 of 39 = 7.7% > 5%
    df = manifest(clean)
    result = run(df)
    assert not result.ok
    assert failed(result) == ["at most 5.00% of the files are undecodable (those are quarantined)"]
    text = result.summary()
    assert "3 of 39 rows (7.69%), at most 5.00% allowed" in text
    reasons = df.set_index("path")["error"]
    for path in broken:
        assert f"{path} (error={reasons[path]!r})" in text
    assert "validate.max_quarantine_fraction" in text  # how to fix it


def test_quarantine_threshold_is_inclusive(tmp_path: Path) -> None:
    make_dataset(tmp_path, {"a": 19, "b": 19})
    _break_files(tmp_path, 2)  # 2 of 40 = exactly 5%
    df = manifest(tmp_path)
    assert run(df, max_quarantine_fraction=0.05).ok
    strict = run(df, max_quarantine_fraction=0.0)
    assert not strict.ok and "at most 0.00% allowed" in strict.summary()


# --------------------------------------------------------------------------- image properties


@pytest.mark.parametrize(("dim", "size"), [("width", (40, 16)), ("height", (16, 40))])
def test_image_size_out_of_bounds_fails(clean: Path, dim: str, size: tuple[int, int]) -> None:
    big = write_image(clean, "b", "big.png", pattern(4242, size))
    result = run(manifest(clean), **{f"max_{dim}": 32})
    assert failed(result) == [f"image {dim} within [1, 32] px"]
    assert f"{big.relative_to(clean).as_posix()} ({dim}=40)" in result.summary()


def test_small_images_fail_min_bound(clean: Path) -> None:
    result = run(manifest(clean), min_width=20)
    assert failed(result) == ["image width within [20, 10000] px"]
    text = result.summary()
    assert "36 of 36 rows (100.00%)" in text
    # no more than ten example paths
    assert sum(line.strip().startswith(DS) for line in text.splitlines()) == 10


def test_colour_mode_not_allowed_fails(clean: Path) -> None:
    rgb = write_image(clean, "c", "colour.png", pattern(77, mode="RGB"))
    result = run(manifest(clean), allowed_modes=["L"])
    assert failed(result) == ["colour mode in L"]
    assert f"{rgb.relative_to(clean).as_posix()} (mode='RGB')" in result.summary()


# --------------------------------------------------------------------------- labels and classes


def test_label_outside_configured_classes_fails(clean: Path) -> None:
    result = run(manifest(clean), classes=["a", "b"])
    assert "labels within the configured classes (a, b)" in failed(result)
    assert "12 of 36 rows" in result.summary()
    assert f"{DS}/c/000.png (label='c')" in result.summary()
    assert result.report["labels"]["configured"] == ["a", "b"]


def test_configured_class_without_images_fails(clean: Path) -> None:
    result = run(manifest(clean), classes=["a", "b", "c", "d"])
    assert failed(result) == ["at least 10 images per class"]
    assert "1 of 4 classes (0 rows): d (0)" in result.summary()


def test_too_few_images_in_a_class_fails(tmp_path: Path) -> None:
    make_dataset(tmp_path, {"a": 12, "b": 12, "c": 4})
    result = run(manifest(tmp_path))
    assert failed(result) == ["at least 10 images per class"]
    text = result.summary()
    assert "1 of 3 classes (4 rows): c (4)" in text
    assert f"{DS}/c/003.png (label='c')" in text
    assert "validate.min_images_per_class" in text


def test_a_single_class_fails(tmp_path: Path) -> None:
    make_dataset(tmp_path, {"only": 12})
    result = run(manifest(tmp_path))
    assert failed(result) == ["at least 2 classes"]
    assert "observed 1, expected at least 2" in result.summary()


def test_class_imbalance_fails(tmp_path: Path) -> None:
    make_dataset(tmp_path, {"a": 12, "b": 30})
    result = run(manifest(tmp_path), max_imbalance_ratio=2.0)
    assert failed(result) == ["class imbalance (largest / smallest class) at most 2"]
    assert "observed 2.5, expected at most 2 (largest 'b': 30, smallest 'a': 12)" in (
        result.summary()
    )
    assert outcome(result, "class imbalance")["observed_value"] == pytest.approx(2.5)


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_with_conflicting_labels_fail_listing_both_paths(clean: Path) -> None:
    (clean / DS / "b" / "copy.png").write_bytes((clean / DS / "a" / "000.png").read_bytes())
    result = run(manifest(clean))
    assert failed(result) == ["byte-identical files carry the same label"]
    text = result.summary()
    assert "1 of 1 duplicate sets (2 rows)" in text
    assert f"{DS}/a/000.png (label='a'" in text
    assert f"{DS}/b/copy.png (label='b'" in text
    [dup] = result.report["duplicates"]
    assert dup["conflicting_labels"] and dup["labels"] == ["a", "b"]


def test_exact_duplicates_with_one_label_are_kept_in_one_group(clean: Path) -> None:
    (clean / DS / "a" / "zz-copy.png").write_bytes((clean / DS / "a" / "005.png").read_bytes())
    result = run(manifest(clean))
    assert result.ok, result.summary()
    assert len(result.valid) == 37  # both copies kept
    groups = result.valid.set_index("path")["group"]
    assert groups[f"{DS}/a/zz-copy.png"] == groups[f"{DS}/a/005.png"] == f"{DS}/a/005.png"
    [dup] = result.report["duplicates"]
    assert dup["paths"] == [f"{DS}/a/005.png", f"{DS}/a/zz-copy.png"]
    assert not dup["conflicting_labels"]
    # reported as a warning, not a failure
    warn = outcome(result, "no byte-identical files")
    assert warn["severity"] == "warning" and not warn["success"]
    assert "## Exact duplicates (same bytes) (1)" in result.markdown


def _near_copy(root: Path, src: Path, label: str, name: str) -> Path:
    """Same picture, a few pixels nudged: different bytes, (almost) the same pHash."""
    arr = np.asarray(Image.open(src)).copy()
    arr[0, :3] = np.clip(arr[0, :3].astype(int) + 3, 0, 255)
    return write_image(root, label, name, Image.fromarray(arr))


def _distance(a: str, b: str) -> int:
    """Hamming distance between two hex pHashes."""
    hashes, _ = parse_phashes(pd.Series([a, b]))
    return int(np.bitwise_count(hashes[0] ^ hashes[1]))


def test_near_duplicates_share_a_group(clean: Path) -> None:
    src = clean / DS / "b" / "004.png"
    copy = _near_copy(clean, src, "b", "near.png")
    df = manifest(clean)
    # a/000 and b/004 already share an original group: the merge must follow it transitively
    df.loc[df["path"] == f"{DS}/b/004.png", "group"] = "g-shared"
    df.loc[df["path"] == f"{DS}/a/000.png", "group"] = "g-shared"
    ph = df.set_index("path")["phash"]
    assert _distance(ph[f"{DS}/b/004.png"], ph[f"{DS}/b/near.png"]) <= 4
    result = run(df, root=clean)
    assert result.ok, result.summary()
    groups = result.valid.set_index("path")["group"]
    near = copy.relative_to(clean).as_posix()
    # component name = the lexicographically smallest original group of its members
    assert groups[near] == groups[f"{DS}/b/004.png"] == groups[f"{DS}/a/000.png"]
    assert groups[near] == min(f"{DS}/b/near.png", "g-shared")
    assert groups[f"{DS}/a/001.png"] == f"{DS}/a/001.png"  # untouched rows keep theirs
    [cluster] = result.report["near_duplicates"]
    assert cluster["paths"] == [f"{DS}/b/004.png", near]
    assert not cluster["conflicting_labels"]
    assert result.report["summary"]["groups_after"] == result.report["summary"]["groups_before"] - 1


def test_near_duplicates_with_conflicting_labels_warn(clean: Path) -> None:
    _near_copy(clean, clean / DS / "a" / "002.png", "c", "near.png")
    result = run(manifest(clean), root=clean)
    assert result.ok  # a warning: the copy may be mislabelled, but training can go on
    warn = outcome(result, "near-duplicates")
    assert warn["severity"] == "warning" and not warn["success"]
    assert f"{DS}/c/near.png (label='c', cluster=near-00001)" in warn["examples"]
    assert "near-00001" in result.markdown


def test_near_duplicate_search_can_be_turned_off(clean: Path) -> None:
    _near_copy(clean, clean / DS / "a" / "002.png", "a", "near.png")
    df = manifest(clean)
    result = run(df, near_duplicate_threshold=-1)
    assert result.ok
    assert result.report["near_duplicates"] == []
    assert result.valid["group"].tolist() == df["group"].tolist()


def test_failed_report_is_readable_markdown(clean: Path) -> None:
    (clean / DS / "b" / "copy.png").write_bytes((clean / DS / "a" / "000.png").read_bytes())
    result = run(manifest(clean), min_images_per_class=13)
    assert result.markdown.startswith("# Data validation: FAILED")
    assert "## Problems" in result.markdown
    assert "| **FAIL** | critical | classes | at least 13 images per class |" in result.markdown
    assert len(result.failures) == 2
    assert result.summary().startswith("validation failed: 2 expectation(s) not met")


# --------------------------------------------------------------------------- near-duplicate search


def _naive_pairs(hashes: list[int], threshold: int) -> set[tuple[int, int]]:
    """O(n^2) reference."""
    return {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= threshold
    }


@settings(max_examples=40, deadline=None)
@given(
    base=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
    flips=st.lists(st.tuples(st.integers(0, 7), st.sets(st.integers(0, 63), max_size=6))),
    threshold=st.integers(0, 8),
)
def test_near_duplicate_pairs_match_brute_force(
    base: list[int], flips: list[tuple[int, set[int]]], threshold: int
) -> None:
    # hashes near a few prototypes, so both close and far pairs occur
    hashes = list(base)
    for proto, bits in flips:
        h = base[proto % len(base)]
        for b in bits:
            h ^= 1 << b
        hashes.append(h)
    found = candidate_pairs(np.array(hashes, dtype=np.uint64), threshold)
    # every pair within the threshold, and nothing else (buckets here are far below the cap)
    assert {tuple(p) for p in found.tolist()} == _naive_pairs(hashes, threshold)


def test_near_duplicate_pairs_dense_cluster_uses_block_search() -> None:
    rng = np.random.default_rng(1)
    proto = int(rng.integers(0, 2**63))
    hashes = [proto ^ (1 << int(b)) ^ (1 << int(c)) for b, c in rng.integers(0, 64, (300, 2))]
    found = candidate_pairs(np.array(hashes, dtype=np.uint64), 3)
    assert {tuple(p) for p in found.tolist()} == _naive_pairs(hashes, 3)


def test_parse_phashes_skips_malformed() -> None:
    hashes, ok = parse_phashes(pd.Series(["00000000000000ff", "", "zz", "8000000000000000"]))
    assert ok.tolist() == [True, False, False, True]
    assert hashes.tolist() == [255, 2**63]


# --------------------------------------------------------------------------- params


def test_inconsistent_bounds_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_width 50 > max_width 10"):
        parse_params({"validate": {"min_width": 50, "max_width": 10}})
    with pytest.raises(ConfigError, match=r"validate\.near_duplicate_threshold"):
        parse_params({"validate": {"near_duplicate_threshold": 65}})
