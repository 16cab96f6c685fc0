"""Labels-CSV sources: `path,label[,group][,split]` rows; images outside the repo are mirrored."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.sources.common import (
    MAX_LOGGED_LINES,
    RESERVED_SEP_ERROR,
    SPLIT_DIRS,
    FoundFile,
    SourceError,
    inside,
    mirror_file,
    prune,
    under,
)
from imgcls.io import explain_disk_full
from imgcls.task import LABEL_SEP, join_labels

log = logging.getLogger(__name__)

ABS_DIR = "_abs"  # data/raw/<csv source>/_abs/<absolute path>: mirrors of images listed by path


def parse_label_cell(cell: str, multi_label: bool, separator: str = LABEL_SEP) -> tuple[str, str]:
    """A labels CSV `label` cell -> (manifest label, error); multi-label: the canonical set.

    Multi-label: `"dog; cat"` with separator ";" -> `("cat|dog", "")`. An empty set is
    `("", "no label")`; a label holding the reserved joiner "|" (possible only with another
    separator) keeps its cell as label and gets an error, so the row is quarantined with a reason.
    """
    cell = cell.strip()
    if not multi_label:
        return cell, "" if cell else "no label"
    parts = [part.strip() for part in cell.split(separator)]
    parts = [part for part in parts if part]
    if not parts:
        return "", "no label"
    if any(LABEL_SEP in part for part in parts):
        return cell, RESERVED_SEP_ERROR
    return join_labels(parts), ""


def _warn_lines(csv_path: Path, lines: list[int], what: str) -> None:
    """One warning naming a few CSV line numbers (a big CSV must not flood the log)."""
    if not lines:
        return
    shown = ", ".join(map(str, lines[:MAX_LOGGED_LINES]))
    more = f" and {len(lines) - MAX_LOGGED_LINES} more" if len(lines) > MAX_LOGGED_LINES else ""
    log.warning("%s: %d row(s) %s (line(s) %s%s)", csv_path, len(lines), what, shown, more)


def read_labels_csv(
    csv_path: Path,
    images_root: Path,
    group_column: str,
    *,
    multi_label: bool = False,
    separator: str = LABEL_SEP,
) -> list[FoundFile]:
    """Read `path,label[,group][,split]` rows; paths are relative to `images_root`.

    With `multi_label`, a label cell lists several labels joined by `separator`; the manifest
    gets them sorted and joined by "|" (:func:`parse_label_cell`).
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SourceError(f"{csv_path}: cannot read the labels CSV ({err})") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise SourceError(
            f"{csv_path}: the labels CSV lacks column(s) {', '.join(missing)} (found: "
            f"{', '.join(columns) or 'none'}); it needs a header `path,label` and optionally "
            f"`{group_column}` and `split`"
        )
    files: list[FoundFile] = []
    reserved: list[int] = []  # multi-label: lines whose label holds "|"
    joined: list[int] = []  # single-label: lines whose one class name contains "|"
    for line, row in enumerate(rows, start=2):
        rel = row["path"].replace("\\", "/")
        if not rel:
            log.warning("%s line %d: empty path, row ignored", csv_path, line)
            continue
        path = os.path.normpath(images_root / rel)
        split = SPLIT_DIRS.get(row.get("split", "").lower(), "")
        label, label_error = parse_label_cell(row["label"], multi_label, separator)
        if label_error == RESERVED_SEP_ERROR:
            reserved.append(line)
        elif not multi_label and LABEL_SEP in label:
            joined.append(line)
        error = ("" if os.path.isfile(path) else "missing file") or label_error
        files.append(FoundFile(path, label, split, row.get(group_column, ""), error))
    _warn_lines(
        csv_path,
        reserved,
        f"have a label containing '{LABEL_SEP}', which multi-label data reserves to join labels "
        f"(data.label_separator is {separator!r}); they are quarantined: rename those labels",
    )
    _warn_lines(
        csv_path,
        joined,
        f"have a label containing '{LABEL_SEP}'; each is ONE class name because "
        "data.multi_label is false (set data.multi_label: true if they list several labels)",
    )
    return files


def _mirror_path(path: str, images_root: Path, target: Path) -> Path:
    """Mirror path of an outside image: as under the CSV's root, else `_abs/<absolute path>`."""
    if inside(Path(path), images_root):
        return target / os.path.relpath(path, images_root)
    return target / ABS_DIR / Path(path).relative_to(Path(path).anchor)


def mirror_outside(
    files: list[FoundFile], root: Path, images_root: Path, target: Path
) -> list[FoundFile]:
    """Mirror the listed images that lie outside the repository into `target` (under data/raw)."""
    out: list[FoundFile] = []
    keep: set[Path] = set()  # mirrored files, and listed files that already live under target
    wanted: set[Path] = set()
    with explain_disk_full(target):
        for f in files:
            if inside(Path(f.path), root):
                keep.add(Path(f.path))
                out.append(f)
                continue
            dst = _mirror_path(f.path, images_root, target)
            if os.path.isfile(f.path):
                mirror_file(f.path, dst)
                wanted.add(dst)
            out.append(FoundFile(str(dst), f.label, f.source_split, f.group, f.error))
        # Delete stale mirrors only where this source owns the files: all of `target` when the
        # CSV's root is outside the repository (as an outside folder's mirror), else `_abs/`
        # (a CSV may list images the user keeps in data/raw/<name>/ itself).
        owned = target if not inside(images_root, root) else target / ABS_DIR
        prune(owned, wanted | keep)
    if wanted:
        log.info("mirrored %d image(s) from outside the repository into %s", len(wanted), target)
    return out


def csv_source(spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path) -> list[FoundFile]:
    """Files listed in a labels CSV; those outside the repository are mirrored into data/raw."""
    csv_path = root / str(spec.path)
    if not csv_path.is_file():
        raise SourceError(f"data.source {spec.path!r}: labels CSV {csv_path} does not exist")
    images_root = Path(os.path.normpath(root / spec.root if spec.root else csv_path.parent))
    files = read_labels_csv(
        csv_path,
        images_root,
        cfg.group.column,
        multi_label=cfg.multi_label,
        separator=cfg.label_separator,
    )
    return mirror_outside(files, root, images_root, under(raw_dir, str(spec.name), spec))
