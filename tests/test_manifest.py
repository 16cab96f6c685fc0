"""Manifest building on real files: digits, folders of good and bad images, groups, the cache."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import _imagefactory as fac
from imgcls.config import ConfigError, DataConfig, GroupConfig, SourceSpec, parse_params
from imgcls.data import manifest as manifest_mod
from imgcls.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    build_manifest,
    read_manifest,
)
from imgcls.data.sources import SourceError
from imgcls.errors import ImgclsError
from imgcls.io import write_csv


def _build(tmp_path: Path, **data: object) -> pd.DataFrame:
    """Build a manifest for a repository rooted at tmp_path with the given `data:` params."""
    cfg = DataConfig.model_validate({"workers": 1, **data})
    return build_manifest(cfg, tmp_path, tmp_path / "data" / "raw", progress=False)


def _by_name(df: pd.DataFrame) -> dict[str, dict[str, object]]:
    """Manifest rows keyed by file name."""
    return {Path(p).name: row for p, row in zip(df["path"], df.to_dict("records"), strict=True)}


# ----------------------------------------------------------------------------- digits


def test_digits_are_written_as_real_grayscale_pngs(tmp_path: Path) -> None:
    df = _build(tmp_path, workers=2)
    assert list(df.columns) == MANIFEST_COLUMNS
    assert len(df) == 1797
    assert sorted(df["label"].unique()) == [str(i) for i in range(10)]
    assert (df["error"] == "").all()
    assert (df["width"] == 8).all() and (df["height"] == 8).all()
    assert set(df["mode"]) == {"L"} and set(df["format"]) == {"PNG"}
    assert (df["group"] == df["path"]).all()  # data.group.by none: each image its own group
    assert (df["source_split"] == "").all()
    assert df["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    first = df.iloc[0]
    assert first["path"].startswith("data/raw/digits/")
    with Image.open(tmp_path / first["path"]) as im:
        assert im.mode == "L" and im.size == (8, 8)
        assert np.asarray(im).max() > 16  # scaled from 0..16 to 0..255


def test_digits_are_reproducible_across_fresh_ingests(tmp_path: Path) -> None:
    a = _build(tmp_path / "a")
    b = _build(tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)


# ----------------------------------------------------------------------------- bad files


def _zoo(folder: Path) -> None:
    """A class folder full of awkward files, plus good ones (names with spaces and unicode)."""
    good = folder / "good class é"
    fac.png(good / "plain rgb.png")
    fac.gray_png(good / "gray.png")
    fac.rgba_png(good / "rgba.png")
    fac.palette_png(good / "palette.png")
    fac.png16(good / "sixteen.png")
    fac.cmyk_jpeg(good / "cmyk.jpg")
    fac.exif_rotated_jpeg(good / "rotated.jpg")
    fac.one_by_one_png(good / "one.png")
    fac.jpeg(good / "ünïcödé 名前.jpeg")
    bad = folder / "bad"
    fac.empty_file(bad / "zero.png")
    fac.truncated(bad / "cut.png", "PNG")
    fac.truncated(bad / "cut.jpg", "JPEG")
    fac.text_file(bad / "text.jpg")
    fac.decompression_bomb_png(bad / "bomb.png")
    (folder / "empty class").mkdir(parents=True)
    fac.text_file(folder / "bad" / "notes.txt")  # not an image extension: skipped, logged


def test_every_bad_file_gets_a_row_with_a_reason(tmp_path: Path, caplog) -> None:
    _zoo(tmp_path / "images")
    with caplog.at_level(logging.WARNING):
        df = _build(tmp_path, source="images")
    rows = _by_name(df)
    expected_errors = {
        "zero.png": "empty file",
        "cut.png": "truncated",
        "cut.jpg": "truncated",
        "text.jpg": "not an image",
        "bomb.png": "too large",
    }
    for name, reason in expected_errors.items():
        assert rows[name]["error"] == reason, name
        assert rows[name]["label"] == "bad"
        assert pd.isna(rows[name]["width"]) and rows[name]["phash"] == ""
    assert rows["zero.png"]["sha256"] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    modes = {
        "plain rgb.png": "RGB",
        "gray.png": "L",
        "rgba.png": "RGBA",
        "palette.png": "P",
        "sixteen.png": "I;16",
        "cmyk.jpg": "CMYK",
        "one.png": "RGB",
        "ünïcödé 名前.jpeg": "RGB",
    }
    for name, mode in modes.items():
        assert rows[name]["error"] == "", name
        assert rows[name]["mode"] == mode, name
        assert rows[name]["label"] == "good class é"
    assert (rows["one.png"]["width"], rows["one.png"]["height"]) == (1, 1)
    # EXIF orientation applied: stored 40 x 20, displayed 20 x 40
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40)
    assert "notes.txt" not in rows
    assert "empty class" not in set(df["label"])
    assert "class folder has no images" in caplog.text
    assert "skipped files that are not images by extension: 1 .txt" in caplog.text
    # unicode and spaces survive a CSV round trip unchanged
    out = tmp_path / "data" / "interim" / "manifest.csv"
    write_csv(out, df)
    back = read_manifest(out)
    assert "data/raw" not in back["path"].iloc[0]  # folder inside the repo is used in place
    assert set(back["path"]) == set(df["path"])
    assert (tmp_path / back.loc[back["path"].str.contains("名前"), "path"].iloc[0]).is_file()


def test_bad_files_are_reported_the_same_from_worker_processes(tmp_path: Path, monkeypatch) -> None:
    _zoo(tmp_path / "images")
    serial = _build(tmp_path, source="images")
    (tmp_path / "data" / "raw" / ".ingest-cache" / "files.csv").unlink()
    monkeypatch.setattr(manifest_mod, "PARALLEL_MIN_FILES", 1)
    parallel = _build(tmp_path, source="images", workers=2)
    pd.testing.assert_frame_equal(serial, parallel)


def test_pixel_limit_comes_from_the_config(tmp_path: Path) -> None:
    fac.png(tmp_path / "img" / "a" / "big.png", (64, 64))  # 4096 pixels
    fac.png(tmp_path / "img" / "a" / "small.png", (16, 16))  # 256 pixels
    rows = _by_name(_build(tmp_path, source="img", max_image_pixels=3000))
    assert rows["big.png"]["error"] == "too large"
    assert rows["small.png"]["error"] == ""
    # changing the limit invalidates cached results
    rows = _by_name(_build(tmp_path, source="img", max_image_pixels=10_000))
    assert rows["big.png"]["error"] == ""


# ----------------------------------------------------------------------------- layouts


def test_split_folders_are_recorded_and_nested_folders_belong_to_their_class(
    tmp_path: Path,
) -> None:
    base = tmp_path / "wrapper" / "dataset"  # single wrapper folders are skipped
    fac.class_folder(base / "train", "cat", 2)
    fac.png(base / "train" / "cat" / "deeper" / "nested.png")
    fac.class_folder(base / "train", "dog", 2)
    fac.class_folder(base / "test", "cat", 1)
    fac.class_folder(base / "Validation", "dog", 1)
    df = _build(tmp_path, source="wrapper")
    rows = _by_name(df)
    assert rows["nested.png"]["label"] == "cat"
    assert rows["nested.png"]["source_split"] == "train"
    assert df.groupby("source_split").size().to_dict() == {"test": 1, "train": 5, "val": 1}
    assert set(df["label"]) == {"cat", "dog"}


def test_images_outside_class_folders_are_flagged(tmp_path: Path) -> None:
    fac.class_folder(tmp_path / "img", "a", 1)
    fac.class_folder(tmp_path / "img", "b", 1)
    fac.png(tmp_path / "img" / "loose.png")
    rows = _by_name(_build(tmp_path, source="img"))
    assert rows["loose.png"]["error"] == "not in a class folder"
    assert rows["loose.png"]["label"] == ""


def test_forced_split_and_a_folder_outside_the_repository(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    fac.class_folder(outside, "x", 2)
    fac.class_folder(outside, "y", 2)
    repo = tmp_path / "repo"
    repo.mkdir()
    spec = {"kind": "folder", "path": str(outside), "name": "mine", "split": "test"}
    df = _build(repo, source=[spec])
    assert all(p.startswith("data/raw/mine/") for p in df["path"])  # mirrored into data/raw
    assert set(df["source_split"]) == {"test"}
    assert all((repo / p).is_file() for p in df["path"])
    # a file removed at the source disappears from the mirror on the next ingest
    (outside / "x" / "x_000.png").unlink()
    assert len(_build(repo, source=[spec])) == 3


def test_labels_from_a_csv(tmp_path: Path) -> None:
    images = tmp_path / "pics"
    fac.png(images / "one.png", seed=1)
    fac.png(images / "sub dir" / "two.png", seed=2)
    fac.png(images / "three.png", seed=3)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient"])
        w.writerows(
            [
                ["one.png", "sick", "p1"],
                ["sub dir/two.png", "well", "p1"],
                ["three.png", "well", ""],
                ["gone.png", "sick", "p2"],
            ]
        )
    src = [{"kind": "csv", "path": "labels.csv", "root": "pics"}]
    df = _build(tmp_path, source=src, group={"by": "csv", "column": "patient"})
    rows = _by_name(df)
    assert rows["one.png"]["label"] == "sick" and rows["two.png"]["label"] == "well"
    assert rows["one.png"]["group"] == rows["two.png"]["group"] == "p1"
    assert rows["three.png"]["group"] == "pics/three.png"  # empty group cell: own group
    assert rows["gone.png"]["error"] == "missing file"


def test_a_csv_without_the_label_column_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,class\na.png,x\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"lacks column\(s\) path, label"):
        _build(tmp_path, source="labels.csv")


# ----------------------------------------------------------------------------- groups


@pytest.fixture()
def hands(tmp_path: Path) -> Path:
    """rock / paper folders whose file names carry a hand id, in per-person sub-folders."""
    for label in ("rock", "paper"):
        for hand in ("01", "02"):
            for frame in range(2):
                fac.png(
                    tmp_path / "hands" / label / f"person{hand}" / f"{label}{hand}-{frame:03d}.png",
                    seed=int(hand) * 10 + frame,
                )
    return tmp_path


def test_group_by_regex(hands: Path) -> None:
    df = _build(hands, source="hands", group={"by": "regex", "pattern": r"^[a-z]+(\d+)-"})
    assert sorted(df["group"].unique()) == ["01", "02"]


def test_group_by_regex_falls_back_to_the_path_when_no_match(hands: Path) -> None:
    fac.png(hands / "hands" / "rock" / "odd-name.png")
    df = _build(hands, source="hands", group={"by": "regex", "pattern": r"^[a-z]+(\d+)-"})
    assert _by_name(df)["odd-name.png"]["group"] == "hands/rock/odd-name.png"


def test_group_by_parent_dir(hands: Path) -> None:
    df = _build(hands, source="hands", group={"by": "parent_dir", "level": 1})
    assert sorted(df["group"].unique()) == ["person01", "person02"]
    df = _build(hands, source="hands", group={"by": "parent_dir", "level": 2})
    assert sorted(df["group"].unique()) == ["paper", "rock"]


def test_group_none_and_near_duplicate_are_the_own_path(hands: Path) -> None:
    for by in ("none", "near_duplicate"):
        df = _build(hands, source="hands", group={"by": by})
        assert (df["group"] == df["path"]).all()


def test_group_csv_needs_a_csv_source(hands: Path) -> None:
    with pytest.raises(SourceError, match="has no group column"):
        _build(hands, source="hands", group={"by": "csv"})


def test_a_per_source_group_rule_overrides_data_group(hands: Path) -> None:
    src = [{"path": "hands", "group": {"by": "parent_dir"}}]
    df = _build(hands, source=src, group={"by": "none"})
    assert set(df["group"]) == {"person01", "person02"}


def test_bad_group_settings_fail_when_params_are_loaded() -> None:
    with pytest.raises(ConfigError, match="no capturing group"):
        parse_params({"data": {"group": {"by": "regex", "pattern": r"\d+"}}})
    with pytest.raises(ConfigError, match="not a regex"):
        parse_params({"data": {"group": {"by": "regex", "pattern": "(unclosed"}}})
    with pytest.raises(ConfigError, match="data.source"):
        parse_params({"data": {"source": {"kind": "url"}}})
    assert GroupConfig(by="regex", pattern=r"(\d+)").pattern == r"(\d+)"
    assert SourceSpec(kind="idx", path="x").path == "x"


# ----------------------------------------------------------------------------- the cache


def test_reingest_reuses_cached_results_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    fac.class_folder(tmp_path / "img", "a", 3)
    fac.class_folder(tmp_path / "img", "b", 3)
    first = _build(tmp_path, source="img")
    cache = tmp_path / "data" / "raw" / ".ingest-cache" / "files.csv"
    assert cache.is_file()
    # Plant a marker in the cache: if the next ingest shows it, the file was not re-read.
    rows = pd.read_csv(cache, dtype=str, keep_default_na=False)
    target = rows["path"].iloc[0]
    rows.loc[0, "phash"] = "cafecafecafecafe"
    rows.to_csv(cache, index=False)
    second = _build(tmp_path, source="img")
    assert second.set_index("path").loc[target, "phash"] == "cafecafecafecafe"
    # A changed file (new mtime) is inspected again.
    path = tmp_path / target
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = _build(tmp_path, source="img")
    pd.testing.assert_frame_equal(first, third)


# ----------------------------------------------------------------------------- reading


def test_raw_dir_outside_the_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImgclsError, match="outside the repository root"):
        build_manifest(DataConfig(), tmp_path / "repo", tmp_path / "raw", progress=False)


def test_read_manifest_checks_columns(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="run the ingest stage"):
        read_manifest(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,x\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(bad)


def test_read_manifest_round_trip_keeps_types(tmp_path: Path) -> None:
    fac.class_folder(tmp_path / "img", "a", 2)
    fac.empty_file(tmp_path / "img" / "a" / "zero.png")
    df = _build(tmp_path, source="img")
    out = tmp_path / "manifest.csv"
    write_csv(out, df)
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, df)
