"""Awkward image files, really encoded, with what ``open_image``/``probe`` should make of them.

``build_bad_corpus(dir)`` writes every file of :data:`CORPUS` into ``dir``. Good
files carry their displayed size, format and the pixels an upright 8-bit RGB
decode must have; bad ones carry a substring of the ``ImageError.reason``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .pixels import blank_png

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)

Pixel = tuple[tuple[int, int], tuple[int, int, int]]  # ((x, y), (r, g, b))


@dataclass(frozen=True)
class Expectation:
    """What one corpus file should decode to, or why it must be refused."""

    reason: str | None = None            # substring of ImageError.reason; None: it decodes
    size: tuple[int, int] | None = None  # displayed (width, height), after EXIF orientation
    format: str | None = None            # Pillow format name that probe reports
    pixels: tuple[Pixel, ...] = ()       # pixels of open_image's result
    tolerance: int = 0                   # per channel, for lossy codecs
    check: Callable[[Image.Image], None] | None = None  # further assertions on open_image's result

    @property
    def ok(self) -> bool:
        return self.reason is None

    def assert_matches(self, img: Image.Image) -> None:
        """Assert that ``img`` (an ``open_image`` result) is what this file should give."""
        assert img.mode == "RGB", img.mode
        assert img.size == self.size, (img.size, self.size)
        for (x, y), expected in self.pixels:
            actual = img.getpixel((x, y))
            assert all(abs(a - e) <= self.tolerance for a, e in zip(actual, expected)), \
                f"pixel {(x, y)} is {actual}, expected {expected} ± {self.tolerance}"
        if self.check is not None:
            self.check(img)


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A detailed RGB picture (gradients plus noise) that compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     (x + y) * 255 // max(width + height - 2, 1)], axis=-1)
    noise = rng.integers(-40, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _blocks(width: int, height: int, blocks: dict[tuple[int, int, int, int], tuple[int, ...]],
            mode: str = "RGB", background: tuple[int, ...] = WHITE) -> Image.Image:
    """An image of flat rectangles: {(x0, y0, x1, y1): colour}."""
    img = Image.new(mode, (width, height), background)
    for box, colour in blocks.items():
        img.paste(colour, box)
    return img


# -- broken or not-an-image files ------------------------------------------------

def _truncated_jpeg() -> bytes:
    data = _encode(_photo(96, 64), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]


def _header_only_jpeg() -> bytes:
    return _encode(_photo(96, 64), "JPEG")[:20]


def _truncated_png() -> bytes:
    data = _encode(_photo(96, 64), "PNG")
    return data[: len(data) * 6 // 10]


def _random_bytes() -> bytes:
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _text() -> bytes:
    return b"label\turl\nleopard\thttp://example.invalid/il_570xN.jpg\n"


def _html() -> bytes:
    return (b"<!DOCTYPE html>\n<html><head><title>404</title></head>"
            b"<body>Sorry, this image is gone.</body></html>\n")


# -- unusual modes ---------------------------------------------------------------

# CMYK bands, 16 px wide (JPEG block aligned): cyan, magenta, yellow, black, white.
_CMYK_BANDS = [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)),
               ((0, 0, 255, 0), (255, 255, 0)), ((0, 0, 0, 255), BLACK), ((0, 0, 0, 0), WHITE)]


def _cmyk_jpeg() -> bytes:
    img = _blocks(80, 16, {(16 * i, 0, 16 * i + 16, 16): cmyk for i, (cmyk, _) in enumerate(_CMYK_BANDS)},
                  mode="CMYK", background=(0, 0, 0, 0))
    return _encode(img, "JPEG", quality=95)  # Pillow writes Adobe-style inverted CMYK


def _grey16_png() -> bytes:
    # Columns 0..255 hold x * 257, so 8-bit scaling must give exactly x.
    row = np.arange(256, dtype=np.uint16) * 257
    return _encode(Image.fromarray(np.tile(row, (8, 1))), "PNG")


def _check_grey16(img: Image.Image) -> None:
    values = np.asarray(img).astype(int)
    assert (values == values[..., :1]).all(), "grey must stay grey"
    error = np.abs(values[0, :, 0] - np.arange(256)).max()
    assert error <= 1, f"16-bit gradient not scaled to 8 bits (max error {error})"


def _rgba_png() -> bytes:
    # Left half fully transparent (black underneath), right: opaque red over half-transparent blue.
    img = _blocks(40, 20, {(20, 0, 40, 10): (255, 0, 0, 255), (20, 10, 40, 20): (0, 0, 255, 128)},
                  mode="RGBA", background=(0, 0, 0, 0))
    return _encode(img, "PNG")


def _la_png() -> bytes:
    return _encode(_blocks(30, 20, {(10, 0, 20, 20): (0, 255), (20, 0, 30, 20): (0, 128)},
                           mode="LA", background=(0, 0)), "PNG")


def _palette_png() -> bytes:
    img = Image.new("P", (24, 24), 0)
    img.putpalette([0, 0, 0, 0, 200, 0])  # index 0 black (transparent), 1 green
    img.paste(1, (12, 0, 24, 24))
    return _encode(img, "PNG", transparency=0)


def _bilevel_png() -> bytes:
    img = Image.new("1", (32, 16), 1)
    img.paste(0, (16, 0, 32, 16))
    return _encode(img, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), colour) for colour in (RED, GREEN, BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _check_flat(img: Image.Image) -> None:
    colours = np.unique(np.asarray(img).reshape(-1, 3), axis=0)
    assert len(colours) == 1, "the first frame is one flat colour"


# -- EXIF orientation --------------------------------------------------------------

# The upright picture: 48x32, white, red 16x16 block in the top-left corner.
_UPRIGHT = _blocks(48, 32, {(0, 0, 16, 16): RED})

# How a camera stores the upright picture for each EXIF orientation, written from
# the EXIF spec's row/column meaning (not from Pillow's table, which is under test).
_STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],           # mirrored left-right
    3: lambda a: a[::-1, ::-1],        # rotated 180
    4: lambda a: a[::-1, :],           # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the top-left diagonal
    6: lambda a: np.rot90(a, 1),        # rotated 90 counter-clockwise: display turns it clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, -1),       # rotated 90 clockwise: display turns it back
}


def _oriented_jpeg(orientation: int) -> Callable[[], bytes]:
    def make() -> bytes:
        stored = Image.fromarray(np.ascontiguousarray(_STORED[orientation](np.asarray(_UPRIGHT))))
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    return make


_UPRIGHT_PIXELS = (((8, 8), RED), ((40, 8), WHITE), ((8, 24), WHITE), ((40, 24), WHITE))


# -- decompression bombs -----------------------------------------------------------

# -- other formats -------------------------------------------------------------------

_QUADRANTS = {(0, 0, 20, 16): RED, (20, 0, 40, 16): GREEN, (0, 16, 20, 32): BLUE}  # rest white
_QUADRANT_PIXELS = (((10, 8), RED), ((30, 8), GREEN), ((10, 24), BLUE), ((30, 24), WHITE))


CORPUS: dict[str, tuple[Callable[[], bytes], Expectation]] = {
    "empty.jpg": (lambda: b"", Expectation(reason="empty file")),
    "truncated.jpg": (_truncated_jpeg, Expectation(reason="truncated")),
    "header_only.jpg": (_header_only_jpeg, Expectation(reason="truncated image: unreadable JPEG header")),
    "truncated.png": (_truncated_png, Expectation(reason="truncated")),
    "random.jpg": (_random_bytes, Expectation(reason="not an image: unrecognised format")),
    "notes.txt": (_text, Expectation(reason="not an image: text")),
    "page.jpg": (_html, Expectation(reason="not an image: HTML page")),
    "cmyk.jpg": (_cmyk_jpeg, Expectation(
        size=(80, 16), format="JPEG", tolerance=24,
        pixels=tuple(((16 * i + 8, 8), rgb) for i, (_, rgb) in enumerate(_CMYK_BANDS)))),
    "grey16.png": (_grey16_png, Expectation(size=(256, 8), format="PNG", check=_check_grey16)),
    "rgba.png": (_rgba_png, Expectation(
        size=(40, 20), format="PNG", tolerance=1,
        pixels=(((5, 5), WHITE), ((5, 15), WHITE), ((30, 5), RED), ((30, 15), (127, 127, 255))))),
    "la.png": (_la_png, Expectation(
        size=(30, 20), format="PNG", tolerance=1,
        pixels=(((5, 10), WHITE), ((15, 10), BLACK), ((25, 10), (127, 127, 127))))),
    "palette_transparent.png": (_palette_png, Expectation(
        size=(24, 24), format="PNG", pixels=(((5, 5), WHITE), ((18, 5), (0, 200, 0))))),
    "bilevel.png": (_bilevel_png, Expectation(
        size=(32, 16), format="PNG", pixels=(((8, 8), WHITE), ((24, 8), BLACK)))),
    "animated.gif": (_animated_gif, Expectation(
        size=(20, 20), format="GIF", pixels=(((10, 10), RED),), check=_check_flat)),
    **{f"orientation_{n}.jpg": (_oriented_jpeg(n), Expectation(
        size=(48, 32), format="JPEG", tolerance=40, pixels=_UPRIGHT_PIXELS)) for n in range(1, 9)},
    # Pillow refuses above 2x MAX_IMAGE_PIXELS, and only warns between 1x and 2x.
    "bomb.png": (lambda: blank_png(20000, 20000, rgb=False), Expectation(reason="decompression bomb")),
    "bomb_warning.png": (lambda: blank_png(10000, 10000, rgb=False), Expectation(reason="decompression bomb")),
    "photo.webp": (lambda: _encode(_blocks(40, 32, _QUADRANTS), "WEBP", quality=90), Expectation(
        size=(40, 32), format="WEBP", tolerance=24, pixels=_QUADRANT_PIXELS)),
    "photo.tif": (lambda: _encode(_blocks(40, 32, _QUADRANTS), "TIFF", compression="tiff_lzw"), Expectation(
        size=(40, 32), format="TIFF", pixels=_QUADRANT_PIXELS)),
}


def build_bad_corpus(dir: Path) -> dict[str, Expectation]:
    """Write every corpus file into ``dir``; return file name -> expectation."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    for name, (make, _) in CORPUS.items():
        (dir / name).write_bytes(make())
    return {name: expectation for name, (_, expectation) in CORPUS.items()}


def sample_images() -> dict[str, bytes]:
    """Three small, distinct, well-formed images: ``a.jpg``, ``b.png``, ``c.jpg``."""
    return {
        "a.jpg": _encode(_photo(64, 48, seed=1), "JPEG", quality=90),
        "b.png": _encode(_blocks(40, 32, _QUADRANTS), "PNG"),
        "c.jpg": _encode(_photo(80, 60, seed=2).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90),
    }
