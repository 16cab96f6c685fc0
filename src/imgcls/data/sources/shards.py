"""Tar shards in the WebDataset layout, read in place (never extracted).

A shard is a plain `.tar` whose members are samples: `<key>.<ext>` files that share a key (the
member name up to the first dot of its last component). An image member (`<key>.png`, `.jpg`,
... as in `data.extensions`) is one manifest row; its label is the text of `<key>.cls`, or the
`label` of its key in a labels CSV (`key,label[,group][,split]`). Rows point at members as
`<shard>.tar/<member>` (:func:`imgcls.data.imageinfo.split_member`), so DVC tracks tens of
shard files instead of millions of images, and ingest, validate and the decode cache read the
members where they are.

Every member header is checked before anything is read, with the archive module's rules
(:mod:`imgcls.data.sources.archive`): absolute or `..` names, links, devices, a name that occurs
twice, sparse members and a shard above `data.max_archive_bytes` are refused with an error that
names the shard and the member. Long because a shard source is three things that belong
together: finding shards (local, mirrored, downloaded), checking and sorting their members, and
labelling samples (`.cls` or a labels CSV).
"""

from __future__ import annotations

import csv
import logging
import os
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from imgcls.config import DataConfig, ShardRef, SourceSpec
from imgcls.data.imageinfo import (
    REGULAR_KINDS,
    SHARD_SUFFIX,
    TarEntry,
    file_ident,
    remember_members,
    scan_tar,
)
from imgcls.data.sources.archive import (  # one set of member rules for extracting and reading
    LINK_WHY,
    Member,
    UnsafeArchiveError,
    check_members,
    is_archive,
    safe_member_name,
)
from imgcls.data.sources.common import (
    MAX_LOGGED_LINES,
    SPLIT_DIRS,
    FoundFile,
    SourceError,
    checked_name,
    inside,
    mirror_file,
    under,
    visible,
)
from imgcls.data.sources.download import (
    DownloadError,
    UnreachableError,
    download,
    unreachable_message,
    url_filename,
)
from imgcls.data.sources.labels_csv import parse_label_cell
from imgcls.io import explain_disk_full

log = logging.getLogger(__name__)

LABEL_EXT = "cls"  # WebDataset's class member: `<key>.cls` holds the class as text
MAX_LABEL_BYTES = 4096  # a .cls member is a class name, not a payload
GZIP_MAGIC = b"\x1f\x8b"


class UnsafeShardError(UnsafeArchiveError):
    """A shard with a member that is refused (hostile name, link, device, sparse, twice)."""


@dataclass(frozen=True)
class Shard:
    """One shard file to read in place, and the split its folder says (`""` for none)."""

    path: Path  # absolute, inside the repository
    split: str = ""


@dataclass(frozen=True)
class Sample:
    """One image member of a shard, with the key that ties it to its label."""

    member: str
    key: str


# ----------------------------------------------------------------------------- finding shards


def is_shard(name: str) -> bool:
    """True for a plain `.tar` file name (only plain tar has offsets to read members at)."""
    return name.lower().endswith(SHARD_SUFFIX)


def _compressed_error(where: Path | str) -> SourceError:
    """The error for a compressed shard: members of a compressed stream cannot be seeked to."""
    return SourceError(
        f"{where}: a compressed tar cannot be read in place (a member of a gzip / bzip2 / xz "
        "stream can only be reached by decompressing everything before it). Shards hold "
        "already-compressed images, so store them as plain .tar (`gunzip` it), or use "
        "`kind: archive` to extract it instead."
    )


def _shards_in(spec: SourceSpec, folder: Path) -> list[Shard]:
    """The `*.tar` files of a folder, or of its train/ val/ test/ sub-folders, sorted by name."""

    def tars(where: Path, split: str) -> list[Shard]:
        names = sorted(e.name for e in os.scandir(where) if e.is_file() and visible(e.name))
        if packed := [n for n in names if is_archive(n) and not is_shard(n)]:
            raise _compressed_error(where / packed[0])
        return [Shard(where / n, split) for n in names if is_shard(n)]

    found = tars(folder, "")
    subs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and visible(e.name))
    for sub in subs:
        if sub.lower() in SPLIT_DIRS:
            found += tars(folder / sub, SPLIT_DIRS[sub.lower()])
    if not found:
        raise SourceError(
            f"data.source {spec.path!r}: no .tar shards in {folder} (nor in its train/ val/ "
            "test/ folders); a shards source is a folder of plain .tar files or a list of them"
        )
    return found


