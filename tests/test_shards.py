"""Tar shards (WebDataset layout) read in place: the same manifest, split and metrics as folders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _datasets import pattern_image
from _localhttp import local_server
from _project import make_project, sh
from imgcls.config import DataConfig
from imgcls.data.dataset import decode_images
from imgcls.data.imageinfo import (
    file_ident,
    held_indexes,
    inspect_image,
    open_image,
    remember_members,
    split_member,
)
from imgcls.data.manifest import build_manifest
from imgcls.data.sources import SourceError, UnsafeShardError
from imgcls.data.sources.download import ChecksumError
from imgcls.data.sources.shards import image_members

CLASSES = ("diagonal", "horizontal", "vertical")  # sorted: the folder walk's order
GROUPS = {"by": "regex", "pattern": r"^(s\d+)-"}


def _png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grayscale array."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(per_class: int = 24, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(class, file name, PNG bytes) in folder-walk order; 3 images per subject (group)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, label in enumerate(CLASSES):
        for i in range(per_class):
            name = f"s{k * 100 + i // 3:03d}-{i % 3}.png"
            out.append((label, name, _png(pattern_image(k, rng))))
    return sorted(out, key=lambda r: (r[0], r[1]))


def _write_folder(folder: Path, images: list[tuple[str, str, bytes]]) -> None:
    """The images as class folders."""
    for label, name, data in images:
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / name).write_bytes(data)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular member."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shards(
    folder: Path, images: list[tuple[str, str, bytes]], n: int = 3, cls: bool = True
) -> list[Path]:
    """The same images as `n` WebDataset shards: `<class>/<stem>.png` + `<class>/<stem>.cls`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(images) // n)
    for s in range(n):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for label, name, data in images[s * per : (s + 1) * per]:
                key = f"{label}/{Path(name).stem}"
                _add(tf, f"{key}.png", data)
                if cls:
                    _add(tf, f"{key}.cls", label.encode())
        paths.append(path)
    return paths


def _build(root: Path, **data: object) -> pd.DataFrame:
    """The manifest of a repository at `root` with the given `data:` params."""
    cfg = DataConfig.model_validate({"workers": 1, **data})
    return build_manifest(cfg, root, root / "data" / "raw", progress=False)


def _member_key(path: str) -> str:
    """`<class>/<file>` of a folder path or a shard member path (the part both share)."""
    return "/".join(path.split("/")[-2:])


