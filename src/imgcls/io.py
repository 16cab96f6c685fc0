"""Atomic file writes: an interrupted stage never leaves a half-written output.

A write that fails because the disk (or the user's quota) is full becomes one
:class:`DiskFullError` naming the file, the bytes it needed when known and the bytes free,
instead of whatever the writing library says (torch: "basic_ios::clear: iostream error").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from imgcls.errors import ImgclsError

# errno values that mean "no room": full filesystem, exhausted quota, file-size limit.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(ImgclsError):
    """A write that failed for lack of space; the previous file, if any, is unchanged."""


def is_disk_full(err: BaseException) -> bool:
    """True if `err` is an OS error that means the disk or quota is full."""
    return isinstance(err, OSError) and err.errno in SPACE_ERRNOS


def free_bytes(path: Path | str) -> int | None:
    """Bytes free to this user on the filesystem that holds `path` (or its nearest parent)."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def disk_full_message(
    path: Path | str,
    needed: int | None = None,
    *,
    at_least: int | None = None,
    atomic: bool = True,
) -> str:
    """'cannot write X: no space left ... (needs N bytes, F bytes free there)' plus the fix.

    `atomic`: the write went to a temp file, so the message can promise the old file is intact.
    """
    free = free_bytes(path)
    if needed is not None:
        need = f"needs {needed:,} bytes, "
    elif at_least:
        need = f"needs more than the {at_least:,} bytes written before it failed, "
    else:
        need = ""
    have = f"{free:,} bytes free there" if free is not None else "free space unknown"
    kept = (
        f"Nothing was replaced: the previous {Path(path).name}, if any, is unchanged. "
        if atomic
        else ""
    )
    return (
        f"cannot write {path}: no space left on the disk ({need}{have}). {kept}Free some space "
        "(df -h shows which filesystem) or move the folder to a bigger disk, then run again."
    )


def ensure_free_space(path: Path | str, needed: int) -> None:
    """Raise :class:`DiskFullError` now if `needed` bytes cannot fit next to `path`."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskFullError(disk_full_message(path, needed))


@contextmanager
def explain_disk_full(path: Path | str, needed: int | None = None) -> Iterator[None]:
    """Turn a 'no space' OSError raised in the block into a :class:`DiskFullError` for `path`."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(disk_full_message(path, needed)) from None
        raise


@contextmanager
def atomic_path(path: Path | str, needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename over `path` if the block succeeds.

    `needed` (bytes, when the caller knows it) is checked against the free space first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needed is not None:
        ensure_free_space(path, needed)
    with explain_disk_full(path, needed):  # no inode left for the temp file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the usual permissions (0666 minus umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)  # atomic on POSIX within one filesystem
    except OSError as err:
        if not is_disk_full(err):
            raise
        written = _size(tmp_path)
        tmp_path.unlink(missing_ok=True)  # free what it took before measuring what is free
        raise DiskFullError(disk_full_message(path, needed, at_least=written)) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _size(path: Path) -> int | None:
    """Size of a file, or None if it is gone."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def _umask() -> int:
    """The process umask (reading it requires setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    """Atomically write UTF-8 text."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, data: Any) -> None:
    """Atomically write pretty, key-sorted JSON (stable diffs for `dvc metrics diff`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: Path | str, df: pd.DataFrame) -> None:
    """Atomically write a DataFrame as CSV without the index."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_csv(path: Path | str) -> pd.DataFrame:
    """Read a pipeline CSV with string columns kept as strings (no NaN for empty cells)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False).pipe(_restore_ints)


_INT_COLUMNS = ("width", "height")


def _restore_ints(df: pd.DataFrame) -> pd.DataFrame:
    """Turn the integer columns of the manifest back into nullable ints."""
    for col in _INT_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df
