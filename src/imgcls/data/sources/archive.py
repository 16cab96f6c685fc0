"""Safe extraction of .zip / .tar / .tar.gz / .tgz archives.

The rule is deliberately simple, so that it holds whatever the order of the members:

- every member is checked *before* anything is written: absolute paths, `..` components,
  symbolic and hard links (images never need links, and a link lets a later member be written
  through it, outside the folder), devices and FIFOs, a path that is both a file and a folder,
  and an uncompressed total above `data.max_archive_bytes` are refused with an error naming the
  archive, the member and why;
- files are written by our own loop (never `tarfile.extractall`, whose `filter=` behaves
  differently across Python patch releases): each parent folder is resolved with realpath and
  must lie inside the extraction folder, and each file is opened with O_EXCL | O_NOFOLLOW;
- extraction goes to a fresh temporary sibling folder that is renamed into place only when
  complete, and the previous folder is kept until then, so a refused, damaged or interrupted
  extraction leaves the previous dataset as it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.sources.common import SourceError, under
from imgcls.errors import ImgclsError
from imgcls.io import DiskFullError, disk_full_message, ensure_free_space, is_disk_full

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar", ".zip")
MARKER = ".imgcls-extracted.json"  # records which archive the folder came from (idempotence)
COPY_CHUNK = 1 << 20
# O_NOFOLLOW: never write through a link at the last component; O_EXCL: never reuse a file.
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
LINK_WHY = (
    "{kind} link: links are refused in archives (images never need them, and a later member "
    "could be written through one to a place outside the folder)"
)


class ArchiveError(ImgclsError):
    """An archive that cannot be read or extracted."""


class UnsafeArchiveError(ArchiveError):
    """An archive with a member that would land outside the target, or one that is too big."""

    member: str = ""  # the refused member, as the archive spells it ("" for a size refusal)
    why: str = ""  # why it was refused (tar shards build their own message from these)


@dataclass(frozen=True)
class Member:
    """One checked archive member: where it goes, what it is, how big it says it is."""

    name: str  # normalised relative POSIX path ("" for the archive's root folder)
    is_dir: bool
    size: int
    ref: zipfile.ZipInfo | tarfile.TarInfo

    @property
    def label(self) -> str:
        """The member's name as the archive spells it (for messages)."""
        return self.ref.filename if isinstance(self.ref, zipfile.ZipInfo) else self.ref.name


