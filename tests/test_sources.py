"""Data sources on real archives, real IDX files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import _imagefactory as fac
from _localhttp import Server, local_server
from imgcls.config import DataConfig, GroupConfig
from imgcls.data.manifest import build_manifest, group_of
from imgcls.data.sources import (
    FoundFile,
    SourceError,
    generated,
    presets,
    read_idx,
    resolve_sources,
)
from imgcls.data.sources.archive import ArchiveError, UnsafeArchiveError, extract_archive
from imgcls.data.sources.download import (
    ChecksumError,
    DownloadError,
    check_redirect,
    check_url,
    download,
)


def _build(root: Path, **data: object) -> pd.DataFrame:
    """Build a manifest for a repository rooted at `root` with the given `data:` params."""
    cfg = DataConfig.model_validate({"workers": 1, **data})
    return build_manifest(cfg, root, root / "data" / "raw", progress=False)


def _sha(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dataset(folder: Path) -> Path:
    """A small class-per-folder dataset: 2 classes x 2 images."""
    fac.class_folder(folder, "cat", 2)
    fac.class_folder(folder, "dog", 2)
    return folder


def _zip_folder(src: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under `src` (member names relative to src, under `prefix`)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(src).as_posix())
    return archive


# ----------------------------------------------------------------------------- archives


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz"])
def test_archive_source_is_extracted_and_listed(tmp_path: Path, suffix: str) -> None:
    src = _dataset(tmp_path / "build")
    archive = tmp_path / f"pets{suffix}"
    if suffix == ".zip":
        _zip_folder(src, archive, prefix="pets/")
    else:
        mode = "w" if suffix == ".tar" else "w:gz"
        with tarfile.open(archive, mode) as tf:
            tf.add(src, arcname="pets")
    df = _build(tmp_path, source=f"pets{suffix}")
    assert len(df) == 4 and (df["error"] == "").all()
    assert set(df["label"]) == {"cat", "dog"}
    assert all(p.startswith("data/raw/pets/pets/") for p in df["path"])


def test_archive_is_not_extracted_again_when_unchanged(tmp_path: Path) -> None:
    archive = _zip_folder(_dataset(tmp_path / "build"), tmp_path / "pets.zip")
    target = tmp_path / "raw" / "pets"
    assert extract_archive(archive, target, 10**9) is True
    assert extract_archive(archive, target, 10**9) is False
    fac.png(tmp_path / "build" / "cat" / "new.png")
    _zip_folder(tmp_path / "build", archive)  # rewritten: new size / mtime
    assert extract_archive(archive, target, 10**9) is True
    assert (target / "cat" / "new.png").is_file()


def test_zip_slip_member_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # four levels up from the extraction folder is still in tmp_path
    repo.mkdir()
    with zipfile.ZipFile(repo / "evil.zip", "w") as zf:
        zf.writestr("good/a.png", b"x")
        zf.writestr("../../../../escaped.png", b"x")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.' path component") as err:
        _build(repo, source="evil.zip")
    assert "evil.zip" in str(err.value) and "escaped.png" in str(err.value)
    assert list(tmp_path.rglob("escaped.png")) == []
    assert not (repo / "data" / "raw" / "evil").exists()


def test_absolute_member_path_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "abs.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("/tmp/imgcls-absolute.png")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        extract_archive(archive, tmp_path / "out", 10**9)
    assert not (tmp_path / "out").exists()


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    """Add a member stored as a Unix symbolic link to `target`."""
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16
    zf.writestr(info, target)


def test_chained_zip_symlinks_cannot_write_outside_the_target(tmp_path: Path) -> None:
    # Each link is lexically inside the archive, but every later one is created *through* the
    # earlier ones: a/b -> .. is the target itself, a/b/c -> .. its parent, and so on. The file
    # at the end of the chain would land four levels above the extraction folder: in tmp_path.
    repo = tmp_path / "repo"
    repo.mkdir()
    chain = ["a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "a/b/c/d/e/f"]
    with zipfile.ZipFile(repo / "chain.zip", "w") as zf:
        for name in chain:
            _zip_symlink(zf, name, "..")
        zf.writestr("a/b/c/d/e/f/escaped.txt", b"written through a link chain")
    with pytest.raises(UnsafeArchiveError, match="link") as err:
        _build(repo, source="chain.zip")
    assert "'a/b'" in str(err.value) and "chain.zip" in str(err.value)
    assert list(tmp_path.rglob("escaped.txt")) == []
    assert not (repo / "data" / "raw" / "chain").exists()


@pytest.mark.parametrize(
    ("link_type", "linkname", "why"),
    [
        (tarfile.SYMTYPE, "../../../../etc/passwd", "symbolic link"),
        (tarfile.SYMTYPE, "../cat/cat_000.png", "symbolic link"),  # even one inside the archive
        (tarfile.LNKTYPE, "ds/cat/cat_000.png", "hard link"),
    ],
)
def test_tar_link_members_are_refused(
    tmp_path: Path, link_type: bytes, linkname: str, why: str
) -> None:
    src = _dataset(tmp_path / "build")
    with tarfile.open(tmp_path / "links.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="ds")
        info = tarfile.TarInfo("ds/dog/alias.png")
        info.type = link_type
        info.linkname = linkname
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match=why) as err:
        _build(tmp_path, source="links.tar.gz")
    assert "'ds/dog/alias.png'" in str(err.value) and "no links" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "links").exists()


def test_zip_symlink_is_refused_without_reading_it(tmp_path: Path) -> None:
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        _zip_symlink(zf, "cat/evil.png", "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_archive(archive, tmp_path / "out", 10**9)
    assert not (tmp_path / "out").exists()


def test_refused_archive_leaves_the_previous_extraction_in_place(tmp_path: Path) -> None:
    archive = _zip_folder(_dataset(tmp_path / "build"), tmp_path / "pets.zip")
    target = tmp_path / "raw" / "pets"
    extract_archive(archive, target, 10**9)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/new.png", b"x")
        _zip_symlink(zf, "dog/link.png", "../cat/new.png")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, target, 10**9)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert [p.name for p in target.parent.iterdir()] == ["pets"]  # no temporary folder left


def test_oversized_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.png", b"\0" * 200_000)  # compresses to a few hundred bytes
    with pytest.raises(UnsafeArchiveError, match="max_archive_bytes") as err:
        _build(tmp_path, source="big.zip", max_archive_bytes=100_000)
    assert "200,000" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "big").exists()


def test_damaged_archive_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArchiveError, match="cannot extract"):
        _build(tmp_path, source="broken.zip")


# ----------------------------------------------------------------------------- HTTP server


@pytest.fixture()
def server() -> Iterator[Server]:
    """A real HTTP server on 127.0.0.1 serving what the test puts in `files`."""
    with local_server() as state:
        yield state


@pytest.fixture()
def pets_zip(tmp_path: Path) -> bytes:
    """Bytes of a zip holding a small two-class dataset (a few hundred kB so it streams)."""
    src = tmp_path / "build"
    for label in ("cat", "dog"):
        for i in range(3):
            fac.png(
                src / label / f"{label}{i}.png", (128, 128), seed=i + (10 if label == "dog" else 0)
            )
    return _zip_folder(src, tmp_path / "pets-build.zip").read_bytes()


def _url_source(server: Server, data: bytes, sha: str | None = None) -> list[dict[str, str]]:
    """Serve `data` as pets.zip and return a data.source list pointing at it."""
    server.files["pets.zip"] = data
    digest = hashlib.sha256(data).hexdigest() if sha is None else sha
    return [{"url": server.base + "pets.zip", "sha256": digest}]


def test_url_source_is_downloaded_verified_extracted_and_cached(
    tmp_path: Path, server: Server, pets_zip: bytes
) -> None:
    src = _url_source(server, pets_zip)
    cfg = DataConfig(source=src, workers=1)
    df = build_manifest(cfg, tmp_path, tmp_path / "data" / "raw", progress=True)  # with bars
    assert len(df) == 6 and set(df["label"]) == {"cat", "dog"}
    cached = tmp_path / "data" / "raw" / "downloads" / "pets.zip"
    assert cached.read_bytes() == pets_zip
    assert all(p.startswith("data/raw/pets/") for p in df["path"])
    n = len(server.requests)
    again = _build(tmp_path, source=src)
    assert len(server.requests) == n  # verified from the cache, not downloaded again
    pd.testing.assert_frame_equal(df, again)


def test_interrupted_download_resumes_with_a_range_request(
    tmp_path: Path, server: Server, pets_zip: bytes
) -> None:
    src = _url_source(server, pets_zip)
    half = len(pets_zip) // 2
    server.cut_after = half
    with pytest.raises(DownloadError, match="interrupted after") as err:
        _build(tmp_path, source=src)
    assert "Run ingest again to resume" in str(err.value)
    part = tmp_path / "data" / "raw" / "downloads" / "pets.zip.part"
    assert part.stat().st_size == half
    df = _build(tmp_path, source=src)
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert len(df) == 6
    assert _sha(tmp_path / "data" / "raw" / "downloads" / "pets.zip") == _sha_bytes(pets_zip)
    assert not part.exists()


def _sha_bytes(data: bytes) -> str:
    """SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_names_both_digests_deletes_the_file_and_keeps_outputs(
    tmp_path: Path, server: Server, pets_zip: bytes
) -> None:
    good = _build(tmp_path, source=_url_source(server, pets_zip))
    extracted = sorted((tmp_path / "data" / "raw" / "pets").rglob("*.png"))
    (tmp_path / "data" / "raw" / "downloads" / "pets.zip").unlink()  # force a fresh download
    tampered = pets_zip[:-10] + b"0123456789"
    wrong = _sha_bytes(pets_zip)
    with pytest.raises(ChecksumError) as err:
        _build(tmp_path, source=_url_source(server, tampered, sha=wrong))
    msg = str(err.value)
    assert wrong in msg and _sha_bytes(tampered) in msg
    downloads = tmp_path / "data" / "raw" / "downloads"
    assert not (downloads / "pets.zip").exists() and not (downloads / "pets.zip.part").exists()
    assert sorted((tmp_path / "data" / "raw" / "pets").rglob("*.png")) == extracted
    assert len(good) == 6