def _modulo_path(df: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows keyed by `<class>/<file>` instead of the path."""
    return df.assign(path=df["path"].map(_member_key)).reset_index(drop=True)


# ----------------------------------------------------------------------------- manifest


def test_shards_give_the_folder_manifest_and_nothing_is_extracted(tmp_path: Path) -> None:
    images = _images(per_class=8)
    _write_folder(tmp_path / "imgs", images)
    _write_shards(tmp_path / "shards", images)
    folder = _build(tmp_path, source="imgs", group=GROUPS)
    shards = _build(tmp_path, source={"kind": "shards", "path": "shards"}, group=GROUPS)
    assert shards["path"].iloc[0] == "shards/shard-000.tar/diagonal/s000-0.png"
    assert (shards["error"] == "").all()
    pd.testing.assert_frame_equal(_modulo_path(folder), _modulo_path(shards))
    assert shards["group"].nunique() == 9  # 3 per class: the regex sees the member name
    # read in place: data/raw holds the ingest cache and nothing else
    raw = [p for p in (tmp_path / "data/raw").rglob("*") if p.is_file()]
    assert {p.parent.name for p in raw} == {".ingest-cache"}
    # the auto kind: a folder of .tar files is a shards source
    pd.testing.assert_frame_equal(_build(tmp_path, source="shards", group=GROUPS), shards)


def test_reingest_reuses_the_cache_until_a_shard_changes(tmp_path: Path) -> None:
    images = _images(per_class=4)
    shards = _write_shards(tmp_path / "shards", images)
    first = _build(tmp_path, source="shards")
    cache = pd.read_csv(tmp_path / "data/raw/.ingest-cache/files.csv")
    assert len(cache) == len(first)
    # poison one cached digest: an unchanged shard is not read again, so the poison shows
    cache.loc[0, "sha256"] = "0" * 64
    cache.to_csv(tmp_path / "data/raw/.ingest-cache/files.csv", index=False)
    assert _build(tmp_path, source="shards")["sha256"].iloc[0] == "0" * 64
    os.utime(shards[0], ns=(1, 1))  # the shard changed: its members are inspected again
    assert _build(tmp_path, source="shards")["sha256"].iloc[0] == first["sha256"].iloc[0]


def test_labels_csv_groups_and_class_indices(tmp_path: Path) -> None:
    images = _images(per_class=4)
    _write_shards(tmp_path / "a", images[:6], n=1, cls=False)
    (tmp_path / "labels.csv").write_text(
        "key,label,group\n"
        + "".join(f"{lab}/{Path(n).stem},{lab},g{i % 2}\n" for i, (lab, n, _) in enumerate(images))
    )
    df = _build(
        tmp_path,
        source={"kind": "shards", "path": "a", "labels": "labels.csv"},
        group={"by": "csv"},
    )
    assert list(df["label"]) == [lab for lab, _, _ in images[:6]]
    assert list(df["group"]) == [f"g{i % 2}" for i in range(6)]
    # <key>.cls with class indices, named through `classes:`
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        for i, (_, name, data) in enumerate(images[:4]):
            _add(tf, name, data)
            _add(tf, f"{Path(name).stem}.cls", str(i % 3 if i < 3 else 7).encode())
    df = _build(tmp_path, source={"kind": "shards", "path": "b.tar", "classes": ["x", "y", "z"]})
    assert list(df["label"][:3]) == ["x", "y", "z"]
    assert df["error"].iloc[3].startswith("class index 7 not in `classes`")


def test_an_image_without_a_label_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    images = _images(per_class=2)
    _write_shards(tmp_path / "s", images, n=1, cls=False)
    df = _build(tmp_path, source={"kind": "shards", "path": "s"})
    assert df["error"].iloc[0] == "no label (diagonal/s000-0.cls)"
    assert all(e.startswith("no label (") for e in df["error"]) and len(df) == 6


# ----------------------------------------------------------------------------- hostile shards


def _hostile(path: Path, kind: str) -> str:
    """A shard with one good sample and one hostile member; the hostile member's name."""
    good = _png(np.zeros((8, 8), np.uint8))
    with tarfile.open(path, "w") as tf:
        _add(tf, "ok.png", good)
        _add(tf, "ok.cls", b"a")
        if kind in ("absolute", "dotdot", "twice"):
            name = {"absolute": "/etc/evil.png", "dotdot": "../evil.png", "twice": "ok.png"}[kind]
            _add(tf, name, good)
            return name
        info = tarfile.TarInfo("evil.png")
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}.get(
            kind, tarfile.CHRTYPE
        )
        info.linkname = "/etc/passwd" if kind != "device" else ""
        tf.addfile(info)
        return "evil.png"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "twice"])
def test_hostile_members_are_refused_naming_shard_and_member(tmp_path: Path, kind: str) -> None:
    name = _hostile(tmp_path / "bad.tar", kind)
    with pytest.raises(UnsafeShardError) as err:
        _build(tmp_path, source={"kind": "shards", "path": "bad.tar"})
    assert str(tmp_path / "bad.tar") in str(err.value) and repr(name) in str(err.value)
    assert not (tmp_path / "data/raw/bad").exists()


