"""Image files in ingest's worker processes: describe one safely, or write generated ones.

`open_image` is the one way imgcls opens an image file, wherever it comes from (ingest, the
decoded-image cache, `imgcls predict`, the serving model): only `IMAGE_FORMATS`, and the pixel
limit checked from the header before a single pixel is decoded. `inspect_image` opens one file
and describes it: digest, size, mode, format, perceptual hash, error. `write_png_chunk` writes
generated images (digits, IDX) as PNG files. This module is what the worker processes import,
so it stays light (Pillow, numpy, stdlib): no pandas, no torch.
Every decode failure becomes a short `error` reason instead of an exception, so one bad file can
never stop ingest; the validate stage decides what to do with it.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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

    Raises UnidentifiedImageError (not an image, or a format outside `IMAGE_FORMATS`),
    :class:`ImageTooLarge` (from the header, before any pixel is decoded) or OSError.
    """
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


def _decode(source: Path | io.BytesIO, max_pixels: int) -> dict[str, Any]:
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


def inspect_image(path: Path | str, max_pixels: int) -> dict[str, Any]:
    """Describe one file: sha256 plus image properties, or an `error` reason; never raises."""
    path = Path(path)
    out: dict[str, Any] = {"sha256": "", **_UNDECODED, "error": ""}
    source: Path | io.BytesIO = path
    try:
        size = path.stat().st_size
        if size <= IN_MEMORY_MAX:  # one read serves both the digest and the decoder
            data = path.read_bytes()
            out["sha256"] = hashlib.sha256(data).hexdigest()
            source = io.BytesIO(data)
        else:
            out["sha256"] = sha256_file(path)
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