def _closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_error_says_how_to_supply_the_file_by_hand(tmp_path: Path, pets_zip: bytes) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/pets.zip"
    src = [{"url": url, "sha256": _sha_bytes(pets_zip)}]
    with pytest.raises(DownloadError, match="could not reach the URL") as err:
        _build(tmp_path, source=src)
    dest = tmp_path / "data" / "raw" / "downloads" / "pets.zip"
    assert f"copy it to {dest}" in str(err.value)
    dest.write_bytes(pets_zip)  # what the message says to do
    assert len(_build(tmp_path, source=src)) == 6


def test_offline_error_names_every_missing_file_at_once(tmp_path: Path, pets_zip: bytes) -> None:
    # the rps preset's shape: two archives, both unreachable; the user must learn of both
    port = _closed_port()
    names = ["pets.zip", "pets-test-set.zip"]
    src = [{"url": f"http://127.0.0.1:{port}/{n}", "sha256": _sha_bytes(pets_zip)} for n in names]
    with pytest.raises(DownloadError, match="could not reach 2 URLs") as err:
        _build(tmp_path, source=src)
    downloads = tmp_path / "data" / "raw" / "downloads"
    for name in names:
        assert f"/{name} -> {downloads / name} (sha256 {_sha_bytes(pets_zip)})" in str(err.value)
    for name in names:  # what the message says to do
        (downloads / name).write_bytes(pets_zip)
    assert len(_build(tmp_path, source=src)) == 12


