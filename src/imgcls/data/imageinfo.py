"""Image files in ingest's worker processes: describe one safely, or write generated ones.

`inspect_image` opens one file and describes it: digest, size, mode, format, perceptual hash,
error. `write_png_chunk` writes generated images (digits, IDX) as PNG files. This module is what
the worker processes import, so it stays light (Pillow, numpy, stdlib): no pandas, no torch.
Every decode failure becomes a short `error` reason instead of an exception, so one bad file can
never stop ingest; the validate stage decides what to do with it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow may only use decoders for real image formats: a file is never handed to, say, the EPS
# plugin (which shells out to Ghostscript) or a font/ICNS/animation decoder just because its bytes
# happen to look like one.
# (Multi-picture JPEGs, format "MPO", are opened by the JPEG plugin.)
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")

HASH_CHUNK = 1 << 20
IN_MEMORY_MAX = 32 << 20  # files up to this size are read once into memory

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


def _to_gray(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit grayscale (16-bit and float images are rescaled)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own conversion clips high-bit-depth data to 0..255; rescale by the real range
        # so a 16-bit scan hashes like its 8-bit export.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    return im.convert("L")


def phash(im: Image.Image) -> str:
    """64-bit DCT perceptual hash (the classic pHash) as 16 hex characters."""
    small = _to_gray(im).resize((32, 32), Image.Resampling.BILINEAR)
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
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
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


def _decode(source: Path | io.BytesIO) -> dict[str, Any]:
    """Open, fully decode and EXIF-orient an image; return its visible properties."""
    with Image.open(source, formats=IMAGE_FORMATS) as im:
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
    # Worker processes are fresh interpreters, so these process-wide settings are set per call;
    # they are cheap assignments.
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a grey stripe
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x the limit; treat that as the limit too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            out.update(_decode(source))
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
