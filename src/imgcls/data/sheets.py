"""Contact sheets: captioned strips of thumbnails, for the validation and split reports."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from imgcls.data.imageinfo import DEFAULT_MAX_PIXELS, open_image
from imgcls.io import atomic_path


def contact_sheet(
    rows: list[tuple[str, list[str]]],
    out: Path,
    root: Path | str = ".",
    side: int = 48,
    per_row: int = 12,
) -> bool:
    """Write a PNG with one captioned strip of thumbnails per row; False if nothing to show."""
    if not rows:
        return False
    caption_h = 14
    widest = max(1, min(per_row, max(len(paths) for _, paths in rows)))
    width = max(widest * (side + 2) + 2, 320)  # room for a caption
    height = len(rows) * (side + caption_h + 4) + 2
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 2
    for caption, paths in rows:
        draw.text((2, y), caption[: width // 6], fill="black")
        y += caption_h
        for k, p in enumerate(paths[:per_row]):
            try:
                with open_image(Path(root) / p, DEFAULT_MAX_PIXELS) as im:
                    im.draft("RGB", (side, side))
                    tile = ImageOps.pad(im.convert("RGB"), (side, side), color="white")
            except Exception:  # a file gone since validation: leave its tile grey
                tile = Image.new("RGB", (side, side), "lightgray")
            sheet.paste(tile, (2 + k * (side + 2), y))
        y += side + 4
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return True