def test_missing_sha256_reports_the_digest_to_pin(
    tmp_path: Path, server: Server, pets_zip: bytes
) -> None:
    server.files["pets.zip"] = pets_zip
    with pytest.raises(DownloadError, match=f"add `sha256: {_sha_bytes(pets_zip)}`"):
        _build(tmp_path, source=server.base + "pets.zip")
    n = len(server.requests)
    df = _build(tmp_path, source=_url_source(server, pets_zip))
    assert len(df) == 6 and len(server.requests) == n  # pinned: no second download


def test_http_error_status_is_reported(tmp_path: Path, server: Server) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.base + "nope.zip", "0" * 64, tmp_path / "nope.zip", progress=False)


def test_only_https_is_accepted_except_for_localhost() -> None:
    check_url("https://example.org/a.zip")
    check_url("http://localhost:8000/a.zip")
    with pytest.raises(DownloadError, match="only https"):
        check_url("http://example.org/a.zip")
    with pytest.raises(DownloadError, match="only https"):
        check_url("ftp://example.org/a.zip")


TRAVERSAL = "d/..%2F..%2F..%2Fvictim%2Fimportant.zip"  # decodes to ../../../victim/important.zip


@pytest.mark.parametrize("explicit_name", [None, "pets"])
def test_url_file_name_that_traverses_is_refused_before_anything_is_written(
    tmp_path: Path, server: Server, pets_zip: bytes, explicit_name: str | None
) -> None:
    repo = tmp_path / "repo"
    victim = tmp_path / "victim" / "important"  # data/raw/downloads/../../../victim/important
    (victim / "keep.txt").parent.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious", encoding="utf-8")
    server.files[TRAVERSAL] = pets_zip
    spec = {"url": server.base + TRAVERSAL, "sha256": _sha_bytes(pets_zip)}
    if explicit_name:
        spec["name"] = explicit_name
    with pytest.raises(SourceError, match="not a plain file name") as err:
        _build(repo, source=[spec])
    assert "../../../victim/important.zip" in str(err.value)
    assert (victim / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["important"]  # no .zip beside it
    assert not (repo / "victim").exists()  # data/raw/downloads/../../../victim
    assert server.requests == []  # refused before any download


def test_url_names_are_checked_like_explicit_names() -> None:
    for url in ("https://h.example/%2E%2E", "https://h.example/a/.hidden.zip"):
        with pytest.raises(SourceError, match="not a plain file name"):
            resolve_sources(DataConfig(source=url), Path("/nonexistent"))
    (spec,) = resolve_sources(DataConfig(source="https://h.example/my%20pets.zip"), Path("/x"))
    assert spec.name == "my pets"  # percent-decoding itself is fine


def test_redirect_to_anything_but_https_is_refused(
    tmp_path: Path, server: Server, pets_zip: bytes
) -> None:
    sha = _sha_bytes(pets_zip)
    server.files["pets.zip"] = pets_zip
    server.redirects["moved.zip"] = server.base + "pets.zip"  # loopback -> loopback: allowed
    dest = tmp_path / "moved.zip"
    download(server.base + "moved.zip", sha, dest, progress=False)
    assert dest.read_bytes() == pets_zip
    for target in (f"ftp://127.0.0.1:{_closed_port()}/pets.zip", "http://example.org/pets.zip"):
        server.redirects["evil.zip"] = target
        with pytest.raises(DownloadError, match="redirected to") as err:
            download(server.base + "evil.zip", sha, tmp_path / "evil.zip", progress=False)
        assert target in str(err.value) and "https" in str(err.value)
        assert not (tmp_path / "evil.zip").exists()


def test_https_may_only_redirect_to_https() -> None:
    check_redirect("https://example.org/a.zip", "https://cdn.example.org/a.zip")
    check_redirect("http://127.0.0.1:8000/a.zip", "http://localhost:8000/b.zip")
    for target in ("http://example.org/a.zip", "http://127.0.0.1/a.zip", "file:///etc/passwd"):
        with pytest.raises(DownloadError, match="redirected to"):
            check_redirect("https://example.org/a.zip", target)


@pytest.mark.parametrize("send_length", [True, False])
def test_download_growing_past_max_download_bytes_is_stopped(
    tmp_path: Path, server: Server, pets_zip: bytes, send_length: bool
) -> None:
    server.send_length = send_length
    src = _url_source(server, pets_zip)
    limit = len(pets_zip) // 2
    with pytest.raises(DownloadError, match="max_download_bytes") as err:
        _build(tmp_path, source=src, max_download_bytes=limit)
    assert f"{limit:,}" in str(err.value)
    downloads = tmp_path / "data" / "raw" / "downloads"
    assert not (downloads / "pets.zip").exists() and not (downloads / "pets.zip.part").exists()
    assert len(_build(tmp_path, source=src, max_download_bytes=len(pets_zip))) == 6


def test_max_download_bytes_is_a_data_parameter() -> None:
    assert DataConfig().max_download_bytes == 4 * 1024**3
    with pytest.raises(ValueError, match="max_download_bytes"):
        DataConfig(max_download_bytes=0)


# ----------------------------------------------------------------------------- labels CSV


def test_labels_csv_listing_images_outside_the_repository_mirrors_them(tmp_path: Path) -> None:
    share = tmp_path / "share"  # e.g. a CSV exported from a shared drive
    cat = fac.png(share / "cat" / "c1.png", seed=1)
    dog = fac.png(share / "dog" / "d1.png", seed=2)
    repo = tmp_path / "repo"
    own = fac.png(repo / "data" / "raw" / "labels" / "fox" / "f1.png", seed=3)  # kept in place
    unlisted = fac.png(repo / "data" / "raw" / "labels" / "fox" / "f2.png", seed=4)
    rows = [f"{cat},cat", "../share/dog/d1.png,dog", f"{share / 'gone.png'},cat", f"{own},fox"]
    (repo / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    df = _build(repo, source="labels.csv").set_index("label", drop=False)
    assert all(p.startswith("data/raw/labels/") for p in df["path"])
    assert df.loc["fox", "path"] == "data/raw/labels/fox/f1.png" and own.is_file()
    ok = df[(df["error"] == "") & (df["label"] != "fox")]
    assert sorted(ok["label"]) == ["cat", "dog"]
    for _, row in ok.iterrows():
        original = cat if row["label"] == "cat" else dog
        assert (repo / row["path"]).read_bytes() == original.read_bytes()
        assert row["sha256"] == _sha(original)
    assert df.loc[df["path"].str.endswith("gone.png"), "error"].tolist() == ["missing file"]
    cat.unlink()  # gone from the share: its mirror goes too, on the next ingest
    again = _build(repo, source="labels.csv")
    assert (again["error"] == "missing file").sum() == 2
    assert not any((repo / "data" / "raw" / "labels").rglob("c1.png"))
    assert own.is_file() and unlisted.is_file()  # the user's own files there are never pruned


# ----------------------------------------------------------------------------- IDX


def _write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write an array as a gzip-compressed IDX file (the MNIST format)."""
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())
    return path


def _idx_folder(folder: Path) -> Path:
    """train (6 images) and t10k (3 images) IDX files with labels 0..2."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 3)
    return folder


def test_idx_files_become_png_files_with_splits(tmp_path: Path) -> None:
    _idx_folder(tmp_path / "mnistish")
    src = [{"kind": "idx", "path": "mnistish", "name": "mn", "classes": ["a", "b", "c"]}]
    df = _build(tmp_path, source=src)
    assert len(df) == 9 and (df["error"] == "").all()
    assert df.groupby("source_split").size().to_dict() == {"test": 3, "train": 6}
    assert set(df["label"]) == {"a", "b", "c"}
    assert set(df["mode"]) == {"L"} and set(df["width"]) == {28}
    assert all(p.startswith("data/raw/mn/") for p in df["path"])
    auto = _build(tmp_path, source="mnistish")  # a folder of IDX files is recognised
    assert set(auto["label"]) == {"0", "1", "2"}


def test_idx_pngs_written_by_worker_processes_are_identical(tmp_path: Path, monkeypatch) -> None:
    _idx_folder(tmp_path / "a" / "mn")
    _idx_folder(tmp_path / "b" / "mn")
    serial = _build(tmp_path / "a", source="mn")
    monkeypatch.setattr(generated, "PARALLEL_WRITE_MIN", 1)
    parallel = _build(tmp_path / "b", source="mn", workers=2)
    pd.testing.assert_frame_equal(serial, parallel)  # same paths, same bytes (sha256)


def test_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((4, 5, 5), np.uint8))
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-7]))
    with pytest.raises(SourceError, match="truncated or damaged"):
        read_idx(path)


