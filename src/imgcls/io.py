"""Atomic file writes: an interrupted stage never leaves a half-written output."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename over `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the usual permissions (0666 minus umask).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)  # atomic on POSIX within one filesystem
    finally:
        tmp_path.unlink(missing_ok=True)


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
