"""The one way to open an image.

Every step that needs pixels calls :func:`open_image`. It applies the EXIF
orientation, normalises every Pillow mode to 8-bit RGB (alpha composited on
white), takes the first frame of an animation, keeps Pillow's
decompression-bomb guard on, and turns anything undecodable into an
:class:`ImageError` whose ``reason`` is short enough to store on the image's
row.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadInput

# Pillow's own default (about 89 megapixels): above it Pillow warns, above twice
# it raises. _decode refuses what Pillow would only warn about, by its own size
# check: the warnings filter is process-wide and not thread-safe (inspect and
# ingest decode in threads), so switching it per call let bombs through a race.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# What one query or thumbnail may decode (web, `similar`): larger JPEGs decode at
# 1/2, 1/4 or 1/8 scale to fit, other formats are refused before any pixel is
# allocated. Decoding an RGB PNG of this size peaks at about 180 MB (measured).
QUERY_MAX_PIXELS = 40_000_000

# Formats written by lossless codecs, preferred as keepers when sizes tie.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "TIFF", "GIF", "WEBP_LOSSLESS", "PPM", "TGA"})

# Extension for each Pillow format name, used when exporting.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
              "TIFF": "tif", "MPO": "jpg", "PPM": "ppm", "TGA": "tga", "ICO": "ico"}

WHITE = (255, 255, 255)


class ImageError(BadInput):
    """An image that cannot be used; ``reason`` is what gets recorded."""


@dataclass(frozen=True)
class ImageInfo:
    width: int   # as displayed, after EXIF orientation
    height: int
    format: str  # Pillow's format name of the encoded bytes, e.g. "JPEG"


Source = bytes | str | Path


# Leading bytes of formats we read, to tell a cut-off image from a non-image.
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _as_file(source: Source) -> BinaryIO:
    # We open paths ourselves so that _decode can close them: Pillow keeps a
    # file it was handed by name open when decoding fails or frames remain.
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file")
        return io.BytesIO(source)
    path = Path(source)
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise ImageError(f"file not found: {path.name}") from None
    except OSError as exc:
        raise ImageError(f"unreadable file: {exc.strerror}") from None
    if os.fstat(file.fileno()).st_size == 0:
        file.close()
        raise ImageError("empty file")
    return file


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: scale to 8 bits (Pillow's convert would clip at 255).
        values = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        if mode == "I" and values.max(initial=0) <= 255:
            grey = values.astype(np.uint8)
        else:
            grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    # 1, L, CMYK, YCbCr, LAB, HSV: Pillow converts these correctly.
    return img.convert("RGB")


def _jpeg_draft(size: tuple[int, int], draft: tuple[int, int] | None,
               max_pixels: int) -> tuple[int, int] | None:
    """The size to ask the JPEG decoder for: the caller's draft, smaller where the pixel budget needs it."""
    width, height = size
    for scale in (1, 2, 4, 8):  # the scales libjpeg decodes at directly
        if -(-width // scale) * -(-height // scale) <= max_pixels:
            break
    if scale == 1:
        return draft
    fits = (width // scale, height // scale)  # Pillow picks scale s for a request of size // s
    return fits if draft is None else (min(draft[0], fits[0]), min(draft[1], fits[1]))


def _decode(source: Source, draft: tuple[int, int] | None,
            max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    file = _as_file(source)
    with file:
        try:
            img = Image.open(file)
            fmt = img.format or "unknown"
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_PIXELS:   # Pillow's own wording, as when it raises
                raise ImageError(f"decompression bomb: Image size ({width * height} pixels) exceeds "
                                 f"limit of {MAX_PIXELS} pixels")
            request = _jpeg_draft(img.size, draft, max_pixels) if fmt == "JPEG" else None
            if request is not None:
                img.draft("RGB", request)
            if img.size[0] * img.size[1] > max_pixels:
                raise ImageError(f"too many pixels: {width}x{height} is {width * height / 1e6:.1f} "
                                 f"megapixels, over the limit of {max_pixels / 1e6:g}")
            img.seek(0)  # first frame of an animation
            img.load()
        except ImageError:
            raise  # our own refusal, as it is (an ImageError is a ValueError too)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"decompression bomb: {exc}".split(" could be")[0].rstrip(",")) from None
        except UnidentifiedImageError:
            raise ImageError(_unidentified_reason(file)) from None
        except OSError as exc:
            text = str(exc)
            lowered = text.lower()
            if "truncated" in lowered or "premature end" in lowered or "broken data stream" in lowered:
                raise ImageError("truncated image") from None
            raise ImageError(f"undecodable image: {text}") from None
        except (ValueError, SyntaxError, EOFError, IndexError, MemoryError) as exc:
            raise ImageError(f"undecodable image: {type(exc).__name__}: {exc}") from None
    return img, fmt


def _unidentified_reason(file: BinaryIO) -> str:
    file.seek(0)
    head = file.read(512)
    for signature, fmt in SIGNATURES.items():
        if head.startswith(signature):  # an image cut off before Pillow could read its header
            return f"truncated image: unreadable {fmt} header"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "truncated image: unreadable WEBP header"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "not an image: HTML page"
    try:
        head.decode("utf-8")
        return "not an image: text"
    except UnicodeDecodeError:
        return "not an image: unrecognised format"


def open_image(source: Source, *, draft: tuple[int, int] | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (bytes or a path) into an upright 8-bit RGB image.

    ``draft`` lets JPEG decode at a reduced scale no smaller than the given
    size; it is an opt-in speed-up and changes pixels, so callers that must
    match a reference decode leave it unset.
    ``max_pixels`` is the pixel budget: a JPEG over it decodes at a reduced
    scale that fits, anything else over it is refused before decoding. The
    default is the decompression-bomb guard the steps load with; queries pass
    :data:`QUERY_MAX_PIXELS`.
    Raises :class:`ImageError` with a storable reason.
    """
    img, _ = _decode(source, draft, max_pixels)
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: an upright image is not copied
    except Exception:  # a broken EXIF block is not worth losing the image for
        pass
    return _to_rgb(img)


def probe(source: Source) -> ImageInfo:
    """Fully decode ``source`` (to catch truncation) and report its displayed size."""
    img, fmt = _decode(source, None)
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if orientation in (5, 6, 7, 8):  # these orientations swap width and height
        width, height = height, width
    return ImageInfo(width=width, height=height, format=fmt)


def thumbnail_jpeg(source: Source, size: int, quality: int) -> bytes:
    """The image as a JPEG no larger than ``size`` on its longest side.

    JPEGs decode at reduced scale (``draft``): a thumbnail needs no more.
    Decodes within the query budget; raises :class:`ImageError` as :func:`open_image` does.
    """
    image = open_image(source, draft=(size, size), max_pixels=QUERY_MAX_PIXELS)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()
