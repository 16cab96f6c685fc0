"""What every source kind shares: the found-file record, naming rules under data/raw, walking.

A source ends up as a list of :class:`FoundFile` (an image path plus what the source says about
it); opening and hashing the images is the manifest's job (:mod:`imgcls.data.manifest`).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from imgcls.config import GroupConfig, SourceSpec
from imgcls.errors import ImgclsError
from imgcls.io import explain_disk_full
from imgcls.task import LABEL_SEP

log = logging.getLogger(__name__)

SPLIT_DIRS: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
JUNK_DIRS = frozenset({"__MACOSX", "__pycache__"})  # archive tool droppings, never classes
DOWNLOADS = "downloads"  # folder under data/raw/ that caches downloaded files
# Error (quarantine reason) of a multi-label row whose label holds the reserved joiner "|".
RESERVED_SEP_ERROR = f"label contains '{LABEL_SEP}' (reserved to join labels)"
MAX_LOGGED_LINES = 5  # CSV line numbers named per warning


class SourceError(ImgclsError):
    """A `data.source` entry that cannot be resolved or read."""


@dataclass(frozen=True)
class FoundFile:
    """One image file a source delivered, with what the source says about it."""

    path: str  # absolute (a plain string: 70,000 Path objects cost seconds on re-ingest)
    label: str
    source_split: str = ""  # "", "train", "val" or "test"
    group: str = ""  # from a labels CSV; "" = derive from the group rule
    error: str = ""  # a problem known before decoding ("missing file", "not in a class folder")
    rule: GroupConfig | None = None  # the group rule that applies to this file


def unplain(spec: SourceSpec, name: str, what: str) -> SourceError:
    """The error for a name that is not a plain folder / file name under data/raw/."""
    where = spec.url or spec.path or spec.preset or spec.kind
    return SourceError(
        f"data.source {where}: {what} {name!r} is not a plain file name (it must not be empty, "
        "contain '/', '\\' or control characters, start with a dot, or be "
        f"{DOWNLOADS!r}), so it could put files outside data/raw/. Give the source a plain "
        "`name:`; for a URL, download the file yourself and point `path:` at it."
    )


def checked_name(spec: SourceSpec, name: str, what: str = "the name") -> str:
    """`name` if it is a plain name by the same rule as an explicit `name:`; else raise."""
    try:
        SourceSpec.model_validate({**spec.model_dump(exclude_unset=True), "name": name})
    except ValidationError:
        raise unplain(spec, name, what) from None
    if name == DOWNLOADS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise unplain(spec, name, what)
    return name


def visible(name: str) -> bool:
    """False for hidden files / folders and archive-tool junk (`.DS_Store`, `__MACOSX`)."""
    return not name.startswith(".") and name not in JUNK_DIRS


def walk_files(folder: Path | str) -> Iterable[str]:
    """Every visible file under `folder`, depth-first in sorted order (deterministic manifests)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if visible(d))
        for name in sorted(filenames):
            if visible(name):
                yield os.path.join(dirpath, name)


def worker_count(requested: int) -> int:
    """Worker processes to use: `data.workers`, or the CPUs this process may use when 0."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def inside(path: Path, root: Path) -> bool:
    """True if `path` is `root` or below it (lexically; no symlinks resolved)."""
    return os.path.commonpath([path, root]) == str(root)


def mirror_file(src: str, dst: Path) -> None:
    """Make `dst` a copy of the file `src` (a hard link where possible; kept when unchanged)."""
    st = os.stat(src)
    try:
        old = os.lstat(dst)
    except FileNotFoundError:
        old = None
    if old is not None:
        if stat.S_ISREG(old.st_mode) and (old.st_size, old.st_mtime_ns) == (
            st.st_size,
            st.st_mtime_ns,
        ):
            return
        os.unlink(dst)  # also a link someone left there: never write through it
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy (keeps mtime)
        shutil.copy2(src, dst)


def prune(folder: Path, wanted: set[Path]) -> None:
    """Delete the files under `folder` that are not in `wanted` (gone from the source)."""
    for name in list(walk_files(folder)):
        if Path(name) not in wanted:
            os.unlink(name)


def mirror_folder(src: Path, dst: Path) -> None:
    """Make `dst` an up-to-date copy of `src` (hard links where possible; unchanged files kept)."""
    wanted: set[Path] = set()
    with explain_disk_full(dst):
        for name in walk_files(src):
            out = dst / Path(name).relative_to(src)
            mirror_file(name, out)
            wanted.add(out)
        prune(dst, wanted)


def under(folder: Path, name: str, spec: SourceSpec) -> Path:
    """`folder/name`, after checking that it resolves to a direct child of `folder`."""
    path = folder / name
    if os.path.realpath(path.parent) != os.path.realpath(folder) or path.name != name:
        raise unplain(spec, name, "the name")  # belt and braces: checked_name refused it earlier
    return path
