"""Resolving `data.source`: short forms, kinds inferred from paths, presets expanded, names set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from imgcls.config import DataConfig, SourceSpec
from imgcls.data.sources.archive import archive_stem, is_archive
from imgcls.data.sources.common import SourceError, checked_name
from imgcls.data.sources.download import url_file_name
from imgcls.data.sources.presets import PRESETS, expand_preset
from imgcls.data.sources.shards import is_shard


def _looks_like_idx_dir(path: Path) -> bool:
    """True if a folder holds MNIST-style `*-idx3-ubyte[.gz]` image files."""
    return path.is_dir() and any(path.glob("*idx3-ubyte*"))


def _spec_from_string(text: str) -> SourceSpec:
    """Short form -> long form: a preset name, `digits`, a URL or a path."""
    if text in PRESETS:
        return SourceSpec(kind="preset", preset=text)
    if text == "digits":
        return SourceSpec(kind="digits")
    if "://" in text:
        return SourceSpec(kind="url", url=text)
    return SourceSpec(kind="auto", path=text)


def _looks_like_shard_dir(path: Path) -> bool:
    """True for a folder of plain .tar files only (no class folders): WebDataset shards."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    return bool(entries) and all(e.is_file() and is_shard(e.name) for e in entries)


def _infer_kind(spec: SourceSpec, root: Path) -> str:
    """Pick the kind of an `auto` source from its path (archive, CSV, IDX folder or folder)."""
    if spec.shards:
        return "shards"
    if spec.preset:
        return "preset"
    if spec.url:
        return "url"
    path = root / str(spec.path)
    name = path.name.lower()
    if is_archive(name):
        return "archive"
    if name.endswith(".csv"):
        return "csv"
    if not path.exists():
        raise SourceError(
            f"data.source: {spec.path!r} does not exist (looked for {path}). Paths are relative "
            "to the repository root; give a folder of class sub-folders, an archive, a labels "
            f"CSV, a URL, `digits` or a preset ({', '.join(PRESETS)})."
        )
    if _looks_like_idx_dir(path):
        return "idx"
    return "shards" if path.is_dir() and _looks_like_shard_dir(path) else "folder"


def _default_name(spec: SourceSpec) -> str:
    """Folder name under data/raw/ for a source without an explicit `name`."""
    if spec.kind == "digits":
        return "digits"
    if spec.kind == "url":
        return archive_stem(url_file_name(spec))
    if spec.kind == "shards":
        if spec.url:
            return archive_stem(url_file_name(spec))
        return archive_stem(Path(spec.path).name) if spec.path else "shards"
    path = Path(str(spec.path))
    if spec.kind == "csv":
        return path.stem
    return archive_stem(path.name) if spec.kind == "archive" else path.name


def resolve_sources(cfg: DataConfig, root: Path) -> list[SourceSpec]:
    """Normalise `data.source` into long-form specs with a concrete kind and name each."""
    items = cfg.source if isinstance(cfg.source, list) else [cfg.source]
    if not items:
        raise SourceError("data.source is an empty list; name at least one source")
    out: list[SourceSpec] = []
    for item in items:
        spec = _spec_from_string(item) if isinstance(item, str) else item
        if spec.kind == "auto":
            spec = spec.model_copy(update={"kind": _infer_kind(spec, root)})
        if spec.kind == "preset":
            out.extend(expand_preset(spec, cfg.group))
            continue
        if spec.kind == "url":
            url_file_name(spec)  # refuse a traversing URL even when the source has a `name:`
        if spec.name is None:
            name = checked_name(spec, _default_name(spec), "the name derived from it")
            spec = spec.model_copy(update={"name": name})
        else:
            checked_name(spec, spec.name)
        out.append(spec)
    names = Counter(s.name for s in out)
    if clash := [n for n, c in names.items() if c > 1]:
        raise SourceError(
            f"data.source: two sources would both live in data/raw/{clash[0]}/; give one of "
            "them a different `name:`"
        )
    return out


# ----------------------------------------------------------------------------- folders
