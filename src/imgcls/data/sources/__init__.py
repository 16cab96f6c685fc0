"""Data sources: turn `data.source` into image files on disk under `data/raw/`, with labels.

A source is a folder (one sub-folder per class, optionally under train/ val/ test/), a labels CSV,
an archive, an https URL of an archive, tar shards in the WebDataset layout (read in place),
scikit-learn's `digits`, IDX files (MNIST-style), or a preset (`rps`, `fashion-mnist`) that
expands to those; one module per kind. Every source ends up as a list of :class:`FoundFile`;
opening and hashing the images is the manifest's job (:mod:`imgcls.data.manifest`).
"""

from imgcls.data.sources.archive import (
    ArchiveError,
    UnsafeArchiveError,
    archive_stem,
    extract_archive,
    is_archive,
)
from imgcls.data.sources.common import (
    RESERVED_SEP_ERROR,
    SPLIT_DIRS,
    FoundFile,
    SourceError,
    checked_name,
    worker_count,
)
from imgcls.data.sources.download import (
    ChecksumError,
    DownloadError,
    UnreachableError,
    download,
    url_file_name,
)
from imgcls.data.sources.folder import ScanResult, data_root, scan_folder
from imgcls.data.sources.generated import digits_images, find_idx_pairs, read_idx, write_pngs
from imgcls.data.sources.labels_csv import parse_label_cell, read_labels_csv
from imgcls.data.sources.materialise import materialise, materialise_all
from imgcls.data.sources.presets import PRESETS, expand_preset
from imgcls.data.sources.resolve import resolve_sources
from imgcls.data.sources.shards import UnsafeShardError, read_shard, shards_source

__all__ = [
    "PRESETS",
    "RESERVED_SEP_ERROR",
    "SPLIT_DIRS",
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "FoundFile",
    "ScanResult",
    "SourceError",
    "UnreachableError",
    "UnsafeArchiveError",
    "UnsafeShardError",
    "archive_stem",
    "checked_name",
    "data_root",
    "digits_images",
    "download",
    "expand_preset",
    "extract_archive",
    "find_idx_pairs",
    "is_archive",
    "materialise",
    "materialise_all",
    "parse_label_cell",
    "read_idx",
    "read_labels_csv",
    "read_shard",
    "resolve_sources",
    "scan_folder",
    "shards_source",
    "url_file_name",
    "worker_count",
    "write_pngs",
]