# ----------------------------------------------------------------------------- presets


def test_rps_preset_expands_to_the_two_canonical_archives(tmp_path: Path) -> None:
    specs = resolve_sources(DataConfig(source="rps"), tmp_path)
    assert [s.url.rsplit("/", 1)[-1] for s in specs] == ["rps.zip", "rps-test-set.zip"]
    assert [s.split for s in specs] == [None, "test"]
    assert specs[0].sha256 == "c2403444395842ad04c53612bad54b574443eae17a0723117a2ff87b9d72194f"
    assert all(s.url.startswith("https://storage.googleapis.com/") for s in specs)
    rule = specs[0].group
    assert rule is not None and rule.by == "regex"

    def group(name: str) -> str:
        return group_of(f"data/raw/rps/rps/rock/{name}", FoundFile(Path(name), "rock"), rule)

    assert group("rock01-000.png") == group("paper01-080.png") == "01"
    assert group("scissors04-012.png") == "04"
    assert group("testrock01-00.png") == "test01"
    # an explicit data.group wins over the preset's hand-id rule
    explicit = resolve_sources(DataConfig(source="rps", group={"by": "parent_dir"}), tmp_path)
    assert all(s.group is None for s in explicit)


def test_fashion_mnist_preset_prefers_a_local_copy(tmp_path: Path, monkeypatch) -> None:
    local = _idx_folder(tmp_path / "share" / "fashion-mnist")
    monkeypatch.setattr(presets, "FASHION_LOCAL_DIRS", (local,))
    (spec,) = resolve_sources(DataConfig(source="fashion-mnist"), tmp_path)
    assert spec.kind == "idx" and spec.path == str(local)
    assert spec.classes == presets.FASHION_CLASSES
    monkeypatch.setattr(presets, "FASHION_LOCAL_DIRS", (tmp_path / "absent",))
    (spec,) = resolve_sources(DataConfig(source="fashion-mnist"), tmp_path)
    assert spec.path is None and spec.url == presets.FASHION_BASE
    assert spec.url.startswith("https://")