def _local(spec: SourceSpec, rel: str, root: Path) -> list[Shard]:
    """The shard(s) a local `path` names: one .tar file, or a folder of them."""
    path = Path(os.path.normpath(root / rel))
    if path.is_dir():
        return _shards_in(spec, path)
    if not path.is_file():
        raise SourceError(f"data.source shards: {rel!r} does not exist (looked for {path})")
    if not is_shard(path.name):
        if is_archive(path.name):
            raise _compressed_error(path)
        raise SourceError(f"data.source shards: {path} is not a .tar shard")
    return [Shard(path)]


def _placed(spec: SourceSpec, shards: list[Shard], root: Path, raw_dir: Path) -> list[Shard]:
    """Shards inside the repository as they are; others hard-linked into data/raw/<name>/."""
    target = under(raw_dir, str(spec.name), spec)
    out: list[Shard] = []
    taken: dict[Path, Path] = {}
    with explain_disk_full(target):
        for s in shards:
            if inside(s.path, root):
                out.append(s)
                continue
            dst = target / s.split / s.path.name if s.split else target / s.path.name
            if taken.setdefault(dst, s.path) != s.path:
                raise SourceError(
                    f"data.source {spec.name!r}: shards {taken[dst]} and {s.path} would both be "
                    f"copied to {dst}; rename one of them"
                )
            mirror_file(str(s.path), dst)
            out.append(Shard(dst, s.split))
    return out


def _fetched(
    spec: SourceSpec, ref: ShardRef, cfg: DataConfig, raw_dir: Path, progress: bool
) -> Path:
    """Download (or verify the copy of) one URL shard into data/raw/<name>/; its path."""
    url = str(ref.url)
    fname = checked_name(spec, url_filename(url), "the file name taken from a shard URL")
    if not is_shard(fname):
        raise (
            _compressed_error(url)
            if is_archive(fname)
            else SourceError(
                f"data.source shards: {url} does not end in .tar; a shard URL names a plain "
                "tar file"
            )
        )
    dest = under(raw_dir, str(spec.name), spec) / fname
    return download(url, ref.sha256, dest, progress=progress, max_bytes=cfg.max_download_bytes)


def find_shards(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, progress: bool = True
) -> list[Shard]:
    """Every shard of a `shards` source, downloaded or linked where needed, in order."""
    if spec.path:
        return _placed(spec, _local(spec, spec.path, root), root, raw_dir)
    refs = [ShardRef(url=spec.url, sha256=spec.sha256)] if spec.url else list(spec.shards or [])
    out: list[Shard] = []
    unreachable: list[UnreachableError] = []
    for item in refs:
        ref = ShardRef(path=item) if isinstance(item, str) else item
        if ref.path:
            out += _placed(spec, _local(spec, ref.path, root), root, raw_dir)
            continue
        try:
            out.append(Shard(_fetched(spec, ref, cfg, raw_dir, progress)))
        except UnreachableError as err:
            unreachable.append(err)
    if len(unreachable) == 1:
        raise unreachable[0]
    if unreachable:
        raise DownloadError(unreachable_message(unreachable))
    if seen := [p for p, n in Counter(s.path for s in out).items() if n > 1]:
        raise SourceError(f"data.source {spec.name!r}: shard {seen[0]} is listed twice")
    return out


# ----------------------------------------------------------------------------- reading shards


def _refused(shard: Path, member: str, why: str) -> UnsafeShardError:
    """The error for a refused member, naming the shard and the member."""
    err = UnsafeShardError(
        f"{shard}: refused member {member!r}: {why}. Nothing of this shard was used. Shards are "
        "read in place, but a name like this is refused everywhere (it could escape a folder "
        "when extracted); if you built the shard yourself, write it again with relative member "
        "names and no links (tar --dereference --hard-dereference; webdataset's TarWriter does)."
    )
    err.member, err.why = member, why
    return err