def test_compressed_and_damaged_shards_are_clear_errors(tmp_path: Path) -> None:
    _write_shards(tmp_path / "s", _images(per_class=1), n=1)
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "s/shard-000.tar", "x.tar")
    with pytest.raises(SourceError, match="compressed tar cannot be read in place"):
        _build(tmp_path, source={"kind": "shards", "path": "z.tar.gz"})
    (tmp_path / "gz.tar").write_bytes((tmp_path / "z.tar.gz").read_bytes())  # misnamed
    with pytest.raises(SourceError, match="compressed tar cannot be read in place"):
        _build(tmp_path, source={"kind": "shards", "path": "gz.tar"})
    data = (tmp_path / "s/shard-000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])  # header of the first member, half its data
    with pytest.raises(SourceError, match="cut.tar"):
        _build(tmp_path, source={"kind": "shards", "path": "cut.tar"})


# ----------------------------------------------------------------------------- URLs


def test_url_shards_are_downloaded_verified_and_read_in_place(tmp_path: Path) -> None:
    images = _images(per_class=2)
    built = _write_shards(tmp_path / "build", images, n=2)
    blobs = {p.name: p.read_bytes() for p in built}
    with local_server() as server:
        server.files.update(blobs)
        refs = [
            {"url": server.base + n, "sha256": hashlib.sha256(b).hexdigest()}
            for n, b in blobs.items()
        ]
        df = _build(tmp_path, source={"kind": "shards", "name": "web", "shards": refs})
        assert df["path"].iloc[0] == "data/raw/web/shard-000.tar/diagonal/s000-0.png"
        assert list(df["label"]) == [lab for lab, _, _ in images]
        n = len(server.requests)
        _build(tmp_path, source={"kind": "shards", "name": "web", "shards": refs})
        assert len(server.requests) == n  # verified from disk, not downloaded again
        bad = [{**refs[0], "url": server.base + "shard-001.tar", "sha256": "ab" * 32}]
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            _build(tmp_path, source={"kind": "shards", "name": "web2", "shards": bad})


# ----------------------------------------------------------------------------- the reader


def test_member_paths_cannot_collide_with_real_files(tmp_path: Path) -> None:
    data = _png(np.full((8, 8), 7, np.uint8))
    (tmp_path / "real.tar").mkdir()  # a folder may be called x.tar: its files are files
    (tmp_path / "real.tar/a.png").write_bytes(data)
    assert split_member(tmp_path / "real.tar/a.png") is None
    assert inspect_image(tmp_path / "real.tar/a.png", 10**6)["error"] == ""
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        _add(tf, "./dir/a.png", data)
    assert split_member(tmp_path / "s.tar/dir/a.png") == (str(tmp_path / "s.tar"), "dir/a.png")
    with open_image(tmp_path / "s.tar/dir/a.png", 100) as im:
        assert im.getpixel((0, 0)) == 7
    # an index handed over for some members only: another member is found by a full scan
    with tarfile.open(tmp_path / "t.tar", "w") as tf:
        _add(tf, "a.png", data)
        _add(tf, "b.png", _png(np.full((8, 8), 3, np.uint8)))
    shard = str(tmp_path / "t.tar")
    remember_members(shard, file_ident(os.stat(shard)), {"a.png": (512, len(data))})
    assert held_indexes()[shard][1] == {"a.png": (512, len(data))}
    with open_image(f"{shard}/b.png", 100) as im:
        assert im.getpixel((0, 0)) == 3
    assert len(held_indexes()[shard][1]) == 2
    with pytest.raises(FileNotFoundError, match=r"s\.tar has no regular member 'dir/b\.png'"):
        open_image(tmp_path / "s.tar/dir/b.png", 100).__enter__()
    assert inspect_image(tmp_path / "s.tar/dir/b.png", 100)["error"] == "missing file"
    # the shard is replaced (dvc checkout does): the reader indexes it again
    with tarfile.open(tmp_path / "s.tar.new", "w") as tf:
        _add(tf, "dir/a.png", _png(np.full((8, 8), 9, np.uint8)))
    os.replace(tmp_path / "s.tar.new", tmp_path / "s.tar")
    with open_image(tmp_path / "s.tar/dir/a.png", 100) as im:
        assert im.getpixel((0, 0)) == 9


def test_decode_cache_reads_members_in_worker_processes(tmp_path: Path) -> None:
    images = _images(per_class=30)
    _write_folder(tmp_path / "imgs", images)
    _write_shards(tmp_path / "shards", images)
    folder = _build(tmp_path, source="imgs")
    shards = _build(tmp_path, source={"kind": "shards", "path": "shards"})
    # two ingest workers take over the offsets the source read (a fresh copy: no ingest cache)
    shutil.rmtree(tmp_path / "data/raw")
    parallel = _build(tmp_path, source={"kind": "shards", "path": "shards"}, workers=2)
    pd.testing.assert_frame_equal(parallel, shards)
    a = decode_images(folder, tmp_path, 12, 1, tmp_path / "cache", workers=1, progress=False)
    b = decode_images(shards, tmp_path, 12, 1, tmp_path / "cache", workers=2, progress=False)
    assert a.shape == (90, 12, 12, 1)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.xdist_group("e2e")
def test_dvc_repro_on_shards_equals_repro_on_folders(tmp_path: Path) -> None:
    images = _images(per_class=24)
    out = {}
    for kind in ("folder", "shards"):
        source = "data/images" if kind == "folder" else {"kind": "shards", "path": "data/shards"}
        root = make_project(tmp_path / kind, data={"source": source, "group": GROUPS})
        if kind == "folder":
            _write_folder(root / "data/images", images)
        else:
            _write_shards(root / "data/shards", images)
        sh("dvc", "repro", cwd=root)
        out[kind] = {
            "manifest": _modulo_path(pd.read_csv(root / "data/interim/manifest.csv")),
            "splits": _modulo_path(pd.read_csv(root / "data/processed/splits.csv")),
            "metrics": json.loads((root / "metrics/eval.json").read_text()),
        }
    assert pd.read_csv(tmp_path / "shards/data/interim/manifest.csv")["path"].iloc[0] == (
        "data/shards/shard-000.tar/diagonal/s000-0.png"
    )
    pd.testing.assert_frame_equal(out["folder"]["manifest"], out["shards"]["manifest"])
    folder_splits = out["folder"]["splits"].set_index("path")["split"]
    shard_splits = out["shards"]["splits"].set_index("path")["split"]
    assert set(folder_splits) == {"train", "val", "test"}
    pd.testing.assert_series_equal(folder_splits, shard_splits)
    assert out["folder"]["metrics"] == out["shards"]["metrics"]


def test_a_shard_above_max_archive_bytes_is_refused(tmp_path: Path) -> None:
    _write_shards(tmp_path / "s", _images(per_class=2), n=1)
    with pytest.raises(UnsafeShardError, match="max_archive_bytes = 100"):
        _build(tmp_path, source={"kind": "shards", "path": "s"}, max_archive_bytes=100)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tar_header_format_is_read(tmp_path: Path, fmt: int) -> None:
    data = _png(np.full((8, 8), 5, np.uint8))
    deep = "/".join(["folder"] * 12) + "/" + "k" * 90  # > 100 characters: prefix / long name
    with tarfile.open(tmp_path / "s.tar", "w", format=fmt) as tf:
        for key, label in ((deep, "a"), ("x/ünï", "b")):
            _add(tf, f"{key}.png", data)
            _add(tf, f"{key}.cls", label.encode())
    df = _build(tmp_path, source={"kind": "shards", "path": "s.tar"})
    assert list(df["path"]) == [f"s.tar/{deep}.png", "s.tar/x/ünï.png"]
    assert list(df["label"]) == ["a", "b"] and (df["error"] == "").all()


def test_image_members_lists_what_predict_would_read(tmp_path: Path) -> None:
    images = _images(per_class=1)
    (shard,) = _write_shards(tmp_path, images, n=1)
    paths = image_members(shard)
    assert paths == [f"{shard}/{lab}/{Path(n).stem}.png" for lab, n, _ in images]
    with open_image(paths[1], 10**6) as im:
        assert im.size == (16, 16)
    _hostile(tmp_path / "bad.tar", "symlink")
    with pytest.raises(UnsafeShardError, match="evil.png"):
        image_members(tmp_path / "bad.tar")


def test_predict_reads_a_shard_in_place_like_its_files(tmp_path: Path) -> None:
    """`imgcls predict shard.tar`: one input per image member, decoded as the file would be."""
    from imgcls.inference.predict import expand_inputs, read_image

    images = _images(per_class=2)
    _write_folder(tmp_path / "files", images)
    (shard,) = _write_shards(tmp_path / "shards", images, n=1)
    inputs = expand_inputs([shard, tmp_path / "shards" / "missing.tar"])
    members = [i for i in inputs if i.error is None]
    assert len(members) == len(images)  # the .cls members are not images
    assert inputs[-1].error == "no such file or folder"
    for item, (label, name, _) in zip(members, images, strict=True):
        assert item.path == f"{shard}/{label}/{name}"
        from_file = read_image(str(tmp_path / "files" / label / name), 16, 1)
        np.testing.assert_array_equal(read_image(item.path, 16, 1), from_file)
    assert not list((tmp_path / "shards").glob("*/"))  # nothing extracted