def is_archive(name: str) -> bool:
    """True if the file name ends with a supported archive suffix."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """File name without its archive suffix (`rps.zip` -> `rps`, `x.tar.gz` -> `x`)."""
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _refuse(archive: Path, member: str, why: str) -> UnsafeArchiveError:
    """Build the error for one refused member."""
    err = UnsafeArchiveError(
        f"{archive}: refused to extract member {member!r}: {why}. Nothing was extracted and the "
        "previous extraction, if any, is unchanged. An archive like this can overwrite files "
        "outside its folder (zip-slip); if you built it yourself, repack it with relative paths "
        "inside one folder and no links (tar: --dereference --hard-dereference; zip: without -y)."
    )
    err.member, err.why = member, why
    return err


def safe_member_name(archive: Path, name: str) -> str:
    """Return the member's normalised relative POSIX path, or raise if it could escape."""
    if "\0" in name:
        raise _refuse(archive, name, "NUL character in the name")
    unified = name.replace("\\", "/")  # Windows-made archives may use backslashes
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise _refuse(archive, name, "absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "'..' path component")
    return "/".join(parts)


def _too_big(archive: Path, total: int, limit: int) -> UnsafeArchiveError:
    """Build the error for an archive whose contents exceed the size limit."""
    return UnsafeArchiveError(
        f"{archive}: unpacks to {total:,} bytes, more than data.max_archive_bytes = {limit:,}. "
        "Nothing was extracted. If you trust this archive, raise data.max_archive_bytes in "
        "params.yaml."
    )


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    """True if a zip member was stored as a Unix symbolic link."""
    return stat.S_ISLNK(info.external_attr >> 16)


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[Member]:
    """Check every zip member from its header alone (a link's target is never read)."""
    out = []
    for info in zf.infolist():
        name = safe_member_name(archive, info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise _refuse(archive, info.filename, LINK_WHY.format(kind="symbolic"))
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse(archive, info.filename, "device, FIFO or other special file")
        if info.flag_bits & 0x1:
            raise ArchiveError(
                f"{archive}: member {info.filename!r} is encrypted; imgcls does not take "
                "passwords. Extract it yourself and point data.source at the folder."
            )
        is_dir = info.is_dir()
        out.append(Member(name, is_dir, 0 if is_dir else info.file_size, info))
    return out


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[Member]:
    """Check every tar member from its header alone."""
    out = []
    for m in tf.getmembers():
        name = safe_member_name(archive, m.name)
        if m.issym():
            raise _refuse(archive, m.name, LINK_WHY.format(kind="symbolic"))
        if m.islnk():
            raise _refuse(archive, m.name, LINK_WHY.format(kind="hard"))
        if not (m.isfile() or m.isdir()):
            raise _refuse(archive, m.name, "device, FIFO or other special file")
        out.append(Member(name, m.isdir(), m.size if m.isfile() else 0, m))
    return out


def check_members(archive: Path, members: list[Member], max_bytes: int) -> int:
    """Refuse clashing paths and a total above `max_bytes`; return the total size in bytes."""
    kinds: dict[str, bool] = {}  # path -> is_dir, for every path a member creates
    for m in members:
        if not m.name:
            if not m.is_dir:
                raise _refuse(archive, m.label, "a file without a name")
            continue
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            if kinds.setdefault("/".join(parts[:i]), True) is False:
                raise _refuse(archive, m.label, f"{'/'.join(parts[:i])!r} is also a file")
        seen = kinds.get(m.name)
        if seen is not None and not (seen and m.is_dir):
            raise _refuse(
                archive, m.label, "the archive holds this path twice (or as file and folder)"
            )
        kinds[m.name] = m.is_dir
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise _too_big(archive, total, max_bytes)
    return total


def _inside(path: str, root: str) -> bool:
    """True if the real path `path` is `root` or below it."""
    return path == root or path.startswith(root + os.sep)


def _make_dirs(archive: Path, root: str, rel: str, made: set[str]) -> str:
    """Create `root/rel` folder by folder; refuse if any of it resolves outside `root`."""
    if rel in made or not rel:
        return os.path.join(root, rel) if rel else root
    here = root
    for part in rel.split("/"):
        here = os.path.join(here, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(here)
        if not stat.S_ISDIR(os.lstat(here).st_mode) or not _inside(os.path.realpath(here), root):
            raise _refuse(
                archive, rel, "a folder on its path is not a real folder inside the target"
            )
    made.add(rel)
    return here


def write_members(
    archive: Path,
    dest: Path,
    members: list[Member],
    open_member: Callable[[Member], IO[bytes]],
    max_bytes: int,
) -> None:
    """Write checked members under `dest`, never through a link, never past `max_bytes`."""
    root = os.path.realpath(dest)
    made: set[str] = set()
    written = 0
    for m in members:
        if m.is_dir:
            _make_dirs(archive, root, m.name, made)
            continue
        parent = _make_dirs(archive, root, posixpath.dirname(m.name), made)
        fd = os.open(os.path.join(parent, posixpath.basename(m.name)), OPEN_FLAGS, 0o666)
        with os.fdopen(fd, "wb") as dst, open_member(m) as src:
            while chunk := src.read(COPY_CHUNK):
                written += len(chunk)
                if written > max_bytes:  # a header that lied about sizes
                    raise _too_big(archive, written, max_bytes)
                dst.write(chunk)


def _write_checked(
    archive: Path,
    tmp: Path,
    target: Path,
    members: list[Member],
    open_member: Callable[[Member], IO[bytes]],
    max_bytes: int,
) -> None:
    """Check the members, the size cap and the free space, then write them into `tmp`."""
    total = check_members(archive, members, max_bytes)
    try:
        ensure_free_space(target, total)
        write_members(archive, tmp, members, open_member, max_bytes)
    except DiskFullError as err:
        raise DiskFullError(f"{archive}: {err}") from None
    except OSError as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # free its space before measuring what is free
        raise DiskFullError(f"{archive}: {disk_full_message(target, total)}") from None


def _open_zip_member(zf: zipfile.ZipFile, m: Member) -> IO[bytes]:
    """The data of a regular zip member."""
    return zf.open(m.ref)  # type: ignore[arg-type]


def _open_tar_member(tf: tarfile.TarFile, m: Member) -> IO[bytes]:
    """The data of a regular tar member."""
    fh = tf.extractfile(m.ref)  # type: ignore[arg-type]
    if fh is None:  # only links and special files have none, and those were refused
        raise tarfile.ReadError(f"no data for member {m.label!r}")
    return fh


def _extract(archive: Path, tmp: Path, target: Path, max_bytes: int) -> None:
    """Check every member from the headers, then stream the files into `tmp`."""
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = _zip_members(archive, zf)
            opener = partial(_open_zip_member, zf)
            _write_checked(archive, tmp, target, members, opener, max_bytes)
    else:
        with tarfile.open(archive, "r:*") as tf:
            members = _tar_members(archive, tf)
            _write_checked(archive, tmp, target, members, partial(_open_tar_member, tf), max_bytes)


def _fingerprint(archive: Path) -> dict[str, object]:
    """What identifies an archive's contents cheaply: its path, size and modification time."""
    st = archive.stat()
    return {"archive": str(archive.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remove(path: Path) -> None:
    """Delete a folder tree, a file or a link (never following the link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`; the old `target` is kept aside until that rename succeeded."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)  # put the previous folder back
        raise
    _remove(old)


def _clean_stale(target: Path) -> None:
    """Remove temporary folders that an earlier, killed extraction of `target` left behind."""
    name = glob.escape(target.name)
    for pattern in (f".{name}.*.extracting", f".{name}.*.old"):
        for stale in target.parent.glob(pattern):
            _remove(stale)


def _is_current(marker: Path, fingerprint: dict[str, object]) -> bool:
    """True if `marker` says the folder was extracted from exactly this archive."""
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):
        return False  # missing or unreadable marker: extract again


def extract_archive(archive: Path, target: Path, max_bytes: int) -> bool:
    """Safely extract `archive` into `target` (replacing it); False if it was already extracted."""
    fingerprint = _fingerprint(archive)
    if _is_current(target / MARKER, fingerprint):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
    log.info("extracting %s -> %s", archive, target)
    try:
        _extract(archive, tmp, target, max_bytes)
        (tmp / MARKER).write_text(json.dumps(fingerprint), encoding="utf-8")
        swap_into_place(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # free its space before measuring what is free
        if is_disk_full(err):
            raise DiskFullError(f"{archive}: {disk_full_message(target)}") from None
        raise _damaged(archive, err) from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError) as err:
        raise _damaged(archive, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _damaged(archive: Path, err: BaseException) -> ArchiveError:
    """The error for an archive that cannot be read."""
    return ArchiveError(
        f"{archive}: cannot extract ({type(err).__name__}: {err}). The file is damaged or "
        "not the archive type its name says; download or copy it again."
    )


def archive_source(spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path) -> Path:
    """Extract a local archive into data/raw/<name>/."""
    archive = root / str(spec.path)
    if not archive.is_file():
        raise SourceError(f"data.source {spec.path!r}: archive {archive} does not exist")
    target = under(raw_dir, str(spec.name), spec)
    extract_archive(archive, target, cfg.max_archive_bytes)
    return target