def _entry_member(shard: Path, e: TarEntry) -> Member:
    """A checked member from its header: the archive module's name rule, links, specials."""
    try:
        name = safe_member_name(shard, e.name)
    except UnsafeArchiveError as err:
        raise _refused(shard, err.member, err.why) from None
    if e.kind == b"2":
        raise _refused(shard, e.name, LINK_WHY.format(kind="symbolic"))
    if e.kind == b"1":
        raise _refused(shard, e.name, LINK_WHY.format(kind="hard"))
    if e.kind not in (*REGULAR_KINDS, b"5"):
        raise _refused(shard, e.name, "device, FIFO or other special file")
    if e.sparse:
        raise _refused(shard, e.name, "sparse member (its bytes are not stored in one run)")
    is_dir = e.kind == b"5"
    return Member(name, is_dir, 0 if is_dir else e.size, tarfile.TarInfo(e.name))


def _members(shard: Path, fd: int, max_bytes: int) -> list[tuple[Member, TarEntry]]:
    """Every member header checked (the archive module's rules, plus sparse and bounds)."""
    end = os.fstat(fd).st_size
    pairs = []
    for e in scan_tar(fd):
        m = _entry_member(shard, e)
        if not m.is_dir and e.offset + e.size > end:
            raise SourceError(
                f"{shard}: member {e.name!r} runs past the end of the file; the shard is "
                "truncated: download or copy it again"
            )
        pairs.append((m, e))
    try:
        check_members(shard, [m for m, _ in pairs], max_bytes)
    except UnsafeArchiveError as err:
        if not err.member:  # the size cap: the shard is never read, so say so, not "extract"
            raise UnsafeShardError(
                f"{shard}: its members hold more than data.max_archive_bytes = {max_bytes:,} "
                "bytes; nothing of it was used. If you trust this shard, raise "
                "data.max_archive_bytes in params.yaml (or write smaller shards)."
            ) from None
        raise _refused(shard, err.member, err.why) from None
    return [(m, e) for m, e in pairs if not m.is_dir]


