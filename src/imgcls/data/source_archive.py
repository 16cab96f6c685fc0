"""Safe extraction of .zip / .tar / .tar.gz / .tgz archives.

Every member is checked *before* anything is written: absolute paths, `..` components, links that
point outside the target, special files and an uncompressed total above the configured limit are
refused with an error naming the archive and the member. Extraction goes to a temporary sibling
folder that replaces the target only when complete, so an interrupted or refused extraction never
leaves a half-filled dataset that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar.gz", ".tgz", ".tar", ".zip")
MARKER = ".imgcls-extracted.json"  # records which archive the folder came from (idempotence)
COPY_CHUNK = 1 << 20


class ArchiveError(ImgclsError):
    """An archive that cannot be read or extracted."""


class UnsafeArchiveError(ArchiveError):
    """An archive with a member that would land outside the target, or one that is too big."""


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
    return UnsafeArchiveError(
        f"{archive}: refused to extract member {member!r}: {why}. Nothing was extracted. "
        "An archive like this can overwrite files outside its folder (zip-slip); if you built "
        "it yourself, repack it with relative paths inside one folder and no links."
    )


def safe_member_name(archive: Path, name: str) -> str:
    """Return the member's normalised relative POSIX path, or raise if it could escape."""
    unified = name.replace("\\", "/")  # Windows-made archives may use backslashes
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise _refuse(archive, name, "absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "'..' path component")
    return "/".join(parts)


def _check_link(archive: Path, member: str, target: str, *, relative_to_member: bool) -> None:
    """Refuse a link whose target is absolute or resolves outside the extraction folder."""
    unified = target.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise _refuse(archive, member, f"link to absolute path {target!r}")
    base = posixpath.dirname(member) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, unified))
    if resolved == ".." or resolved.startswith("../"):
        raise _refuse(archive, member, f"link {target!r} points outside the target folder")


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


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    """Check every member of a zip, then stream them out (never trusting declared sizes)."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            name = safe_member_name(archive, info.filename)
            if _zip_is_link(info):
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, name, target, relative_to_member=True)
            total += info.file_size
        if total > max_bytes:
            raise _too_big(archive, total, max_bytes)
        written = 0
        for info in infos:
            name = safe_member_name(archive, info.filename)
            if not name:
                continue
            out = dest / name
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            if _zip_is_link(info):
                os.symlink(zf.read(info).decode("utf-8", "replace"), out)
                continue
            with zf.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:  # a header that lied about sizes
                        raise _too_big(archive, written, max_bytes)
                    dst.write(chunk)


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    """Check every member of a tar, then extract with tarfile's own `data` filter as a backstop."""
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        total = 0
        for m in members:
            name = safe_member_name(archive, m.name)
            if m.issym():
                _check_link(archive, name, m.linkname, relative_to_member=True)
            elif m.islnk():  # hard links name another member, relative to the archive root
                _check_link(archive, name, m.linkname, relative_to_member=False)
            elif not (m.isfile() or m.isdir()):
                raise _refuse(archive, m.name, "device, FIFO or other special file")
            total += m.size if m.isfile() else 0
        if total > max_bytes:
            raise _too_big(archive, total, max_bytes)
        try:
            tf.extractall(dest, filter="data")
        except tarfile.FilterError as err:  # something the checks above did not foresee
            member = err.tarinfo.name if getattr(err, "tarinfo", None) else "?"
            raise _refuse(archive, member, str(err)) from None


def _fingerprint(archive: Path) -> dict[str, object]:
    """What identifies an archive's contents cheaply: its path, size and modification time."""
    st = archive.stat()
    return {"archive": str(archive.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def extract_archive(archive: Path, target: Path, max_bytes: int) -> bool:
    """Safely extract `archive` into `target` (replacing it); False if it was already extracted."""
    marker = target / MARKER
    fingerprint = _fingerprint(archive)
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == fingerprint:
                return False
        except (OSError, ValueError):
            pass  # unreadable marker: extract again
    tmp = target.parent / f".{target.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("extracting %s -> %s", archive, target)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp, max_bytes)
        else:
            _extract_tar(archive, tmp, max_bytes)
        (tmp / MARKER).write_text(json.dumps(fingerprint), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise ArchiveError(
            f"{archive}: cannot extract ({type(err).__name__}: {err}). The file is damaged or "
            "not the archive type its name says; download or copy it again."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
