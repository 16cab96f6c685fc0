"""Folder sources: one sub-folder per class, optionally under train/ val/ test/.

Also the scan every other kind ends with (an archive, a download or generated PNGs all become
a folder of class sub-folders under data/raw/).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imgcls.config import SourceSpec
from imgcls.data.sources.common import (
    MAX_LOGGED_LINES,
    RESERVED_SEP_ERROR,
    SPLIT_DIRS,
    FoundFile,
    SourceError,
    inside,
    mirror_folder,
    under,
    visible,
    walk_files,
)
from imgcls.task import LABEL_SEP

log = logging.getLogger(__name__)


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and visible(e.name))


def _has_files(path: Path) -> bool:
    """True if a folder directly contains visible files."""
    with os.scandir(path) as it:
        return any(e.is_file() and visible(e.name) for e in it)


def data_root(base: Path) -> Path:
    """Skip wrapper folders: an archive often holds `name/<classes...>` rather than the classes."""
    while True:
        subs = _subdirs(base)
        if len(subs) != 1 or _has_files(base) or subs[0].name.lower() in SPLIT_DIRS:
            return base
        if not _subdirs(subs[0]):  # a single class folder is a class, not a wrapper
            return base
        base = subs[0]


def _extension(path: str) -> str:
    """Lower-case extension with its dot, or a placeholder for the log when there is none."""
    return os.path.splitext(path)[1].lower() or "(no extension)"


@dataclass
class ScanResult:
    """Files found in a folder plus what was skipped, for the log."""

    files: list[FoundFile]
    skipped: Counter[str]
    empty_classes: list[str]


def _scan_classes(folder: Path, split: str, exts: frozenset[str], out: ScanResult) -> None:
    """Collect images from `folder/<class>/**` (nested folders belong to their top class)."""
    with os.scandir(folder) as it:
        loose = sorted(e.path for e in it if e.is_file() and visible(e.name))
    for path in loose:
        if _extension(path) in exts:
            out.files.append(FoundFile(path, "", split, error="not in a class folder"))
        else:
            out.skipped[_extension(path)] += 1
    for class_dir in _subdirs(folder):
        before = len(out.files)
        label = class_dir.name
        for path in walk_files(class_dir):
            if _extension(path) in exts:
                out.files.append(FoundFile(path, label, split))
            else:
                out.skipped[_extension(path)] += 1
        if len(out.files) == before:
            out.empty_classes.append(str(class_dir))


def scan_folder(base: Path, extensions: Iterable[str], split: str | None = None) -> ScanResult:
    """Find labelled images in a class-per-folder tree, with an optional train/val/test level."""
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    out = ScanResult([], Counter(), [])
    top = data_root(base)
    subs = _subdirs(top)
    if subs and all(s.name.lower() in SPLIT_DIRS for s in subs) and not _has_files(top):
        for sub in subs:
            _scan_classes(sub, split or SPLIT_DIRS[sub.name.lower()], exts, out)
    else:
        _scan_classes(top, split or "", exts, out)
    return out


def log_scan(where: Path, scan: ScanResult) -> None:
    """Tell the user what a folder scan skipped, so nothing disappears silently."""
    if scan.skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(scan.skipped.items()))
        log.warning("%s: skipped files that are not images by extension: %s", where, kinds)
    for folder in scan.empty_classes:
        log.warning("%s: class folder has no images; it will not appear as a class", folder)


def local_folder(spec: SourceSpec, path: Path, root: Path, raw_dir: Path) -> Path:
    """A folder inside the repository is used in place; one outside is mirrored into data/raw."""
    if not path.is_dir():
        raise SourceError(f"data.source {spec.path!r}: {path} is not a folder")
    if inside(path, root):
        return path
    target = under(raw_dir, str(spec.name), spec)
    log.info("mirroring %s -> %s (it is outside the repository)", path, target)
    mirror_folder(path, target)
    return target


# ----------------------------------------------------------------------------- labels CSV


def reserved_folder_labels(files: list[FoundFile], where: Path) -> list[FoundFile]:
    """Multi-label: a class folder whose name holds "|" would read as several labels; refuse it."""
    bad = {f.label for f in files if LABEL_SEP in f.label and not f.error}
    if not bad:
        return files
    log.warning(
        "%s: class folder(s) %s contain '%s', which multi-label data reserves to join labels; "
        "their images are quarantined: rename the folders",
        where,
        ", ".join(sorted(map(repr, bad))[:MAX_LOGGED_LINES]),
        LABEL_SEP,
    )
    return [
        FoundFile(f.path, f.label, f.source_split, f.group, RESERVED_SEP_ERROR)
        if f.label in bad and not f.error
        else f
        for f in files
    ]


# ----------------------------------------------------------------------------- generated PNGs
