"""Data sources: turn `data.source` into image files on disk under `data/raw/`, with labels.

A source is a folder (one sub-folder per class, optionally under train/ val/ test/), a labels CSV,
an archive, an https URL of an archive, scikit-learn's `digits`, IDX files (MNIST-style), or a
preset (`rps`, `fashion-mnist`) that expands to those. Every source ends up as a list of
:class:`FoundFile` (an image path plus what the source says about it); opening and hashing the
images is the manifest's job (:mod:`imgcls.data.manifest`).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import multiprocessing
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from imgcls.config import DataConfig, GroupConfig, SourceSpec
from imgcls.data.imageinfo import write_png_chunk
from imgcls.data.source_archive import (
    archive_stem,
    extract_archive,
    is_archive,
    swap_into_place,
)
from imgcls.data.source_download import (
    DownloadError,
    UnreachableError,
    download,
    unreachable_message,
    url_filename,
)
from imgcls.errors import ImgclsError
from imgcls.io import explain_disk_full
from imgcls.task import LABEL_SEP, join_labels

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
MARKER = ".imgcls-source.json"  # in a generated folder: what it was generated from
PARALLEL_WRITE_MIN = 5000  # fewer generated images are written in-process
GENERATOR_VERSION = 1  # bump when digits / IDX -> PNG writing changes, to regenerate

# ----------------------------------------------------------------------------- presets

RPS_BASE = "https://storage.googleapis.com/download.tensorflow.org/data/"
RPS_SOURCES: tuple[tuple[str, str, str | None], ...] = (
    ("rps.zip", "c2403444395842ad04c53612bad54b574443eae17a0723117a2ff87b9d72194f", None),
    (
        "rps-test-set.zip",
        "c27ab9fa43ce40b2e453de711365b477f4424586edf0388116674fd320f07503",
        "test",
    ),
)
# The hand id: `rock01-000.png` -> "01", `paper04-080.png` -> "04" (the same hand in every pose is
# one group); the test set's `testrock01-00.png` -> "test01", so test hands never merge with
# training hands of the same number.
RPS_GROUP = GroupConfig(by="regex", pattern=r"^(test)?(?:rock|paper|scissors)(\d+)-")

# Fashion-MNIST's canonical files (the https copy in the dataset's own repository; same bytes as
# the S3 links in its README, whose published MD5s they match).
FASHION_BASE = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
)
FASHION_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
FASHION_CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
# Where Debian's `dataset-fashion-mnist` package installs the IDX files (re-gzipped, so their
# digests differ from the canonical ones, so they are used as installed, not checked against
# the download digests).
FASHION_LOCAL_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
PRESETS = ("rps", "fashion-mnist")
# Error (quarantine reason) of a multi-label row whose label holds the reserved joiner "|".
RESERVED_SEP_ERROR = f"label contains '{LABEL_SEP}' (reserved to join labels)"
MAX_LOGGED_LINES = 5  # CSV line numbers named per warning
ABS_DIR = "_abs"  # data/raw/<csv source>/_abs/<absolute path>: mirrors of images listed by path


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


# ----------------------------------------------------------------------------- resolving


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


def _infer_kind(spec: SourceSpec, root: Path) -> str:
    """Pick the kind of an `auto` source from its path (archive, CSV, IDX folder or folder)."""
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
    return "idx" if _looks_like_idx_dir(path) else "folder"


def _unplain(spec: SourceSpec, name: str, what: str) -> SourceError:
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
        raise _unplain(spec, name, what) from None
    if name == DOWNLOADS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _unplain(spec, name, what)
    return name


def url_file_name(spec: SourceSpec) -> str:
    """The checked, percent-decoded file name at the end of a url source's URL."""
    return checked_name(spec, url_filename(str(spec.url)), "the file name taken from its URL")


def _default_name(spec: SourceSpec) -> str:
    """Folder name under data/raw/ for a source without an explicit `name`."""
    if spec.kind == "digits":
        return "digits"
    if spec.kind == "url":
        return archive_stem(url_file_name(spec))
    path = Path(str(spec.path))
    if spec.kind == "csv":
        return path.stem
    return archive_stem(path.name) if spec.kind == "archive" else path.name


