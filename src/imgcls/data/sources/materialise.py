"""Materialising sources: put each source's images on disk under data/raw/ and list them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.sources.archive import archive_source
from imgcls.data.sources.common import FoundFile, SourceError
from imgcls.data.sources.download import (
    DownloadError,
    UnreachableError,
    unreachable_message,
    url_source,
)
from imgcls.data.sources.folder import local_folder, log_scan, reserved_folder_labels, scan_folder
from imgcls.data.sources.generated import digits_source, idx_source
from imgcls.data.sources.labels_csv import csv_source
from imgcls.data.sources.shards import shards_source

log = logging.getLogger(__name__)


def materialise(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, *, progress: bool = True
) -> list[FoundFile]:
    """Put one source's images on disk (download / extract / write as needed) and list them."""
    rule = spec.group or cfg.group
    if spec.kind == "csv":
        files = csv_source(spec, cfg, root, raw_dir)
    elif spec.kind == "shards":  # read in place: no folder to scan
        files = shards_source(spec, cfg, root, raw_dir, progress)
    else:
        if spec.kind == "folder":
            path = Path(os.path.normpath(root / str(spec.path)))
            folder = local_folder(spec, path, root, raw_dir)
        elif spec.kind == "archive":
            folder = archive_source(spec, cfg, root, raw_dir)
        elif spec.kind == "url":
            folder = url_source(spec, cfg, raw_dir, progress)
        elif spec.kind == "digits":
            folder = digits_source(spec, raw_dir)
        elif spec.kind == "idx":
            folder = idx_source(spec, cfg, root, raw_dir, progress)
        else:  # pragma: no cover - resolve_sources leaves no other kind
            raise SourceError(f"data.source: cannot materialise a source of kind {spec.kind!r}")
        scan = scan_folder(folder, cfg.extensions, spec.split)
        log_scan(folder, scan)
        files = scan.files
        if not files:
            log.warning("%s: source %r delivered no image files", folder, spec.name)
        if cfg.multi_label:  # a folder gives each image one label: its class folder
            files = reserved_folder_labels(files, folder)
    if rule.by == "csv" and spec.kind != "csv" and not (spec.kind == "shards" and spec.labels):
        raise SourceError(
            f"data.group.by is 'csv' but source {spec.name!r} is a {spec.kind}, which has no "
            "group column; use a labels CSV source (for shards: `labels:`) or another "
            "data.group.by"
        )
    if spec.split:
        files = [FoundFile(f.path, f.label, spec.split, f.group, f.error) for f in files]
    return [FoundFile(f.path, f.label, f.source_split, f.group, f.error, rule) for f in files]


def materialise_all(
    specs: list[SourceSpec], cfg: DataConfig, root: Path, raw_dir: Path, *, progress: bool = True
) -> list[FoundFile]:
    """:func:`materialise` every source; unreachable downloads are named all at once.

    Offline, a preset of two archives (`rps`) would otherwise name one file per run, and the
    user would learn of the second only after supplying the first.
    """
    found: list[FoundFile] = []
    unreachable: list[UnreachableError] = []
    for spec in specs:
        try:
            found += materialise(spec, cfg, root, raw_dir, progress=progress)
        except UnreachableError as err:
            unreachable.append(err)
    if len(unreachable) == 1:
        raise unreachable[0]  # its own message says the same, with the manual-download hint
    if unreachable:
        raise DownloadError(unreachable_message(unreachable))
    return found
