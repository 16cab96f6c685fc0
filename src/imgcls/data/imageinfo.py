"""Image files in ingest's worker processes: describe one safely, or write generated ones.

`open_image` is the one way imgcls opens an image file, wherever it comes from (ingest, the
decoded-image cache, `imgcls predict`, the serving model): only `IMAGE_FORMATS`, and the pixel
limit checked from the header before a single pixel is decoded. `inspect_image` opens one file
and describes it: digest, size, mode, format, perceptual hash, error. `write_png_chunk` writes
generated images (digits, IDX) as PNG files. This module is what the worker processes import,
so it stays light (Pillow, numpy, stdlib): no pandas, no torch.

A path may also name a member of a tar shard, `<shard>.tar/<member>` (the form Python's
zipimport uses for zip files): a path component cannot be a regular file and a folder at once,
so such a path never collides with a real file. :func:`split_member` recognises it and the
images are read in place, with `os.pread` at offsets indexed once per shard per process
(docs/data-sources.md, "Tar shards"). Long because it is the one module every image read
goes through, files and shard members alike, and what worker processes import (so the shard
reader lives here rather than in a heavier module).
Every decode failure becomes a short `error` reason instead of an exception, so one bad file can
never stop ingest; the validate stage decides what to do with it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import tarfile
import threading
import warnings
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow may only use decoders for real image formats: a file is never handed to, say, the EPS
# plugin (which shells out to Ghostscript) or a font/ICNS/animation decoder just because its bytes
# happen to look like one.
# (Multi-picture JPEGs, format "MPO", are opened by the JPEG plugin.)
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")

HASH_CHUNK = 1 << 20
IN_MEMORY_MAX = 32 << 20  # files up to this size are read once into memory
# Pillow's own default limit (1024**3 // 4 // 3 pixels), also `data.max_image_pixels`' default.
DEFAULT_MAX_PIXELS = 89_478_485
# High-bit-depth modes (Pillow's 16-bit variants, 32-bit int, 32-bit float) that are rescaled.
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_RESCALE_ROWS_PIXELS = 1 << 19  # float64 work buffer of at most 4 MB, whatever the image size

# Empty fields for a file that could not be decoded.
_UNDECODED: dict[str, Any] = {
    "width": None,
    "height": None,
    "mode": "",
    "format": "",
    "phash": "",
}


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- tar shards

SHARD_SUFFIX = ".tar"  # only plain tar: a compressed stream has no offsets to seek to
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process (least recently used closed)
_SHARD_IN_PATH = re.compile(r"\.tar[/\\]", re.IGNORECASE)


def member_name(name: str) -> str:
    """A tar member's name as manifest paths spell it: POSIX, no `./` or empty components."""
    framed = f"/{name}/"
    if "\\" not in name and "//" not in framed and "/./" not in framed:
        return name  # already plain: the common case, kept cheap
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


_KNOWN_SHARDS: set[str] = set()  # paths seen to be regular files (a file never becomes a folder)


def split_member(path: Path | str) -> tuple[str, str] | None:
    """(shard file, member name) if `path` is `<shard>.tar/<member>` with a real shard file."""
    text = os.fspath(path)
    for found in _SHARD_IN_PATH.finditer(text):  # a folder may be called x.tar: try each
        shard, member = text[: found.start() + 4], text[found.end() :]
        if member and (shard in _KNOWN_SHARDS or os.path.isfile(shard)):
            _KNOWN_SHARDS.add(shard)  # a deleted shard still fails, at its read: "missing file"
            return shard, member_name(member)
    return None


@dataclass
class _Shard:
    """One open shard: its descriptor, identity when opened, and member -> (offset, size)."""

    fd: int
    ident: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)
    members: dict[str, tuple[int, int] | None]  # None: the name occurs twice (ambiguous)
    complete: bool = True  # False: handed over for some members; a miss scans the shard

    def __post_init__(self) -> None:
        # Closed when nothing uses it any more (not when evicted): a member view still reading
        # an evicted or replaced shard must never pread a reused descriptor number.
        weakref.finalize(self, os.close, self.fd)


_SHARDS: OrderedDict[str, _Shard] = OrderedDict()
_SHARDS_LOCK = threading.Lock()