def expand_preset(spec: SourceSpec, group: GroupConfig) -> list[SourceSpec]:
    """Expand a preset into the sources it stands for."""
    if spec.preset == "rps":
        rule = RPS_GROUP if group.by == "none" else None  # an explicit data.group wins
        return [
            SourceSpec(
                kind="url",
                url=RPS_BASE + fname,
                sha256=digest,
                name=archive_stem(fname),
                split=split or spec.split,
                group=spec.group or rule,
            )
            for fname, digest, split in RPS_SOURCES
        ]
    if spec.preset == "fashion-mnist":
        name = spec.name or "fashion-mnist"
        for local in FASHION_LOCAL_DIRS:
            if all((local / f).is_file() for f in FASHION_FILES):
                return [
                    SourceSpec(
                        kind="idx",
                        path=str(local),
                        name=name,
                        classes=FASHION_CLASSES,
                        group=spec.group,
                    )
                ]
        return [
            SourceSpec(
                kind="idx",
                path=None,
                name=name,
                classes=FASHION_CLASSES,
                group=spec.group,
                url=FASHION_BASE,
            )
        ]
    raise SourceError(
        f"data.source: unknown preset {spec.preset!r}; known presets: {', '.join(PRESETS)}"
    )


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


def _visible(name: str) -> bool:
    """False for hidden files / folders and archive-tool junk (`.DS_Store`, `__MACOSX`)."""
    return not name.startswith(".") and name not in JUNK_DIRS


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and _visible(e.name))


def _has_files(path: Path) -> bool:
    """True if a folder directly contains visible files."""
    with os.scandir(path) as it:
        return any(e.is_file() and _visible(e.name) for e in it)


def data_root(base: Path) -> Path:
    """Skip wrapper folders: an archive often holds `name/<classes...>` rather than the classes."""
    while True:
        subs = _subdirs(base)
        if len(subs) != 1 or _has_files(base) or subs[0].name.lower() in SPLIT_DIRS:
            return base
        if not _subdirs(subs[0]):  # a single class folder is a class, not a wrapper
            return base
        base = subs[0]


def _walk_files(folder: Path | str) -> Iterable[str]:
    """Every visible file under `folder`, depth-first in sorted order (deterministic manifests)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if _visible(name):
                yield os.path.join(dirpath, name)


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
        loose = sorted(e.path for e in it if e.is_file() and _visible(e.name))
    for path in loose:
        if _extension(path) in exts:
            out.files.append(FoundFile(path, "", split, error="not in a class folder"))
        else:
            out.skipped[_extension(path)] += 1
    for class_dir in _subdirs(folder):
        before = len(out.files)
        label = class_dir.name
        for path in _walk_files(class_dir):
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


def _log_scan(where: Path, scan: ScanResult) -> None:
    """Tell the user what a folder scan skipped, so nothing disappears silently."""
    if scan.skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(scan.skipped.items()))
        log.warning("%s: skipped files that are not images by extension: %s", where, kinds)
    for folder in scan.empty_classes:
        log.warning("%s: class folder has no images; it will not appear as a class", folder)


def worker_count(requested: int) -> int:
    """Worker processes to use: `data.workers`, or the CPUs this process may use when 0."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _inside(path: Path, root: Path) -> bool:
    """True if `path` is `root` or below it (lexically; no symlinks resolved)."""
    return os.path.commonpath([path, root]) == str(root)


def _mirror_file(src: str, dst: Path) -> None:
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


def _prune(folder: Path, wanted: set[Path]) -> None:
    """Delete the files under `folder` that are not in `wanted` (gone from the source)."""
    for name in list(_walk_files(folder)):
        if Path(name) not in wanted:
            os.unlink(name)


def mirror_folder(src: Path, dst: Path) -> None:
    """Make `dst` an up-to-date copy of `src` (hard links where possible; unchanged files kept)."""
    wanted: set[Path] = set()
    with explain_disk_full(dst):
        for name in _walk_files(src):
            out = dst / Path(name).relative_to(src)
            _mirror_file(name, out)
            wanted.add(out)
        _prune(dst, wanted)


def under(folder: Path, name: str, spec: SourceSpec) -> Path:
    """`folder/name`, after checking that it resolves to a direct child of `folder`."""
    path = folder / name
    if os.path.realpath(path.parent) != os.path.realpath(folder) or path.name != name:
        raise _unplain(spec, name, "the name")  # belt and braces: checked_name refused it earlier
    return path


def _local_folder(spec: SourceSpec, path: Path, root: Path, raw_dir: Path) -> Path:
    """A folder inside the repository is used in place; one outside is mirrored into data/raw."""
    if not path.is_dir():
        raise SourceError(f"data.source {spec.path!r}: {path} is not a folder")
    if _inside(path, root):
        return path
    target = under(raw_dir, str(spec.name), spec)
    log.info("mirroring %s -> %s (it is outside the repository)", path, target)
    mirror_folder(path, target)
    return target


