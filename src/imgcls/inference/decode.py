"""Why an image could not be decoded, in the manifest's words (predict and serving share it)."""

from __future__ import annotations

from PIL import UnidentifiedImageError

from imgcls.data.imageinfo import TOO_LARGE_ERRORS, ImageTooLarge


def decode_error(err: BaseException) -> str:
    """A short reason for a file that cannot be decoded (same words as the manifest)."""
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "is a folder"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, UnidentifiedImageError):
        return "not an image"
    if isinstance(err, ImageTooLarge):
        return str(err)  # "too large: 12000x12000 > max_image_pixels (89478485)"
    if isinstance(err, (*TOO_LARGE_ERRORS, MemoryError)):
        return "too large"
    first = (str(err).splitlines() or [""])[0][:200]
    return f"corrupt image ({type(err).__name__}: {first})" if first else "corrupt image"
