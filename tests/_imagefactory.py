"""Write real good and bad image files for tests (importable by any test module).

Every helper takes the destination path, creates its folder, writes real bytes (Pillow-encoded
images, or deliberately broken ones) and returns the path.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _prepare(path: Path) -> Path:
    """Create the parent folder of `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def noise(size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random image (deterministic per seed) so that encoders cannot compress it away."""
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def png(path: Path, size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> Path:
    """A valid PNG of random pixels (mode L, RGB or RGBA)."""
    noise(size, mode, seed).save(_prepare(path), format="PNG")
    return Path(path)


def jpeg(path: Path, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """A valid RGB JPEG of random pixels."""
    noise(size, "RGB", seed).save(_prepare(path), format="JPEG", quality=90)
    return Path(path)


def gray_png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A valid 8-bit grayscale PNG."""
    return png(path, size, "L")


def rgba_png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A valid RGBA PNG with varying transparency."""
    return png(path, size, "RGBA")


def palette_png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A valid palette (mode P) PNG."""
    noise(size, "RGB").quantize(colors=16).save(_prepare(path), format="PNG")
    return Path(path)


def png16(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A valid 16-bit grayscale PNG (Pillow mode I;16)."""
    arr = np.linspace(0, 65535, size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0])
    Image.fromarray(arr).save(_prepare(path), format="PNG")  # uint16 array -> mode I;16
    return Path(path)


def cmyk_jpeg(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """A valid CMYK JPEG (as print workflows produce)."""
    noise(size, "RGB").convert("CMYK").save(_prepare(path), format="JPEG")
    return Path(path)


def one_by_one_png(path: Path) -> Path:
    """A valid 1 x 1 PNG."""
    Image.new("RGB", (1, 1), (200, 10, 10)).save(_prepare(path), format="PNG")
    return Path(path)


def exif_rotated_jpeg(path: Path, size: tuple[int, int] = (40, 20)) -> Path:
    """A JPEG stored `size` wide, with EXIF Orientation 6 (display rotated 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    noise(size, "RGB").save(_prepare(path), format="JPEG", exif=exif.tobytes())
    return Path(path)


def empty_file(path: Path) -> Path:
    """A zero-byte file."""
    _prepare(path).write_bytes(b"")
    return Path(path)


def text_file(path: Path, text: str = "this is not an image\n") -> Path:
    """A text file (typically given an image extension such as `.jpg`)."""
    _prepare(path).write_text(text, encoding="utf-8")
    return Path(path)


def truncated(path: Path, fmt: str = "PNG", size: tuple[int, int] = (64, 64)) -> Path:
    """A PNG or JPEG cut off after half of its bytes."""
    buf = io.BytesIO()
    noise(size, "RGB").save(buf, format=fmt)
    data = buf.getvalue()
    _prepare(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(path: Path, side: int = 50_000) -> Path:
    """A tiny PNG whose header claims side x side pixels (2.5 gigapixels by default)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * (side + 1) * 4)  # a few rows; the header is what matters
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    _prepare(path).write_bytes(data)
    return Path(path)


def class_folder(root: Path, label: str, n: int = 3, size: tuple[int, int] = (16, 16)) -> Path:
    """A class folder `root/label` holding `n` distinct valid PNGs; returns the folder."""
    folder = Path(root) / label
    for i in range(n):
        png(folder / f"{label}_{i:03d}.png", size, "RGB", seed=zlib.crc32(f"{label}{i}".encode()))
    return folder
