"""What `imgcls predict` reads: files, folders, globs and tar shards, expanded to one input each."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgcls.data.imageinfo import split_member
from imgcls.data.sources.common import SourceError
from imgcls.data.sources.shards import image_members, is_shard

# What a folder is searched for: the suffixes of the formats imgcls decodes (imageinfo's
# IMAGE_FORMATS); a file named explicitly is tried whatever its suffix.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp"}
)


@dataclass(frozen=True)
class InputFile:
    """One thing to predict: a file path as the user will recognise it, or why there is none."""

    path: str
    error: str | None = None


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _folder_images(folder: Path) -> list[Path]:
    """Image files under a folder, recursively, sorted; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found


def expand_inputs(specs: Sequence[str | Path]) -> list[InputFile]:
    """Files, folders (recursive) and globs (`**` allowed) -> unique inputs, in order given.

    A path that does not exist, a glob that matches nothing and a folder without images each
    become an input with an error, so they show up as their own row.
    """
    out: list[InputFile] = []
    seen: set[str] = set()

    def add(item: InputFile) -> None:
        if item.path not in seen:
            seen.add(item.path)
            out.append(item)

    for spec in map(str, specs):
        path = Path(spec)
        if path.is_dir():
            files = _folder_images(path)
            for f in files:
                add(InputFile(str(f)))
            if not files:
                add(InputFile(spec, "no image files (.png, .jpg, ...) in this folder"))
        elif path.is_file() and is_shard(path.name):  # read in place, never extracted
            try:
                members = image_members(path)  # headers checked; "<shard>/<member>" paths
            except SourceError as err:
                add(InputFile(spec, str(err)))
                continue
            for member in members:
                add(InputFile(member))
            if not members:
                add(InputFile(spec, "no image members in this shard"))
        elif path.exists() or split_member(spec) is not None:
            add(InputFile(spec))
        elif _is_glob(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for folder in (Path(m) for m in matches if Path(m).is_dir()):
                files += _folder_images(folder)
            for f in files:
                add(InputFile(str(f)))
            if not files:
                add(InputFile(spec, "no files match this pattern"))
        else:
            add(InputFile(spec, "no such file or folder"))
    return out
