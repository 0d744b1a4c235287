"""Contact sheets: a grid of captioned thumbnails in one PNG-ready image.

Used for the sample set's preview (``docs/samples.png``) and for showing a
query with its nearest neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import BadInput

BACKGROUND = (255, 255, 255)
BORDER = (218, 218, 218)
TEXT = (40, 40, 40)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font scales from 10.1 on; without FreeType it falls back to a fixed bitmap font.
    return ImageFont.load_default(size=size)


def _size(font) -> int:
    return getattr(font, "size", 11)  # the bitmap fallback font is about 11 px tall


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], *, columns: int = 5, tile_size: int = 160,
                  title: str | None = None) -> Image.Image:
    """Lay ``(image, caption)`` pairs out in a grid and return the sheet as an RGB image.

    Each image is scaled (up or down, aspect kept) to fit a ``tile_size`` square,
    centred on white, with its caption (``\\n`` starts a second line) centred
    under it. Layout: a margin ``m = max(4, tile_size // 16)`` surrounds every
    cell, so the sheet is ``c * (tile_size + m) + m`` pixels wide for
    ``c = min(columns, len(tiles))`` columns; the height grows with the rows,
    the caption lines and the optional ``title`` on top.
    """
    if not tiles:
        raise BadInput("a contact sheet needs at least one tile")
    if columns < 1 or tile_size < 16:
        raise BadInput("columns must be >= 1 and tile_size >= 16")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    margin = max(4, tile_size // 16)
    font = _font(max(10, tile_size // 11))
    line_height = round(_size(font) * 1.25)
    caption_lines = max((len(caption.split("\n")) if caption else 0) for _, caption in tiles)
    caption_height = caption_lines * line_height + (margin // 2 if caption_lines else 0)
    title_font = _font(max(12, tile_size // 7))
    title_height = round(_size(title_font) * 1.3) + margin if title else 0
    cell_w, cell_h = tile_size + margin, tile_size + caption_height + margin

    sheet = Image.new("RGB", (columns * cell_w + margin, title_height + rows * cell_h + margin), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((margin, margin), _fit_text(draw, title, title_font, sheet.width - 2 * margin),
                  font=title_font, fill=TEXT)
    for index, (image, caption) in enumerate(tiles):
        row, column = divmod(index, columns)
        x0, y0 = margin + column * cell_w, title_height + margin + row * cell_h
        thumb = ImageOps.contain(image.convert("RGB"), (tile_size, tile_size), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x0 + (tile_size - thumb.width) // 2, y0 + (tile_size - thumb.height) // 2))
        draw.rectangle((x0 - 1, y0 - 1, x0 + tile_size, y0 + tile_size), outline=BORDER)
        for line_no, line in enumerate(caption.split("\n") if caption else []):
            text = _fit_text(draw, line, font, tile_size)
            y = y0 + tile_size + margin // 2 + line_no * line_height
            draw.text((x0 + tile_size / 2, y), text, font=font, fill=TEXT, anchor="ma")
    return sheet