def test_fashion_mnist_local_copy_is_ingested(tmp_path: Path, monkeypatch) -> None:
    local = _idx_folder(tmp_path / "share" / "fashion-mnist")
    monkeypatch.setattr(presets, "FASHION_LOCAL_DIRS", (local,))
    df = _build(tmp_path, source="fashion-mnist")
    assert len(df) == 9
    assert set(df["label"]) == {"tshirt_top", "trouser", "pullover"}
    assert all(p.startswith("data/raw/fashion-mnist/") for p in df["path"])


# ----------------------------------------------------------------------------- resolving


def test_short_forms_are_resolved_by_what_they_point_at(tmp_path: Path) -> None:
    _dataset(tmp_path / "folder")
    cfg = DataConfig(
        source=["digits", "folder", "x.zip", "y.tar.gz", "labels.csv", "https://h.example/z.tgz"]
    )
    kinds = [(s.kind, s.name) for s in resolve_sources(cfg, tmp_path)]
    assert kinds == [
        ("digits", "digits"),
        ("folder", "folder"),
        ("archive", "x"),
        ("archive", "y"),
        ("csv", "labels"),
        ("url", "z"),
    ]


def test_resolution_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        resolve_sources(DataConfig(source="no/such/folder"), tmp_path)
    with pytest.raises(SourceError, match="unknown preset"):
        resolve_sources(DataConfig(source={"kind": "preset", "preset": "cifar"}), tmp_path)
    with pytest.raises(SourceError, match="different `name:`"):
        resolve_sources(DataConfig(source=["digits", "digits"]), tmp_path)
    with pytest.raises(SourceError, match="empty list"):
        resolve_sources(DataConfig(source=[]), tmp_path)


def test_several_sources_are_combined(tmp_path: Path) -> None:
    _dataset(tmp_path / "extra")
    df = _build(tmp_path, source=["digits", {"path": "extra", "split": "test"}])
    assert len(df) == 1797 + 4
    assert set(df.loc[df["label"].isin(["cat", "dog"]), "source_split"]) == {"test"}
    assert GroupConfig().by == "none"