def file_ident(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a shard file from its replacement: device, inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_ident = file_ident


@dataclass(frozen=True)
class TarEntry:
    """One tar member as its header(s) describe it; the data is at `offset`."""

    name: str  # as stored (after a GNU long name or a pax `path`)
    kind: bytes  # typeflag: b"0" / b"\0" / b"7" regular, b"5" folder, b"1" / b"2" links, ...
    size: int
    offset: int
    sparse: bool = False


REGULAR_KINDS = (b"0", b"\0", b"7")
_ZERO_BLOCK = bytes(512)


def _number(field: bytes) -> int:
    """A tar header number: octal text, or GNU base-256 (sizes of 8 GiB and more)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise tarfile.HeaderError("negative number in a tar header")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.HeaderError(f"bad number {text!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The `key=value` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise tarfile.HeaderError("bad pax record length")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _checksum_ok(block: bytes) -> bool:
    """True if a header's checksum matches (unsigned, or the signed sum old tars wrote)."""
    want = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256
    return want == unsigned or want == unsigned - 256 * sum(b >= 128 for b in block)


READ_AHEAD = 1 << 16  # header reads come from 64 KiB windows: one pread per ~100 small members


def scan_tar(fd: int) -> Iterator[TarEntry]:
    """Every member of a plain tar, from its headers alone (read through 64 KiB windows).

    Several times faster than `tarfile` (no per-member objects or file-object seeks); GNU long
    names and pax `path` / `size` are honoured, a GNU sparse member ends the scan (ingest
    refuses it anyway). Raises tarfile.ReadError on a damaged or truncated header.
    """
    offset = 0
    window, window_at = b"", 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if not (window_at <= offset and offset + 512 <= window_at + len(window)):
            window, window_at = os.pread(fd, READ_AHEAD, offset), offset
        block = window[offset - window_at : offset - window_at + 512]
        if len(block) < 512 or block == _ZERO_BLOCK:
            if block and block != _ZERO_BLOCK:
                raise tarfile.ReadError(f"truncated tar header at byte {offset}")
            return
        if not _checksum_ok(block):
            raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
        kind = block[156:157]
        size = _number(block[124:136])
        data = offset + 512
        if kind in (b"L", b"x", b"g", b"K"):
            value = os.pread(fd, size, data)
            if kind == b"L":
                long_name = value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(value)
            offset = data + (size + 511) // 512 * 512
            continue
        name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar" and block[345] != 0:
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        if pax or long_name:
            name = pax.get("path", long_name or name)
            size = int(pax.get("size", size))
        sparse = kind == b"S" or any(k.startswith("GNU.sparse") for k in pax)
        yield TarEntry(name, kind, size, data, sparse)
        if kind == b"S":
            return
        long_name, pax = None, {}
        offset = data + (size + 511) // 512 * 512


def _index_entries(entries: Iterable[TarEntry]) -> dict[str, tuple[int, int] | None]:
    """Member name -> (data offset, size) of every regular, non-sparse member."""
    members: dict[str, tuple[int, int] | None] = {}
    for m in entries:
        if m.kind not in REGULAR_KINDS or m.sparse:  # links, folders, devices are never read
            continue
        name = member_name(m.name)
        members[name] = None if name in members else (m.offset, m.size)
    return members


def _index_shard(fd: int, shard: str) -> dict[str, tuple[int, int] | None]:
    """Member name -> (data offset, size) of every regular, non-sparse member (headers only)."""
    return _index_entries(scan_tar(fd))


ShardIndexes = dict[str, tuple[tuple[int, int, int, int], dict[str, tuple[int, int]]]]


def remember_members(shard: str, ident: tuple[int, int, int, int], members: dict) -> None:
    """Hold an index that ingest already built (some members), so this process never scans."""
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    if _ident(os.fstat(fd)) != ident:  # changed since it was indexed: let a read scan it
        os.close(fd)
        return
    with _SHARDS_LOCK:
        _SHARDS[shard] = _Shard(fd, ident, dict(members), complete=False)


def held_indexes() -> ShardIndexes:
    """The indexes this process holds, to hand to worker processes (see adopt_indexes)."""
    with _SHARDS_LOCK:
        return {k: (v.ident, v.members) for k, v in _SHARDS.items()}  # type: ignore[misc]


def adopt_indexes(indexes: ShardIndexes) -> None:
    """Worker initializer: take over the parent's shard indexes instead of scanning again."""
    for shard, (ident, members) in indexes.items():
        with contextlib.suppress(OSError):
            remember_members(shard, ident, members)


def prime_shards(paths: Iterable[str]) -> None:
    """Open and index, once, every shard that `paths` name members of (before forking)."""
    for shard in dict.fromkeys(m[0] for p in paths if (m := split_member(p))):
        with contextlib.suppress(OSError, tarfile.TarError):
            _shard(shard)


def _shard(shard: str, member: str | None = None) -> _Shard:
    """The open, indexed shard (opened and indexed again when the file was replaced)."""
    st = os.stat(shard)
    with _SHARDS_LOCK:
        held = _SHARDS.get(shard)
        if held is not None and held.ident == _ident(st) and (held.complete or member is None):
            _SHARDS.move_to_end(shard)
            return held
        if held is not None and held.ident == _ident(st) and member in held.members:
            return held  # a handed-over index that has this member
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{shard}: not a regular file")
    fd = os.open(shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        members = _index_shard(fd, shard)
        ident = _ident(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    new = _Shard(fd, ident, members)
    with _SHARDS_LOCK:
        _SHARDS.pop(shard, None)
        _SHARDS[shard] = new
        while len(_SHARDS) > MAX_OPEN_SHARDS:
            _SHARDS.popitem(last=False)
    return new


def member_location(shard: str, member: str) -> tuple[_Shard, int, int]:
    """(open shard, offset, size) of a member; FileNotFoundError naming shard and member."""
    held = _shard(shard, member)
    where = held.members.get(member, ())
    if where is None:
        raise FileNotFoundError(
            errno.ENOENT, f"shard {shard} holds member {member!r} twice; it is ambiguous"
        )
    if not where:
        raise FileNotFoundError(errno.ENOENT, f"shard {shard} has no regular member {member!r}")
    return held, where[0], where[1]


def _pread(held: _Shard, size: int, offset: int, what: str) -> bytes:
    """`size` bytes at `offset` (thread- and fork-safe: no shared file position)."""
    data = os.pread(held.fd, size, offset)
    if len(data) < size:
        raise EOFError(f"{what}: truncated (the shard ends inside the member)")
    return data


class _MemberFile(io.RawIOBase):
    """A read-only, seekable view of one member's bytes (for members too big to hold)."""

    def __init__(self, held: _Shard, offset: int, size: int, what: str) -> None:
        super().__init__()
        self._held, self._start, self._size, self._what, self._pos = held, offset, size, what, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        n = max(0, min(len(buffer), self._size - self._pos))
        if n:
            data = _pread(self._held, n, self._start + self._pos, self._what)
            buffer[:n] = data
            self._pos += n
        return n


def member_size(path: Path | str) -> int:
    """Size in bytes of the member `<shard>.tar/<member>` names."""
    found = split_member(path)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"{path}: not a member of a .tar shard")
    return member_location(*found)[2]


def open_member(path: Path | str, max_in_memory: int | None = None) -> IO[bytes]:
    """The bytes of the member `path` names: in memory up to `max_in_memory`, else a view."""
    found = split_member(path)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, f"{path}: not a member of a .tar shard")
    held, offset, size = member_location(*found)
    what = f"member {found[1]!r} of shard {found[0]}"
    if size <= (IN_MEMORY_MAX if max_in_memory is None else max_in_memory):
        return io.BytesIO(_pread(held, size, offset, what))
    return io.BufferedReader(_MemberFile(held, offset, size, what), HASH_CHUNK)


@lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    """Orthonormal DCT-II matrix, so that `D @ X @ D.T` is the 2-D DCT of an n x n block."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    mat = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    mat[0] /= np.sqrt(2.0)
    return mat


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the limit; raised before decoding."""


# Every way a decoder says "too many pixels": ours (from the header) and Pillow's two.
TOO_LARGE_ERRORS = (ImageTooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning)


def _too_large(what: str, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"too large: {what} > max_image_pixels ({max_pixels})")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` ("too large: WxH > max_image_pixels (N)") above the limit."""
    if width * height > max_pixels:
        raise _too_large(f"{width}x{height}", max_pixels)


@contextmanager
def open_image(source: Path | str | IO[bytes], max_pixels: int) -> Iterator[Image.Image]:
    """Open an image of an allowed format whose header is within `max_pixels`; nothing decoded.

    `source` may name a member of a tar shard (`<shard>.tar/<member>`, :func:`split_member`);
    it is read in place. Raises UnidentifiedImageError (not an image, or a format outside
    `IMAGE_FORMATS`), :class:`ImageTooLarge` (from the header, before any pixel is decoded)
    or OSError.
    """
    if isinstance(source, str | Path) and split_member(source) is not None:
        with open_member(source) as member, open_image(member, max_pixels) as img:
            yield img
        return
    # Pillow's own checks (at open, and per GIF frame / TIFF tile while decoding) use this
    # process-wide limit; it is set to ours so that raising `max_image_pixels` past Pillow's
    # default works, and lowering it is enforced by Pillow's internal checks too.
    Image.MAX_IMAGE_PIXELS = max_pixels
    # Between 1x and 2x its limit Pillow only *warns*, and then decodes the bomb anyway.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_large(_header_size(source) or _bomb_pixels(err), max_pixels) from None
    with img:
        # Also checked here: another thread may have reset the warning filter (catch_warnings).
        check_pixels(img.width, img.height, max_pixels)
        yield img


def _header_size(source: Path | str | IO[bytes]) -> str | None:
    """'WxH' as the header claims, read without Pillow's bomb check (for the message only)."""
    try:
        fh = open(source, "rb") if isinstance(source, str | Path) else source  # noqa: SIM115
        try:
            fh.seek(0)
            prefix = fh.read(16)
            for fmt in IMAGE_FORMATS:
                factory, accept = Image.OPEN[fmt]
                found = accept(prefix) if accept is not None else True
                if found and not isinstance(found, str):  # a str is Pillow's "almost" warning
                    fh.seek(0)
                    width, height = factory(fh, "").size  # parses the header; decodes nothing
                    return f"{width}x{height}"
        finally:
            if fh is not source:
                fh.close()
    except Exception:  # the size is only a nicer message; Pillow's pixel count will do
        return None
    return None


def _bomb_pixels(err: BaseException) -> str:
    """'N pixels' from Pillow's decompression-bomb message (it does not keep the size)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return f"{found.group(1)} pixels" if found else "the image"


def rescale_to_uint8(im: Image.Image, *, subtract_min: bool) -> Image.Image:
    """A high-bit-depth image -> mode L, in row blocks so memory stays ~1 byte per pixel.

    `subtract_min`: map [min, max] to [0, 255] (hashing); else [0, max] to [0, 255], negative
    values clipped (training / predicting). The result equals doing it in float64 at once.
    """
    width, height = im.size
    out = np.zeros((height, width), np.uint8)  # (H, W)
    if out.size == 0:
        return Image.fromarray(out, mode="L")
    rows = max(1, _RESCALE_ROWS_PIXELS // width)
    boxes = [(0, r, width, min(height, r + rows)) for r in range(0, height, rows)]
    # (rows, W) blocks: only one block at a time is copied out of Pillow (np.asarray of the
    # whole image would hold two copies of it at once; getextrema refuses I;16B / I;16N).
    blocks = (np.asarray(im.crop(box)) for box in boxes)
    low, high = zip(*((b.min(), b.max()) for b in blocks), strict=True)
    lo = float(min(low)) if subtract_min else 0.0
    hi = float(max(high))
    if hi > lo:
        scale = 255.0 / (hi - lo)
        for r, box in zip(range(0, height, rows), boxes, strict=True):
            block = np.asarray(im.crop(box), dtype=np.float64)
            block -= lo
            block *= scale
            np.clip(block, 0, 255, out=block)
            out[r : r + rows] = block  # truncates like astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_gray(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit grayscale (16-bit and float images are rescaled)."""
    if im.mode in HIGH_BIT_MODES:
        # Pillow's own conversion clips high-bit-depth data to 0..255; rescale by the real range
        # so a 16-bit scan hashes like its 8-bit export.
        return rescale_to_uint8(im, subtract_min=True)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im.convert("L")


def phash(im: Image.Image) -> str:
    """64-bit DCT perceptual hash (the classic pHash) as 16 hex characters."""
    small = to_gray(im).resize((32, 32), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float64)  # (32, 32)
    dct = _dct_matrix() @ pixels @ _dct_matrix().T  # (32, 32)
    # (64,) lowest frequencies carry the image's structure; rounding removes float noise so a
    # flat image hashes to a stable value instead of to the noise's pattern.
    low = np.round(dct[:8, :8].ravel(), 6)
    ordered = np.sort(low)
    bits = low > (ordered[31] + ordered[32]) / 2  # the median; np.median is 10x slower here
    return np.packbits(bits).tobytes().hex()  # first coefficient = most significant bit


def _reason(err: BaseException) -> str:
    """Map a Pillow / OS exception to a short, stable reason for the manifest's `error` column."""
    msg = str(err).lower()
    if isinstance(err, TOO_LARGE_ERRORS):
        return "too large"
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if "truncated" in msg or "premature end" in msg or isinstance(err, EOFError):
        return "truncated"
    if isinstance(err, zlib.error) or "crc" in msg or "broken" in msg or "corrupt" in msg:
        return "corrupt"
    if isinstance(err, PermissionError):
        return "unreadable"
    if isinstance(err, MemoryError):
        return "too large"
    if isinstance(err, OSError) and err.errno is not None:
        return "unreadable"
    # Anything else is still a decode failure; keep the class name so it can be looked up.
    return f"cannot decode ({type(err).__name__})"


def _decode(source: Path | IO[bytes], max_pixels: int) -> dict[str, Any]:
    """Open, fully decode and EXIF-orient an image; return its visible properties."""
    with open_image(source, max_pixels) as im:
        fmt = im.format or ""
        im.load()  # decode every pixel now so truncation shows up here, not in training
        # exif_transpose returns the same object when there is nothing to rotate.
        oriented = ImageOps.exif_transpose(im)
        return {
            "width": oriented.width,
            "height": oriented.height,
            "mode": oriented.mode,
            "format": fmt,
            "phash": phash(oriented),
        }


def _read_source(path: Path) -> tuple[int, str, Path | IO[bytes]]:
    """(size, sha256, what to decode) of a file or a shard member; raises OSError."""
    if split_member(path) is not None:
        with open_member(path, max_in_memory=IN_MEMORY_MAX) as fh:
            if isinstance(fh, io.BytesIO):
                data = fh.getvalue()
                return len(data), hashlib.sha256(data).hexdigest(), io.BytesIO(data)
            digest = hashlib.sha256()
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
        return member_size(path), digest.hexdigest(), path
    size = path.stat().st_size
    if size <= IN_MEMORY_MAX:  # one read serves both the digest and the decoder
        data = path.read_bytes()
        return size, hashlib.sha256(data).hexdigest(), io.BytesIO(data)
    return size, sha256_file(path), path


def inspect_image(path: Path | str, max_pixels: int) -> dict[str, Any]:
    """Describe one file (or tar shard member): sha256 plus image properties, or an `error`."""
    path = Path(path)
    out: dict[str, Any] = {"sha256": "", **_UNDECODED, "error": ""}
    try:
        size, out["sha256"], source = _read_source(path)
    except EOFError:
        out["error"] = "truncated"
        return out
    except OSError as err:
        out["error"] = "missing file" if isinstance(err, FileNotFoundError) else _reason(err)
        return out
    if size == 0:
        out["error"] = "empty file"
        return out
    # Worker processes are fresh interpreters, so this process-wide setting is set per call.
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a grey stripe
    try:
        out.update(_decode(source, max_pixels))
    except Exception as err:  # any decoder failure is the file's fault, recorded as data
        out.update(_UNDECODED)
        out["error"] = _reason(err)
    return out


def write_png_chunk(folder: Path | str, names: list[str], images: np.ndarray) -> int:
    """Write uint8 grayscale images (N, H, W) as PNG files `folder/<names[i]>`; return N."""
    folder = Path(folder)
    for name, img in zip(names, images, strict=True):
        out = folder / name
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(out, format="PNG")
    return len(names)