# ----------------------------------------------------------------------------- labels CSV


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
    if _inside(Path(path), images_root):
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
            if _inside(Path(f.path), root):
                keep.add(Path(f.path))
                out.append(f)
                continue
            dst = _mirror_path(f.path, images_root, target)
            if os.path.isfile(f.path):
                _mirror_file(f.path, dst)
                wanted.add(dst)
            out.append(FoundFile(str(dst), f.label, f.source_split, f.group, f.error))
        # Delete stale mirrors only where this source owns the files: all of `target` when the
        # CSV's root is outside the repository (as an outside folder's mirror), else `_abs/`
        # (a CSV may list images the user keeps in data/raw/<name>/ itself).
        owned = target if not _inside(images_root, root) else target / ABS_DIR
        _prune(owned, wanted | keep)
    if wanted:
        log.info("mirrored %d image(s) from outside the repository into %s", len(wanted), target)
    return out


def _csv_source(spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path) -> list[FoundFile]:
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


def _reserved_folder_labels(files: list[FoundFile], where: Path) -> list[FoundFile]:
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


def _generated_is_current(target: Path, fingerprint: dict[str, Any]) -> bool:
    """True if `target` was generated from exactly this input and still has all its files."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("fingerprint") != fingerprint:
        return False
    count = sum(1 for _ in _walk_files(target))
    return count == marker.get("files")


def _write_all(tmp: Path, names: list[str], images: np.ndarray, workers: int) -> None:
    """Write the PNGs, in worker processes when there are many (file creation dominates)."""
    if workers <= 1 or len(names) < PARALLEL_WRITE_MIN:
        write_png_chunk(tmp, names, images)
        return
    step = max(500, len(names) // (workers * 8))
    ctx = multiprocessing.get_context("spawn")  # see manifest.inspect_all for why not fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        jobs = [
            pool.submit(write_png_chunk, tmp, names[i : i + step], images[i : i + step])
            for i in range(0, len(names), step)
        ]
        for job in jobs:
            job.result()


def write_pngs(
    images: np.ndarray,
    labels: list[str],
    target: Path,
    fingerprint: dict[str, Any],
    splits: list[str] | None = None,
    workers: int = 1,
) -> None:
    """Write uint8 images (N, H, W) as PNGs `<target>/[<split>/]<label>/<index>.png`, atomically."""
    if _generated_is_current(target, fingerprint):
        return
    tmp = target.parent / f".{target.name}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(4, len(str(len(images) - 1)))
    names = [
        f"{splits[i]}/{label}/{i:0{width}d}.png" if splits else f"{label}/{i:0{width}d}.png"
        for i, label in enumerate(labels)
    ]
    try:
        with explain_disk_full(target):
            _write_all(tmp, names, images, workers)
            marker = {"fingerprint": fingerprint, "files": len(images)}
            (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
            swap_into_place(tmp, target)  # the previous folder survives a failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def digits_images() -> tuple[np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 digits as uint8 images (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    return images, [str(int(t)) for t in bunch.target]


def _digits_source(spec: SourceSpec, raw_dir: Path) -> Path:
    """Write the digits as PNG files (once) and return their folder."""
    import sklearn

    target = under(raw_dir, str(spec.name), spec)
    fingerprint = {
        "generator": "digits",
        "version": GENERATOR_VERSION,
        "n": 1797,
        "sklearn": sklearn.__version__.split(".")[0],
    }
    if not _generated_is_current(target, fingerprint):
        images, labels = digits_images()
        write_pngs(images, labels, target, fingerprint)
    return target


# ----------------------------------------------------------------------------- IDX


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), the MNIST container format."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise SourceError(f"{path}: cannot read IDX file ({err}); is it complete?") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise SourceError(
            f"{path}: IDX header says {dims} but the file holds {len(data) - offset} data bytes "
            f"instead of {expected}; the file is truncated or damaged"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def find_idx_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """Pair `<prefix>-images-idx3-ubyte[.gz]` with `<prefix>-labels-idx1-ubyte[.gz]`."""
    pairs = []
    for images in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images.name.split("-images-idx3-ubyte")[0]
        suffix = images.name.split("-images-idx3-ubyte")[1]
        labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if not labels.is_file():
            raise SourceError(f"{images}: no matching labels file {labels.name} next to it")
        split = "test" if prefix in ("t10k", "test") else SPLIT_DIRS.get(prefix, "train")
        pairs.append((split, images, labels))
    if not pairs:
        raise SourceError(
            f"{folder}: no `*-images-idx3-ubyte[.gz]` files; an IDX source is a folder holding "
            "e.g. train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz"
        )
    return pairs


def _idx_fingerprint(pairs: list[tuple[str, Path, Path]], classes: list[str] | None) -> dict:
    """Identify IDX inputs by name, size and mtime (cheap) plus the class names used."""
    files = []
    for _, images, labels in pairs:
        for p in (images, labels):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    return {"generator": "idx", "version": GENERATOR_VERSION, "files": files, "classes": classes}


def _fetch_fashion(spec: SourceSpec, raw_dir: Path, progress: bool, max_bytes: int) -> Path:
    """Download the canonical Fashion-MNIST IDX files (verified) into data/raw/downloads/."""
    folder = under(raw_dir / DOWNLOADS, str(spec.name), spec)
    for fname, digest in FASHION_FILES.items():
        download(
            str(spec.url) + fname, digest, folder / fname, progress=progress, max_bytes=max_bytes
        )
    return folder


def _idx_source(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, progress: bool
) -> Path:
    """Write IDX images as PNG files `<name>/<split>/<label>/<index>.png` (once)."""
    workers = worker_count(cfg.workers)
    if spec.path:
        folder = root / spec.path
    elif spec.url == FASHION_BASE:  # only the fashion-mnist preset has digests for its files
        folder = _fetch_fashion(spec, raw_dir, progress, cfg.max_download_bytes)
    else:
        raise SourceError(f"data.source {spec.name!r}: an idx source needs `path` (a folder)")
    pairs = find_idx_pairs(folder)
    target = under(raw_dir, str(spec.name), spec)
    fingerprint = _idx_fingerprint(pairs, spec.classes)
    if _generated_is_current(target, fingerprint):
        return target
    all_images, all_labels, all_splits = [], [], []
    for split, images_path, labels_path in pairs:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise SourceError(
                f"{images_path}: expected N x H x W uint8 images matching {len(labels)} labels, "
                f"got shape {images.shape} {images.dtype}"
            )
        names = [_class_name(int(v), spec.classes, labels_path) for v in labels]
        all_images.append(images)
        all_labels += names
        all_splits += [split] * len(images)
    log.info("writing %d IDX images as PNG files under %s", len(all_labels), target)
    images = np.concatenate(all_images)
    write_pngs(images, all_labels, target, fingerprint, all_splits, workers=workers)
    return target


def _class_name(index: int, classes: list[str] | None, where: Path) -> str:
    """Label index -> class name (the index itself when no names are configured)."""
    if classes is None:
        return str(index)
    if not 0 <= index < len(classes):
        raise SourceError(f"{where}: label {index} has no entry in the source's `classes` list")
    return classes[index]


# ----------------------------------------------------------------------------- dispatch


def _archive_source(spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path) -> Path:
    """Extract a local archive into data/raw/<name>/."""
    archive = root / str(spec.path)
    if not archive.is_file():
        raise SourceError(f"data.source {spec.path!r}: archive {archive} does not exist")
    target = under(raw_dir, str(spec.name), spec)
    extract_archive(archive, target, cfg.max_archive_bytes)
    return target


def _url_source(spec: SourceSpec, cfg: DataConfig, raw_dir: Path, progress: bool) -> Path:
    """Download (or resume, or reuse) a verified archive, then extract it into data/raw/<name>/."""
    url = str(spec.url)
    fname = url_file_name(spec)
    if not is_archive(fname):
        raise SourceError(
            f"data.source {url}: only archives (.zip, .tar, .tar.gz, .tgz) can be downloaded as a "
            "source; pack single files into an archive"
        )
    dest = under(raw_dir / DOWNLOADS, fname, spec)
    archive = download(url, spec.sha256, dest, progress=progress, max_bytes=cfg.max_download_bytes)
    target = under(raw_dir, str(spec.name), spec)
    extract_archive(archive, target, cfg.max_archive_bytes)
    return target


def materialise(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, *, progress: bool = True
) -> list[FoundFile]:
    """Put one source's images on disk (download / extract / write as needed) and list them."""
    rule = spec.group or cfg.group
    if spec.kind == "csv":
        files = _csv_source(spec, cfg, root, raw_dir)
    else:
        if spec.kind == "folder":
            path = Path(os.path.normpath(root / str(spec.path)))
            folder = _local_folder(spec, path, root, raw_dir)
        elif spec.kind == "archive":
            folder = _archive_source(spec, cfg, root, raw_dir)
        elif spec.kind == "url":
            folder = _url_source(spec, cfg, raw_dir, progress)
        elif spec.kind == "digits":
            folder = _digits_source(spec, raw_dir)
        elif spec.kind == "idx":
            folder = _idx_source(spec, cfg, root, raw_dir, progress)
        else:  # pragma: no cover - resolve_sources leaves no other kind
            raise SourceError(f"data.source: cannot materialise a source of kind {spec.kind!r}")
        scan = scan_folder(folder, cfg.extensions, spec.split)
        _log_scan(folder, scan)
        files = scan.files
        if not files:
            log.warning("%s: source %r delivered no image files", folder, spec.name)
        if cfg.multi_label:  # a folder gives each image one label: its class folder
            files = _reserved_folder_labels(files, folder)
    if rule.by == "csv" and spec.kind != "csv":
        raise SourceError(
            f"data.group.by is 'csv' but source {spec.name!r} is a {spec.kind}, which has no "
            "group column; use a labels CSV source or another data.group.by"
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
