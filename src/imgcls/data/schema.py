"""The manifest's columns: the contract between ingest (which writes them) and validate."""

from __future__ import annotations

MANIFEST_COLUMNS: list[str] = [
    "path",
    "label",
    "group",
    "source_split",
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "phash",
    "error",
]
