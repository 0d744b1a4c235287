"""The sample set: garment product photos printed with dotted, striped and leopard textures.

There is no network at run time, so the demo and the tests use images this
module renders itself with Pillow and NumPy: upper-body garments (t-shirts,
long-sleeve tops, sweaters, tank tops, blouses, dresses) laid out like shop
photos on light backgrounds, with folds, soft shading and a drop shadow. The
three labels share one colour palette and vary strongly in scale and angle,
so a classifier must look at the pattern, not at the mean colour.

A share of the originals also gets planted near-copies, each made by one to
three of the copy transforms in :data:`COPY_OPS` (mirrored, cropped by 5–30 %,
rotated by 1–5°, squashed, resized, framed or padded, brightened and
contrasted, grey, blurred, captioned or watermarked, re-compressed, or
re-encoded as PNG), whose pairs are written to ``ground_truth.csv``; copies are
saved as JPEG quality 90 unless their transform says ``jpeg:qNN`` or ``png``.
Everything is derived from the seed: the same seed writes byte-identical
files, whatever the thread scheduling.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

from .errors import BadInput
from .steps import default
from .images import open_image
from .sheets import contact_sheet
from .workpool import cores

LABELS = ("dotted", "striped", "leopard")

GARMENTS = ("tshirt", "longsleeve", "sweater", "tank", "blouse", "dress")
GARMENT_WEIGHTS = (0.26, 0.17, 0.15, 0.14, 0.14, 0.14)

# One palette for every label (sRGB, 0..255), so colour alone does not give the label away.
PALETTE = {
    "white": (246, 246, 243), "cream": (240, 231, 212), "ivory": (250, 244, 228), "black": (26, 26, 29),
    "charcoal": (62, 63, 68), "grey": (146, 147, 150), "light grey": (206, 206, 208), "navy": (29, 38, 76),
    "royal": (42, 78, 168), "sky": (150, 190, 226), "teal": (22, 108, 118), "mint": (172, 219, 200),
    "forest": (36, 84, 56), "olive": (112, 114, 60), "mustard": (214, 168, 52), "camel": (190, 146, 96),
    "tan": (208, 172, 124), "brown": (96, 61, 40), "chocolate": (58, 38, 29), "rust": (168, 80, 42),
    "red": (190, 32, 42), "burgundy": (110, 26, 42), "coral": (238, 122, 102), "blush": (240, 202, 196),
    "pink": (234, 132, 170), "fuchsia": (196, 42, 120), "lavender": (190, 172, 220), "purple": (92, 52, 122),
    "orange": (232, 122, 42), "yellow": (244, 214, 82), "khaki": (196, 182, 142), "denim": (70, 98, 140),
}
_COLOURS = np.array(list(PALETTE.values()), dtype=np.float32) / 255.0
_LUMA = _COLOURS @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Classic animal-print colours, used for most (not all) leopard prints and some dots and stripes.
_ANIMAL_BASES = ("tan", "camel", "cream", "khaki", "ivory", "mustard")
_ANIMAL_INKS = ("black", "chocolate", "brown")

# Light studio backgrounds.
BACKGROUNDS = ((247, 247, 247), (240, 240, 238), (236, 233, 228), (244, 240, 233), (232, 236, 240),
               (242, 236, 236), (226, 228, 230), (250, 250, 250), (235, 238, 232))

SUPERSAMPLE = 3      # polygon masks are drawn this many times larger, then reduced, for smooth edges
MIN_BYTES = 20_000   # originals below this are saved again at a higher JPEG quality
COPY_QUALITY = 90    # JPEG quality of copies whose transform does not name one

Point = tuple[float, float]


@dataclass(frozen=True)
class SampleSet:
    """What :func:`render_samples` wrote. ``images`` counts every file (originals and
    copies), ``per_label`` the files in each label folder (copies included)."""

    root: Path
    images: int
    copies: int
    per_label: dict[str, int]
    manifest: Path
    ground_truth: Path


# --------------------------------------------------------------------------- garment shapes


@dataclass
class _Garment:
    """A garment in garment units: the chest is 1 wide (x in -0.5..0.5), y grows downwards from the neck."""

    outline: list[Point]
    inside: list[Point]                  # the back of the neckline, seen through the neck opening
    neckband: list[Point]
    sleeves: list[list[Point]] = field(default_factory=list)
    bands: list[list[Point]] = field(default_factory=list)   # ribbed cuffs and hem (sweaters)
    seams: list[list[Point]] = field(default_factory=list)   # polylines
    buttons: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius
    hook: list[Point] | None = None      # a hanger's hook above the neck
    sleeve_axes: list[float] = field(default_factory=list)  # sleeve direction, radians, per sleeve


def _mirror(points: list[Point]) -> list[Point]:
    return [(-x, y) for x, y in reversed(points)]


def _bezier(p0: Point, p1: Point, p2: Point, n: int = 10) -> list[Point]:
    t = np.linspace(0.0, 1.0, n)
    x = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t ** 2 * p2[0]
    y = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t ** 2 * p2[1]
    return list(zip(x.tolist(), y.tolist()))


def _neckline(shape: str, half_width: float, depth: float, n: int = 18) -> list[Point]:
    """Front neckline from (w, 0) down to (0, depth) and up to (-w, 0)."""
    t = np.linspace(0.0, math.pi, n)
    x = half_width * np.cos(t)
    y = depth * (1 - np.abs(np.cos(t))) if shape == "v" else depth * np.sin(t)
    return list(zip(x.tolist(), y.tolist()))


def _garment(kind: str, rng: np.random.Generator) -> _Garment:
    u = rng.uniform
    sleeveless = kind == "tank" or (kind == "dress" and rng.random() < 0.5)
    neck = rng.choice(("crew", "scoop", "v"), p=(0.25, 0.45, 0.3) if sleeveless or kind == "blouse"
                      else (0.6, 0.2, 0.2))
    neck_w = u(0.18, 0.25) if sleeveless else u(0.14, 0.19)
    neck_depth = {"crew": u(0.09, 0.14), "scoop": u(0.17, 0.27), "v": u(0.22, 0.34)}[neck]
    back_depth = u(0.05, 0.09) if sleeveless else u(0.025, 0.05)
    length = {"tshirt": u(1.15, 1.35), "longsleeve": u(1.2, 1.4), "sweater": u(1.05, 1.22),
              "tank": u(1.2, 1.45), "blouse": u(1.1, 1.3), "dress": u(1.9, 2.3)}[kind]
    hem_w = u(0.49, 0.55) if kind != "sweater" else u(0.46, 0.5)
    g = _Garment(outline=[], inside=[], neckband=[])

    right: list[Point] = [(neck_w, 0.0)]
    if sleeveless:
        strap = u(0.07, 0.12)
        armpit = (0.5, u(0.36, 0.46))
        right += _bezier((neck_w + strap, 0.0), (neck_w + strap + 0.02, armpit[1] * 0.8), armpit)
    else:
        shoulder = (u(0.47, 0.53), u(0.05, 0.09))
        angle, reach, opening, armpit_y = {
            "tshirt": (u(25, 42), u(0.28, 0.4), u(0.2, 0.26), u(0.3, 0.36)),
            "dress": (u(25, 42), u(0.22, 0.32), u(0.18, 0.24), u(0.3, 0.36)),
            "blouse": (u(45, 60), u(0.55, 0.75), u(0.25, 0.33), u(0.32, 0.38)),
            "longsleeve": (u(55, 72), u(0.85, 1.05), u(0.14, 0.18), u(0.3, 0.36)),
            "sweater": (u(50, 68), u(0.85, 1.0), u(0.16, 0.2), u(0.32, 0.38)),
        }[kind]
        a = math.radians(angle)
        d = (math.cos(a), math.sin(a))
        n = (-math.sin(a), math.cos(a))
        end_top = (shoulder[0] + reach * d[0], shoulder[1] + reach * d[1])
        end_bottom = (end_top[0] + opening * n[0], end_top[1] + opening * n[1])
        armpit = (0.5, armpit_y)
        right += [shoulder, end_top, end_bottom, armpit]
        sleeve = [shoulder, end_top, end_bottom, armpit]
        g.sleeves += [sleeve, _mirror(sleeve)]
        g.sleeve_axes += [a, math.pi - a]
        g.seams += [[shoulder, armpit], _mirror([shoulder, armpit])]
        if kind in ("sweater", "longsleeve"):
            cuff = u(0.07, 0.1)
            back = (-cuff * d[0], -cuff * d[1])
            band = [end_top, (end_bottom[0] + n[0] * 0.02, end_bottom[1] + n[1] * 0.02),
                    (end_bottom[0] + back[0], end_bottom[1] + back[1]), (end_top[0] + back[0], end_top[1] + back[1])]
            g.bands += [band, _mirror(band)]

    if kind == "dress":
        waist = (u(0.4, 0.46), armpit[1] + u(0.22, 0.32))
        hem_w = u(0.65, 0.95)
        right += _bezier(armpit, (0.5, (armpit[1] + waist[1]) / 2), waist)[1:]
        right += _bezier(waist, ((waist[0] + hem_w) / 2 - 0.03, (waist[1] + length) / 2), (hem_w, length))[1:]
        g.seams += [[(-waist[0], waist[1]), waist]]
        hem = _bezier((hem_w, length), (hem_w * 0.5, length + 0.05), (0.0, length + 0.05))
    else:
        side_end = (hem_w, length - (u(0.05, 0.09) if kind == "blouse" else 0.0))
        right += _bezier(armpit, (0.5 - u(0.0, 0.04), (armpit[1] + length) * 0.55), side_end)[1:]
        sag = u(0.02, 0.05) if kind == "blouse" else u(0.0, 0.02)
        hem = _bezier(side_end, (hem_w * (0.95 if kind == "blouse" else 0.5), length + sag), (0.0, length + sag))
        if kind == "sweater":
            top = length - u(0.07, 0.1)
            g.bands.append([(-3.0, top), (3.0, top), (3.0, 4.0), (-3.0, 4.0)])
        else:
            g.seams.append([(-hem_w, length - 0.035), (hem_w, length - 0.035)])
    right += hem[1:]

    back = list(reversed(_neckline("crew", neck_w, back_depth)))  # from (-w, 0) to (w, 0)
    front = _neckline(neck, neck_w, neck_depth)                    # from (w, 0) to (-w, 0)
    g.outline = right + _mirror(right)[1:] + back[1:-1]
    g.inside = back + front
    band = u(0.035, 0.06) if kind == "sweater" else u(0.018, 0.035)
    g.neckband = front + list(reversed(_neckline(neck, neck_w + band, neck_depth + band * 1.3)))
    if kind == "blouse" and rng.random() < 0.7:
        top = neck_depth + 0.05
        count = int(rng.integers(4, 7))
        radius = u(0.011, 0.016)
        g.buttons = [(0.0, y, radius) for y in np.linspace(top, length - 0.12, count).tolist()]
        g.seams += [[(-0.03, neck_depth), (-0.03, length)], [(0.03, neck_depth), (0.03, length)]]
    return g


# --------------------------------------------------------------------------- textures


def _luma(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _pick_colour(rng: np.random.Generator, names: tuple[str, ...] | None = None) -> np.ndarray:
    if names is not None:
        return np.array(PALETTE[str(rng.choice(names))], dtype=np.float32) / 255.0
    return _COLOURS[int(rng.integers(len(_COLOURS)))]


def _contrasting(rng: np.random.Generator, base: np.ndarray, min_contrast: float) -> np.ndarray:
    choices = np.flatnonzero(np.abs(_LUMA - _luma(base)) >= min_contrast)
    return _COLOURS[int(rng.choice(choices))] if len(choices) else 1.0 - base


def _base_and_ink(rng: np.random.Generator, animal_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Two print colours: usually strong contrast, sometimes tone-on-tone or animal-print colours."""
    if rng.random() < animal_share:
        base, ink = _pick_colour(rng, _ANIMAL_BASES), _pick_colour(rng, _ANIMAL_INKS)
        return (base, ink) if rng.random() < 0.8 else (ink, base)
    base = _pick_colour(rng)
    return base, _contrasting(rng, base, 0.3 if rng.random() < 0.85 else 0.12)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, y * c - x * s


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of the non-zero part of ``mask``, or None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _paint(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> None:
    """Blend ``source`` (a colour or an image like ``target``) over ``target`` in place, by ``mask``.

    Only the box where ``mask`` is non-zero is touched: trims and sleeves are small.
    """
    box = _box(mask)
    if box is None:
        return
    patch = source[box] if source.ndim == 3 else source
    target[box] += (patch - target[box]) * mask[box][..., None]


def _features(pu: np.ndarray, pv: np.ndarray, rng: np.random.Generator, values: int):
    """Jittered-grid feature points (one per unit cell): the nearest to each pixel.

    Points sit in the middle half of their cell, so searching the 2x2 cells on
    the pixel's side is exact within 0.75 cells, more than any shape drawn
    round a point reaches. Returns (du, dv) from the point to the pixel and
    ``values`` random numbers per pixel that belong to its point.
    """
    iu, iv = np.floor(pu), np.floor(pv)
    u0, v0 = int(iu.min()) - 1, int(iv.min()) - 1
    cols, rows = int(iu.max()) - u0 + 2, int(iv.max()) - v0 + 2
    table = rng.random((values + 2, rows * cols), dtype=np.float32)
    cell = np.arange(rows * cols)
    fx = (cell % cols + u0).astype(np.float32) + 0.25 + 0.5 * table[0]
    fy = (cell // cols + v0).astype(np.float32) + 0.25 + 0.5 * table[1]
    base = ((iv - v0) * cols + (iu - u0)).astype(np.int32)
    step_u = np.where(pu - iu < 0.5, -1, 1).astype(np.int32)
    step_v = np.where(pv - iv < 0.5, -cols, cols).astype(np.int32)
    best, best_d = base, None
    for offset in (None, step_u, step_v, step_u + step_v):
        index = base if offset is None else base + offset
        du, dv = pu - fx[index], pv - fy[index]
        d = du * du + dv * dv
        if best_d is None:
            best_d = d
        else:
            closer = d < best_d
            best, best_d = np.where(closer, index, best), np.minimum(d, best_d)
    return pu - fx[best], pv - fy[best], table[2:, best]


Texture = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _fill(colour: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty((*shape, 3), dtype=np.float32)
    out[:] = colour
    return out


def _dots(rng: np.random.Generator) -> tuple[Texture, np.ndarray, float]:
    """Polka dots on a square or staggered grid, or scattered confetti dots; tiny to large."""
    base, ink = _base_and_ink(rng, 0.15)
    inks = [ink, _contrasting(rng, base, 0.2)] if rng.random() < 0.2 else [ink]
    spacing = float(np.exp(rng.uniform(math.log(7), math.log(70))))
    radius = spacing * rng.uniform(0.13, 0.36)
    staggered = rng.random() < 0.55
    confetti = rng.random() < 0.22
    angle0 = float(rng.choice((0.0, math.pi / 4, rng.uniform(0, math.pi))))
    seed = int(rng.integers(2 ** 31))

    def texture(x: np.ndarray, y: np.ndarray, angle: float) -> np.ndarray:
        u, v = _rotate(x, y, angle0 + angle)
        u, v = u / spacing, v / spacing
        pick = None
        r = radius
        if confetti:
            du, dv, (size, pick) = _features(u, v, np.random.default_rng(seed), 2)
            r = radius * (0.5 + 0.9 * size)
        elif staggered:
            row = np.floor(v / 0.866 + 0.5)
            u = u - 0.5 * (row % 2)
            col = np.floor(u + 0.5)
            du, dv = u - col, v - row * 0.866
        else:
            col, row = np.floor(u + 0.5), np.floor(v + 0.5)
            du, dv = u - col, v - row
        if not confetti and len(inks) > 1:
            pick = (col + row) % 2 * 0.99
        cover = np.clip(r - np.sqrt(du * du + dv * dv) * spacing + 0.5, 0.0, 1.0)
        out = _fill(base, x.shape)
        if pick is not None and len(inks) > 1:
            second = cover * (pick >= 0.5)
            _paint(out, inks[1], second)
            cover = cover - second
        _paint(out, inks[0], cover)
        return out

    return texture, base, 1.5


def _stripes(rng: np.random.Generator) -> tuple[Texture, np.ndarray, float]:
    """Stripes: breton, pinstripe, wide blocks or multi-colour, horizontal, vertical or diagonal."""
    base, ink = _base_and_ink(rng, 0.12)
    style = rng.choice(("classic", "pin", "wide", "multi"), p=(0.45, 0.15, 0.2, 0.2))
    if style == "pin":
        period = rng.uniform(6, 16)
        bands = [(0.5, 0.5 + rng.uniform(1.0, 2.2) / period, ink)]
    elif style == "wide":
        period = rng.uniform(34, 90)
        bands = [(0.5, 0.5 + rng.uniform(0.3, 0.45), ink)]
    elif style == "multi":
        period = rng.uniform(20, 70)
        second = _contrasting(rng, base, 0.15)
        w1, w2 = rng.uniform(0.2, 0.4), rng.uniform(0.06, 0.15)
        bands = [(0.1, 0.1 + w1, ink), (0.2 + w1, 0.2 + w1 + w2, second)]
        if rng.random() < 0.5:
            bands.append((0.3 + w1 + w2, 0.3 + w1 + 2 * w2, ink))
    else:
        period = float(np.exp(rng.uniform(math.log(8), math.log(40))))
        bands = [(0.5, 0.5 + rng.uniform(0.25, 0.45), ink)]
    direction = rng.choice(("horizontal", "vertical", "diagonal"), p=(0.55, 0.2, 0.25))
    angle0 = {"horizontal": math.pi / 2, "vertical": 0.0,
              "diagonal": math.pi / 2 + rng.choice((-1, 1)) * rng.uniform(0.35, 1.05)}[str(direction)]
    shift = rng.uniform(0, 1)

    def texture(x: np.ndarray, y: np.ndarray, angle: float) -> np.ndarray:
        s, _ = _rotate(x, y, angle0 + angle)
        t = (s / period + shift) % 1.0
        out = _fill(base, x.shape)
        for start, end, colour in bands:
            _paint(out, colour, np.clip(np.minimum(t - start, end - t) * period + 0.5, 0.0, 1.0))
        return out

    return texture, base, 2.0


def _leopard(rng: np.random.Generator) -> tuple[Texture, np.ndarray, float]:
    """Leopard: rosettes (broken, blotchy rings round a darker centre) and small spots, irregularly warped."""
    if rng.random() < 0.55:
        base, ring = _pick_colour(rng, _ANIMAL_BASES), _pick_colour(rng, _ANIMAL_INKS)
        centre = base * rng.uniform(0.6, 0.8) + np.array([0.08, 0.0, -0.06], dtype=np.float32)
    else:  # fashion colours, still with rings darker than the ground
        base = _pick_colour(rng)
        darker = np.flatnonzero(_LUMA < _luma(base) - 0.25)
        ring = _COLOURS[int(rng.choice(darker))] if len(darker) else _pick_colour(rng, ("black",))
        if not len(darker):
            base = _contrasting(rng, ring, 0.45)
        centre = base * 0.65 + ring * 0.15 if rng.random() < 0.7 else _contrasting(rng, ring, 0.2)
    centre = np.clip(centre, 0.0, 1.0).astype(np.float32)
    cell = float(np.exp(rng.uniform(math.log(16), math.log(60))))
    seed = int(rng.integers(2 ** 31))
    angle0 = rng.uniform(0, 2 * math.pi)

    def texture(x: np.ndarray, y: np.ndarray, angle: float) -> np.ndarray:
        cells = np.random.default_rng(seed)
        u, v = _rotate(x, y, angle0 + angle)
        out = _fill(base, x.shape)
        # Small spots on a finer grid first, rosettes over them.
        du, dv, (present, size, phase) = _features(u / (cell * 0.5), v / (cell * 0.5), cells, 3)
        phi = np.arctan2(dv, du)
        r = (0.1 + 0.12 * size) * (1 + 0.3 * np.sin(2 * phi + 6.28 * phase))
        _paint(out, ring, np.clip((r - np.sqrt(du * du + dv * dv)) * (cell * 0.5) + 0.5, 0, 1) * (present < 0.5))

        du, dv, (size, thick, phase, kind) = _features(u / cell, v / cell, cells, 4)
        d, phi = np.sqrt(du * du + dv * dv), np.arctan2(dv, du)
        phase = phase * 6.28
        r = (0.26 + 0.14 * size) * (1 + 0.15 * np.sin(2 * phi + phase) + 0.08 * np.sin(3 * phi + 2.1 * phase))
        width = (0.09 + 0.08 * thick) * (0.55 + 0.9 * np.abs(np.sin((2 + kind * 2.5) * phi + 1.7 * phase)))
        solid = kind < 0.15
        _paint(out, centre, np.clip((r - d) * cell + 0.5, 0.0, 1.0) * 0.9 * ~solid)
        ring_cover = np.clip((width / 2 - np.abs(d - r)) * cell + 0.5, 0.0, 1.0)
        ring_cover *= np.clip((0.75 - np.sin((2 + np.floor(kind * 3)) * phi + 5.0 * phase)) * 4, 0.0, 1.0)
        blob = np.clip((r * 0.75 - d) * cell + 0.5, 0.0, 1.0) * solid
        _paint(out, ring, np.maximum(ring_cover, blob))
        return out

    return texture, base, 0.2 * cell


TEXTURES = {"dotted": _dots, "striped": _stripes, "leopard": _leopard}


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth random field in about -1..1, with ``cells`` bumps across the longer side."""
    gw = max(2, round(cells * width / max(width, height))) + 1
    gh = max(2, round(cells * height / max(width, height))) + 1
    grid = Image.fromarray(rng.uniform(-1, 1, (gh, gw)).astype(np.float32), "F")
    return np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC))


class _Canvas:
    """Maps garment units to pixels and rasterises shapes as anti-aliased float masks."""

    def __init__(self, width: int, height: int, centre: Point, scale: float, rotation: float,
                 origin: Point):
        self.width, self.height = width, height
        self.centre, self.scale, self.rotation, self.origin = centre, scale, rotation, origin

    def points(self, points: list[Point], factor: float = 1.0) -> list[Point]:
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        out = []
        for x, y in points:
            x, y = x - self.origin[0], y - self.origin[1]
            out.append(((self.centre[0] + self.scale * (x * c - y * s)) * factor,
                        (self.centre[1] + self.scale * (x * s + y * c)) * factor))
        return out

    def mask(self, polygons: list[list[Point]] = (), lines: list[list[Point]] = (), line_width: float = 1.0,
             circles: list[tuple[float, float, float]] = ()) -> np.ndarray:
        k = SUPERSAMPLE
        img = Image.new("L", (self.width * k, self.height * k), 0)
        draw = ImageDraw.Draw(img)
        for polygon in polygons:
            draw.polygon(self.points(polygon, k), fill=255)
        for line in lines:
            draw.line(self.points(line, k), fill=255, width=max(1, round(line_width * k)), joint="curve")
        for x, y, r in circles:
            (cx, cy), = self.points([(x, y)], k)
            rr = r * self.scale * k
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        small = img.reduce(k)
        return np.asarray(small, dtype=np.float32) / 255.0


def _layout(g: _Garment, rng: np.random.Generator) -> _Canvas:
    pts = np.array(g.outline + (g.hook or []))
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    aspect = (y1 - y0) / (x1 - x0)
    height = int(rng.integers(330, 421))
    width = int(np.clip(round(height / aspect * rng.uniform(1.0, 1.25)), 300, 420))
    fill = rng.uniform(0.76, 0.9)
    scale = min(width * fill / (x1 - x0), height * fill / (y1 - y0))
    rotation = 0.0 if g.hook else math.radians(rng.uniform(-6, 6))
    centre = (width / 2 + rng.uniform(-0.03, 0.03) * width, height / 2 + rng.uniform(-0.025, 0.025) * height)
    return _Canvas(width, height, centre, scale, rotation, ((x0 + x1) / 2, (y0 + y1) / 2))


def _folds(rng: np.random.Generator, canvas: _Canvas, g: _Garment) -> np.ndarray:
    """Soft fold shading in about -1..1: a few dark creases, each with a lit ridge beside it."""
    k = 4  # drawn small and blurred, then scaled up: folds are low-frequency
    w, h = max(8, canvas.width // k), max(8, canvas.height // k)
    img = Image.new("L", (w, h), 128)
    draw = ImageDraw.Draw(img)
    pts = np.array(g.outline)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    for _ in range(int(rng.integers(4, 11))):
        start = (rng.uniform(x0 * 0.8, x1 * 0.8), rng.uniform(y0 + 0.2, y1))
        angle = math.pi / 2 + rng.normal(0, 0.45)
        length = rng.uniform(0.15, 0.6)
        end = (start[0] - length * math.cos(angle), start[1] - length * math.sin(angle))
        a, b = canvas.points([start, end], 1 / k)
        strength = int(rng.integers(25, 80))
        width = int(rng.integers(1, 4))
        off = width + 1
        draw.line([a, b], fill=128 - strength, width=width)
        draw.line([(a[0] + off, a[1]), (b[0] + off, b[1])], fill=128 + strength // 2, width=width)
    small = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0))), dtype=np.float32)
    # Smooth away the 8-bit steps before scaling up in float: the folds' gradient bends the print.
    for axis in (0, 1):
        small = (np.roll(small, 1, axis) + 2 * small + np.roll(small, -1, axis)) / 4
    big = Image.fromarray((small - 128.0) / 64.0, "F").resize((canvas.width, canvas.height),
                                                              Image.Resampling.BICUBIC)
    return np.asarray(big)


def _render_original(label: str, rng: np.random.Generator) -> Image.Image:
    kind = str(rng.choice(GARMENTS, p=GARMENT_WEIGHTS))
    g = _garment(kind, rng)
    if kind != "dress" and rng.random() < 0.22:
        t = np.linspace(math.pi, 2 * math.pi + 0.7, 14)
        g.hook = [(0.0, 0.02), (0.0, -0.07)] + list(zip((0.035 + 0.035 * np.cos(t)).tolist(),
                                                        (-0.07 + 0.035 * np.sin(t)).tolist()))
    canvas = _layout(g, rng)
    w, h = canvas.width, canvas.height

    body = canvas.mask([g.outline])
    inside = canvas.mask([g.inside]) * body
    neckband = canvas.mask([g.neckband]) * body * (1 - inside)
    sleeves = [canvas.mask([s]) * body for s in g.sleeves]
    bands = canvas.mask(g.bands) * body if g.bands else None
    seams = canvas.mask(lines=g.seams, line_width=rng.uniform(0.8, 1.4)) * body if g.seams else None

    # Pattern coordinates: pixels, bent by the folds and by slow noise so prints look draped.
    folds = _folds(rng, canvas, g)
    texture, base, warp = TEXTURES[label](rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = np.gradient(folds)
    bend = rng.uniform(3.0, 8.0) / (float(np.abs(gx).max() + np.abs(gy).max()) + 1e-3)
    x = xx + gx * bend + warp * _smooth_noise(rng, w, h, 5)
    y = yy + gy * bend + warp * _smooth_noise(rng, w, h, 5)
    fabric = _fill(base, (h, w))
    inner = _box(body)
    fabric[inner] = texture(x[inner], y[inner], canvas.rotation)

    # Sleeves are cut separately: stripes there often run across the sleeve; some garments are two-tone.
    two_tone = rng.random() < 0.15
    solid = _contrasting(rng, base, 0.1) if rng.random() < 0.5 else base
    for sleeve, axis in zip(sleeves, g.sleeve_axes):
        box = _box(sleeve)
        if two_tone:
            _paint(fabric, solid, sleeve)
        elif label == "striped" and box and rng.random() < 0.7:
            across = texture(x[box], y[box], canvas.rotation + axis - math.pi / 2)
            fabric[box] += (across - fabric[box]) * sleeve[box][..., None]
    trim = base if rng.random() < 0.65 else _contrasting(rng, base, 0.1)
    if rng.random() < 0.8:
        _paint(fabric, trim, neckband)
    shade = np.ones((h, w), dtype=np.float32)
    if kind == "sweater" or bands is not None:
        rib = 0.07 * np.sin(_rotate(xx, yy, canvas.rotation)[0] * (2 * math.pi / rng.uniform(2.5, 4.0)))
        if bands is not None:
            _paint(fabric, trim, bands * 0.85)
            shade += rib * bands * 1.5
        if kind == "sweater":  # knitted: softer print and a faint knit grain everywhere
            shade += rib * 0.4
            soft = Image.fromarray((np.clip(fabric, 0, 1) * 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(0.7))
            fabric = np.asarray(soft, dtype=np.float32) / 255.0

    # Shading: light falling across, folds, rounded edges, darker inside of the back neck, seams.
    light_angle = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.03, 0.1) * _rotate((xx - w / 2) / w, (yy - h / 2) / h, light_angle)[0] * 2
    shade *= light * (1 + rng.uniform(0.1, 0.22) * folds) * (1 + 0.03 * _smooth_noise(rng, w, h, 9))
    edge = np.asarray(Image.fromarray((body * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(max(2.0, 0.025 * min(w, h)))), dtype=np.float32) / 255.0
    shade *= 1 - rng.uniform(0.15, 0.3) * np.clip(1 - edge, 0, 1) * 2
    for sleeve in sleeves:
        shade *= 1 - 0.05 * sleeve
    shade *= 1 - rng.uniform(0.3, 0.45) * inside
    if seams is not None:
        shade *= 1 - 0.22 * seams
    garment = fabric * shade[..., None]
    if g.buttons:
        button = _pick_colour(rng, ("white", "ivory", "black", "brown", "grey"))
        _paint(garment, button * light[..., None], canvas.mask(circles=g.buttons) * 0.9)

    # Studio background: light colour, gentle gradient and vignette, soft drop shadow, maybe a hanger hook.
    bg_colour = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32) / 255.0
    bg_colour = np.clip(bg_colour + rng.uniform(-0.015, 0.015, 3).astype(np.float32), 0, 1)
    falloff = 1 - rng.uniform(0.0, 0.12) * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    falloff -= rng.uniform(-0.03, 0.05) * yy / h
    shadow_img = Image.fromarray((body * 255).astype(np.uint8)).transform(
        (w, h), Image.Transform.AFFINE, (1, 0, -rng.uniform(-6, 6), 0, 1, -rng.uniform(2, 9)))
    shadow = np.asarray(shadow_img.filter(ImageFilter.GaussianBlur(rng.uniform(5, 12))), dtype=np.float32) / 255
    falloff *= 1 - rng.uniform(0.12, 0.3) * shadow
    image = bg_colour * falloff[..., None]
    if g.hook:
        metal = _pick_colour(rng, ("grey", "light grey", "charcoal"))
        _paint(image, metal, canvas.mask(lines=[g.hook], line_width=max(2.0, 0.012 * canvas.scale)))
    _paint(image, garment, body)

    # Camera: exposure and white balance (as a per-channel curve with a little gamma), faint sensor noise.
    gain = rng.uniform(0.92, 1.07) * (1 + rng.uniform(-0.025, 0.025, 3))
    gamma = rng.uniform(0.9, 1.1)
    levels = np.arange(256) / 255.0
    curves = [np.clip(np.clip(levels * k, 0, 1) ** gamma * 255 + 0.5, 0, 255).astype(np.uint8) for k in gain]
    image = image * 255 + rng.standard_normal(image.shape, dtype=np.float32) * 1.5
    pixels = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")
    return pixels.point(np.concatenate(curves).tolist())


# --------------------------------------------------------------------------- near-copies


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


# Copy transforms, in the order copy_image applies them. Each is recorded as ``op`` or ``op:parameter``
# ("light" as ``brightness:B+contrast:C``), joined by "+" in ground_truth.csv's transform column.
COPY_OPS = ("mirror", "crop", "rotate", "squash", "resize", "border", "pad", "light", "blur", "text", "watermark",
            "grey", "jpeg", "png")
# How often the sample set uses each (same order); a copy gets one to three of them.
_SAMPLE_OP_WEIGHTS = (0.10, 0.12, 0.08, 0.06, 0.14, 0.05, 0.04, 0.10, 0.05, 0.05, 0.04, 0.05, 0.09, 0.03)
_CAPTIONS = ("SALE -30%", "© studio photo", "NEW IN", "shop.example", "limited edition", "#outfit of the day")
_WATERMARKS = ("SAMPLE", "PREVIEW", "© lookalike", "PROOF")
_FRAME_COLOURS = ((255, 255, 255), (0, 0, 0), (128, 128, 128), (240, 236, 228))


def _scaled(image: Image.Image, factor_w: float, factor_h: float) -> Image.Image:
    size = (max(1, round(image.width * factor_w)), max(1, round(image.height * factor_h)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _crop(image: Image.Image, share: float, rng: np.random.Generator) -> Image.Image:
    """Keep ``1 - share`` of the width and of the height, at a random place."""
    w, h = image.size
    cw, ch = round(w * (1 - share)), round(h * (1 - share))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((left, top, left + cw, top + ch))


def rotated_inner_box(width: int, height: int, degrees: float) -> tuple[int, int, int, int]:
    """The largest centred box, of the image's aspect, that a rotation by ``degrees`` leaves without empty corners."""
    a = math.radians(abs(degrees))
    s = min(width / (width * math.cos(a) + height * math.sin(a)),
            height / (width * math.sin(a) + height * math.cos(a)))
    w, h = int(width * s), int(height * s)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, size))


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in a corner, white with a dark outline, as shops and reposts add."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    size = round(min(image.size) * rng.uniform(0.06, 0.1))
    font, stroke = _font(size), max(1, size // 12)
    caption = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    right, bottom = draw.textbbox((0, 0), caption, font=font, stroke_width=stroke)[2:]
    x = int(rng.choice((size // 2, image.width - right - size // 2)))
    y = int(rng.choice((size // 2, image.height - bottom - size // 2)))
    draw.text((max(0, x), max(0, y)), caption, font=font, fill=(255, 255, 255), stroke_width=stroke,
              stroke_fill=(20, 20, 20))
    return out


def _watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A large half-transparent word across the middle, turned by up to 35°, light on dark images and dark on light."""
    font = _font(round(min(image.size) * rng.uniform(0.12, 0.2)))
    word = _WATERMARKS[int(rng.integers(len(_WATERMARKS)))]
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    right, bottom = draw.textbbox((0, 0), word, font=font)[2:]
    draw.text(((image.width - right) / 2, (image.height - bottom) / 2), word, font=font,
              fill=(*((255,) * 3 if np.asarray(image.convert("L")).mean() < 128 else (0,) * 3),
                    int(rng.integers(80, 150))))
    layer = layer.rotate(float(rng.uniform(-35, 35)), Image.Resampling.BICUBIC)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def copy_image(image: Image.Image, ops: list[str] | tuple[str, ...],
               rng: np.random.Generator) -> tuple[bytes, str, str]:
    """A copy of ``image`` made by ``ops`` (names from :data:`COPY_OPS`, applied in that order), parameters
    drawn from ``rng``: (encoded bytes, file extension, transform string). JPEG quality
    :data:`COPY_QUALITY` unless ``jpeg`` names one; ``png`` saves losslessly."""
    unknown = set(ops) - set(COPY_OPS)
    if unknown:
        raise BadInput(f"unknown copy transform(s): {', '.join(sorted(unknown))}")
    steps = []
    for op in sorted(set(ops), key=COPY_OPS.index):
        if op == "mirror":
            image = ImageOps.mirror(image)
            steps.append("mirror")
        elif op == "crop":
            share = round(float(rng.uniform(0.05, 0.30)), 2)
            image = _crop(image, share, rng)
            steps.append(f"crop:{share:.2f}")
        elif op == "rotate":
            degrees = round(float(rng.uniform(1, 5) * rng.choice((-1, 1))), 1)
            box = rotated_inner_box(image.width, image.height, degrees)
            image = image.rotate(degrees, Image.Resampling.BICUBIC).crop(box)
            steps.append(f"rotate:{degrees:.1f}")
        elif op == "squash":  # the width (x) or the height (y) scaled by 0.8–0.9 or 1.1–1.2
            factor = round(1 + float(rng.choice((-1, 1)) * rng.uniform(0.1, 0.2)), 2)
            axis = "x" if rng.random() < 0.5 else "y"
            image = _scaled(image, factor, 1) if axis == "x" else _scaled(image, 1, factor)
            steps.append(f"squash:{axis}{factor:.2f}")
        elif op == "resize":
            factor = round(float(rng.uniform(0.3, 0.8)), 2)
            image = _scaled(image, factor, factor)
            steps.append(f"resize:{factor:.2f}")
        elif op == "border":
            width = max(2, round(min(image.size) * rng.uniform(0.03, 0.1)))
            image = ImageOps.expand(image, width, _FRAME_COLOURS[int(rng.integers(len(_FRAME_COLOURS)))])
            steps.append(f"border:{width}")
        elif op == "pad":  # letterboxed to a square
            side = max(image.size)
            image = ImageOps.pad(image, (side, side), color=_FRAME_COLOURS[int(rng.integers(len(_FRAME_COLOURS)))])
            steps.append("pad")
        elif op == "light":
            bright = round(float(rng.choice((rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.3)))), 2)
            contrast = round(float(rng.uniform(0.7, 1.3)), 2)
            image = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(bright)).enhance(contrast)
            steps.append(f"brightness:{bright:.2f}+contrast:{contrast:.2f}")
        elif op == "grey":
            image = image.convert("L")
            steps.append("grey")
        elif op == "blur":
            radius = round(float(rng.uniform(1.0, 3.0) * max(1.0, max(image.size) / 800)), 1)
            image = image.filter(ImageFilter.GaussianBlur(radius))
            steps.append(f"blur:{radius:.1f}")
        elif op in ("text", "watermark"):
            image = (_text if op == "text" else _watermark)(image, rng)
            steps.append(op)
    if "png" in ops:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue(), "png", "+".join(steps + ["png"])
    quality = int(rng.integers(15, 91)) if "jpeg" in ops else COPY_QUALITY
    if "jpeg" in ops:
        steps.append(f"jpeg:q{quality}")
    return _jpeg(image, quality), "jpg", "+".join(steps)


def _near_copy(original: bytes, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """A transformed copy of ``original`` with one to three transforms: (encoded bytes, extension, transform)."""
    ops = set(rng.choice(COPY_OPS, size=int(rng.choice((1, 2, 2, 3))), replace=False, p=_SAMPLE_OP_WEIGHTS))
    if {"jpeg", "png"} <= ops:
        ops.discard("png")
    if {"border", "pad"} <= ops:
        ops.discard("pad")
    return copy_image(open_image(original), sorted(ops, key=COPY_OPS.index), rng)


# --------------------------------------------------------------------------- the set


def _render_one(root: Path, label: str, number: int, seed: int, copies: int) -> list[tuple[str, str, str]]:
    """Render original ``number`` of ``label`` and its copies; returns (path, original, transform) rows."""
    # Each image has its own random stream, keyed by (seed, label, number): threads cannot reorder it.
    stream = np.random.SeedSequence(seed, spawn_key=(LABELS.index(label), number))
    image_rng, copy_rng = (np.random.default_rng(s) for s in stream.spawn(2))
    image = _render_original(label, image_rng)
    quality = int(image_rng.integers(84, 93))
    original = _jpeg(image, quality)
    while len(original) < MIN_BYTES and quality < 96:  # plain prints compress well: keep shop-like detail
        quality += 4
        original = _jpeg(image, quality)
    name = f"{label}/{label}_{number:04d}"
    (root / f"{name}.jpg").write_bytes(original)
    rows = [(f"{name}.jpg", "", "")]
    written = {original}
    for k in range(1, copies + 1):
        data, ext, transform = _near_copy(original, copy_rng)
        for _ in range(8):  # two copies with the same parameter-free transform would be one file twice
            if data not in written:
                break
            data, ext, transform = _near_copy(original, copy_rng)
        written.add(data)
        (root / f"{name}_copy{k}.{ext}").write_bytes(data)
        rows.append((f"{name}_copy{k}.{ext}", f"{name}.jpg", transform))
    return rows


def render_samples(out_dir: str | Path, *, per_label: int = default("samples", "per_label"),
                   seed: int = default("samples", "seed"), copy_share: float = default("samples", "copy_share"),
                   progress: bool = False) -> SampleSet:
    """Render the sample set into ``out_dir`` and return what was written.

    Writes ``<label>/<label>_NNNN.jpg`` originals (``per_label`` per label), about
    ``copy_share * per_label`` near-copies per label as ``<label>/<label>_NNNN_copyK.jpg``
    (or ``.png``), ``ground_truth.csv`` (``copy,original,transform``) and
    ``manifest.tsv`` (headerless ``label<TAB>path`` lines, paths relative to it).
    Files of an earlier render in the label folders are replaced.
    """
    if per_label < 1 or not 0.0 <= copy_share <= 1.0:
        raise BadInput("per_label must be >= 1 and copy_share within 0..1")
    root = Path(out_dir)
    for label in LABELS:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{label}_*"):
            if stale.suffix in (".jpg", ".png"):
                stale.unlink()

    # Which originals get copies: a few get two, so groups are not always pairs.
    plan = np.random.default_rng(seed)
    jobs = []
    for label in LABELS:
        wanted = round(copy_share * per_label)
        doubles = wanted // 5
        chosen = plan.choice(per_label, size=min(per_label, wanted - doubles), replace=False)
        copies = {int(n): 1 for n in chosen}
        for n in chosen[:doubles]:
            copies[int(n)] = 2
        jobs += [(label, n + 1, copies.get(n, 0)) for n in range(per_label)]

    rows: list[tuple[str, str, str]] = []
    workers = cores(at_most=8)
    show = progress and sys.stderr.isatty()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc="render samples", unit="img",
                                                    disable=not show) as bar:
        futures = [pool.submit(_render_one, root, label, number, seed, copies) for label, number, copies in jobs]
        for future in as_completed(futures):
            rows += future.result()
            bar.update()
    rows.sort(key=lambda row: (LABELS.index(row[0].split("/")[0]), row[0]))

    manifest = root / "manifest.tsv"
    manifest.write_text("".join(f"{path.split('/')[0]}\t{path}\n" for path, _, _ in rows), encoding="utf-8")
    ground_truth = root / "ground_truth.csv"
    with ground_truth.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("copy", "original", "transform"))
        writer.writerows(row for row in rows if row[1])
    per_label_files = {label: sum(row[0].startswith(label + "/") for row in rows) for label in LABELS}
    return SampleSet(root=root, images=len(rows), copies=sum(1 for row in rows if row[1]),
                     per_label=per_label_files, manifest=manifest, ground_truth=ground_truth)


def samples_contact_sheet(sample_set_root: str | Path, out_png: str | Path, per_label: int = 10) -> Path:
    """Save a contact sheet of the first ``per_label`` originals of each label as ``out_png``."""
    root = Path(sample_set_root)
    tiles = []
    for label in LABELS:
        originals = sorted(p for p in (root / label).glob(f"{label}_*.jpg") if "_copy" not in p.stem)
        tiles += [(open_image(p), f"{label}\n{p.name}") for p in originals[:per_label]]
    if not tiles:
        raise BadInput(f"no sample images under {root}")
    sheet = contact_sheet(tiles, columns=per_label, tile_size=150,
                          title=f"lookalike sample set: {', '.join(LABELS)} ({per_label} per label)")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, "PNG", optimize=True)
    return out