def _not_a_tar(shard: Path, fd: int, err: Exception) -> SourceError:
    """The error for a shard that is not a plain tar: compressed (by its magic) or damaged."""
    head = os.pread(fd, 6, 0)
    if head.startswith((GZIP_MAGIC, b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")):
        return _compressed_error(shard)
    return SourceError(
        f"{shard}: cannot read the shard ({type(err).__name__}: {err}); it is damaged, "
        "truncated or not a tar file: download or copy it again"
    )


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's rule: `a/b/0001.seg.png` -> key `a/b/0001`, extension `seg.png`."""
    folder, base = posixpath.split(member)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _label_text(shard: Path, fd: int, m: Member, e: TarEntry) -> str:
    """The stripped text of a `<key>.cls` member (bounded: it holds one class)."""
    if e.size > MAX_LABEL_BYTES:
        raise SourceError(
            f"{shard}: label member {m.name!r} is over {MAX_LABEL_BYTES} bytes; a .cls member "
            "holds one class name or index"
        )
    return os.pread(fd, e.size, e.offset).decode("utf-8", errors="replace").strip()


def read_shard(
    shard: Path, exts: frozenset[str], max_bytes: int, skipped: Counter[str]
) -> tuple[list[Sample], dict[str, str]]:
    """The image samples of one shard and its `<key>.cls` texts (member headers checked)."""
    samples: list[Sample] = []
    classes: dict[str, str] = {}
    where: dict[str, tuple[int, int]] = {}
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            members = _members(shard, fd, max_bytes)
        except (tarfile.TarError, EOFError, ValueError) as err:
            raise _not_a_tar(shard, fd, err) from None
        for m, e in members:
            member = m.name  # normalised as imageinfo.member_name does: the reader finds it
            if not all(visible(part) for part in member.split("/")):
                continue  # `._0001.jpg`, `__MACOSX/`: archive-tool droppings
            key, ext = split_key(member)
            suffix = posixpath.splitext(member)[1].lower()
            if ext == LABEL_EXT:
                classes[key] = _label_text(shard, fd, m, e)
            elif ext and suffix in exts:
                samples.append(Sample(member, key))
                where[member] = (e.offset, e.size)
            else:
                skipped[suffix or "(no extension)"] += 1
        # ingest's workers take this index over (manifest.inspect_all) instead of scanning
        remember_members(str(shard), file_ident(os.fstat(fd)), where)
    finally:
        os.close(fd)
    return samples, classes


def image_members(shard: Path, extensions: list[str] | None = None) -> list[str]:
    """`<shard>/<member>` paths of a shard's image members, headers checked (for predict)."""
    cfg = DataConfig() if extensions is None else DataConfig(extensions=extensions)
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions)
    samples, _ = read_shard(Path(shard), exts, cfg.max_archive_bytes, Counter())
    return [f"{shard}/{s.member}" for s in samples]


# ----------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class KeyLabel:
    """What a labels CSV says about one key."""

    label: str
    group: str = ""
    split: str = ""


def read_key_labels(path: Path, group_column: str) -> dict[str, KeyLabel]:
    """A labels CSV `key,label[,<group column>][,split]` -> key -> what it says."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SourceError(f"{path}: cannot read the shard labels CSV ({err})") from None
    if missing := [c for c in ("key", "label") if c not in columns]:
        raise SourceError(
            f"{path}: the shard labels CSV lacks column(s) {', '.join(missing)} (found: "
            f"{', '.join(columns) or 'none'}); it needs a header `key,label` and optionally "
            f"`{group_column}` and `split` (a key is the member name without its extension)"
        )
    out: dict[str, KeyLabel] = {}
    for line, row in enumerate(rows, start=2):
        key = row["key"].replace("\\", "/")
        if key in out:
            raise SourceError(f"{path} line {line}: key {key!r} is listed twice")
        split = SPLIT_DIRS.get(row.get("split", "").lower(), "")
        out[key] = KeyLabel(row["label"], row.get(group_column, ""), split)
    return out


def _label(text: str, spec: SourceSpec, cfg: DataConfig) -> tuple[str, str]:
    """(label, error) of a label text; an index is mapped through `classes:` when given."""
    label, error = parse_label_cell(text, cfg.multi_label, cfg.label_separator)
    if spec.classes and not cfg.multi_label and not error and label.isdigit():
        index = int(label)
        if index >= len(spec.classes):
            return label, f"class index {index} not in `classes` ({len(spec.classes)} names)"
        label = spec.classes[index]
    return label, error


def _warn_unused(where: str, keys: set[str]) -> None:
    """Tell the user about labels CSV keys no shard has an image for."""
    if keys:
        shown = ", ".join(sorted(map(repr, keys))[:MAX_LOGGED_LINES])
        log.warning("%s: %d key(s) have no image in any shard (%s)", where, len(keys), shown)


def shards_source(
    spec: SourceSpec, cfg: DataConfig, root: Path, raw_dir: Path, progress: bool = True
) -> list[FoundFile]:
    """Every image member of a `shards` source as a found file `<shard>.tar/<member>`."""
    exts = frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions)
    table = read_key_labels(root / spec.labels, cfg.group.column) if spec.labels else None
    used: set[str] = set()
    skipped: Counter[str] = Counter()
    files: list[FoundFile] = []
    for shard in find_shards(spec, cfg, root, raw_dir, progress):
        samples, classes = read_shard(shard.path, exts, cfg.max_archive_bytes, skipped)
        for s in samples:
            path = f"{shard.path}/{s.member}"
            given = table.get(s.key) if table is not None else None
            text = given.label if given else classes.get(s.key)
            if text is None:
                where = f"in {spec.labels}" if table is not None else f"({s.key}.{LABEL_EXT})"
                files.append(FoundFile(path, "", shard.split, error=f"no label {where}"))
                continue
            used.add(s.key)
            label, error = _label(text, spec, cfg)
            split = (given.split if given else "") or shard.split
            files.append(FoundFile(path, label, split, given.group if given else "", error))
    if skipped:
        kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items()))
        log.warning("%s: skipped shard members that are not images or labels: %s", spec.name, kinds)
    if table is not None:
        _warn_unused(str(spec.labels), set(table) - used)
    if not files:
        log.warning("source %r: its shards hold no image members", spec.name)
    return files
