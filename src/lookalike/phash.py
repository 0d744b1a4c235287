"""Perceptual hashes of one decoded image, bit-identical to the reference packages.

Kinds (see :data:`KINDS`):

- ``dhash_rowcol``: the ``dhash`` package's row+column difference hash at
  sizes 1..8, formatted exactly like ``dhash.format_hex``.
- ``ahash``, ``dhash``, ``phash``, ``whash``: the ``imagehash`` package's
  ``average_hash``, ``dhash``, ``phash`` and ``whash`` (Haar), with hex equal
  to ``str(imagehash_obj)``.

Every reference converts the image to greyscale and resizes it with Pillow's
LANCZOS filter. We convert once and run all the small resizes together:
Pillow's resize is two separable passes (horizontal, then vertical) with
22-bit fixed-point coefficients and rounding to 8 bits after each pass; we
rebuild those integer coefficients and apply each pass to every target size
at once as one float64 matrix product, whose integer sums are exact. The
large whash resize stays with Pillow, and the Haar transforms are replayed in
NumPy with pywt's exact operation order, so pywt is not needed at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
import PIL
import scipy.fft
from PIL import Image

from .errors import BadInput

KINDS = ("dhash_rowcol", "ahash", "dhash", "phash", "whash")

# Stored beside every hash: the pixels (and so the hashes) depend on Pillow's
# decoders and resampler, so hashes from different versions must not be mixed.
HASHER_VERSION = f"pillow-{PIL.__version__}"

# Opt-in fast decode: ``open_image(source, draft=DRAFT_SIZE)`` lets JPEG decode
# at 1/2..1/8 scale, no smaller than this. Its hashes differ from the full
# decode's on a few images in a hundred (bench/bench_hashing.py measures it),
# so they are recorded under their own version and never mixed with full ones.
DRAFT_SIZE = (128, 128)
DRAFT_HASHER_VERSION = f"{HASHER_VERSION}+draft{DRAFT_SIZE[0]}x{DRAFT_SIZE[1]}"

# Greyscale standard deviation (0..255 scale) at 32x32 below which an image is
# treated as flat; see is_low_detail.
LOW_DETAIL_STD = 2.0

_PRECISION_BITS = 22           # Pillow's 8-bit resampling precision (32 - 8 - 2)
_ONE = float(1 << _PRECISION_BITS)
_HALF = float(1 << (_PRECISION_BITS - 1))
_LANCZOS_SUPPORT = 3.0
_ROW_BLOCK_PIXELS = 1 << 20    # pixels per horizontal-pass block: bounds float64 copies of huge images
_HAAR = 0.7071067811865476     # pywt's Haar filter tap, 1/sqrt(2)


@dataclass(frozen=True)
class HashValue:
    """One perceptual hash of one image.

    ``hex`` is the reference package's text form. ``value`` is the hash as an
    unsigned integer; for ``dhash_rowcol`` it is ``row << size*size | col``
    (``dhash.dhash_int``), because ``dhash.format_hex`` does not pad odd sizes
    to a fixed width and its hex cannot always be read back.
    """

    kind: str
    size: int
    hex: str
    bits: int   # number of bits in the hash
    value: int

    def to_int(self) -> int:
        """The hash as an unsigned integer."""
        return self.value

    def to_signed64(self) -> int | None:
        """Two's-complement signed form (fits SQL BIGINT) when bits <= 64, else None."""
        if self.bits > 64:
            return None
        return self.value - (1 << 64) if self.value >= 1 << 63 else self.value


# --- Pillow LANCZOS resampling, replayed exactly ---------------------------------


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Pillow's lanczos_filter: sinc(x) * sinc(x / 3) on [-3, 3)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        px = x * math.pi
        sinc = np.where(x == 0.0, 1.0, np.sin(px) / px)
        x3 = x / 3
        px3 = x3 * math.pi
        sinc3 = np.where(x3 == 0.0, 1.0, np.sin(px3) / px3)
    return np.where((x >= -3.0) & (x < 3.0), sinc * sinc3, 0.0)


def _lanczos_scalar(x: float) -> float:
    if not -3.0 <= x < 3.0:
        return 0.0
    px, px3 = x * math.pi, (x / 3) * math.pi
    sinc = 1.0 if x == 0.0 else math.sin(px) / px
    sinc3 = 1.0 if x / 3 == 0.0 else math.sin(px3) / px3
    return sinc * sinc3


def _to_fixed(k: np.ndarray) -> np.ndarray:
    """normalize_coeffs_8bpc: round half away from zero to 22-bit fixed point."""
    scaled = k * _ONE
    return np.trunc(np.where(k < 0, scaled - 0.5, scaled + 0.5))


@lru_cache(maxsize=512)
def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) float64 matrix of Pillow's fixed-point LANCZOS weights.

    Mirrors precompute_coeffs and normalize_coeffs_8bpc in Pillow's Resample.c,
    vectorised. NumPy's sin may differ from the C library's by an ulp or so;
    any output whose weights land that close to a rounding boundary is
    recomputed by :func:`_exact_column`, which uses math.sin, the C library's.
    """
    scale, support, ss, ksize = _filter_geometry(in_size, out_size)
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)[:, None]                      # (ksize, out): sums run down axis 0
    valid = taps < count[None, :]
    weights = np.where(valid, _lanczos(((taps + xmin[None, :]) - center[None, :] + 0.5) * ss), 0.0)
    total = weights.sum(axis=0)                           # row by row: same order as the C loop
    k = np.divide(weights, total, out=weights.copy(), where=total != 0.0)
    matrix = np.zeros((in_size, out_size))
    rows = taps + xmin[None, :]
    cols = np.broadcast_to(np.arange(out_size), valid.shape)
    matrix[rows[valid], cols[valid]] = _to_fixed(k)[valid]
    scaled = k * _ONE
    risky = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6
    for xx in np.unique(np.nonzero(risky & valid)[1]):
        matrix[:, xx] = _exact_column(in_size, out_size, int(xx))
    return matrix


def _filter_geometry(in_size: int, out_size: int) -> tuple[float, float, float, int]:
    """(scale, support, 1 / filterscale, ksize) as precompute_coeffs computes them."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    return scale, support, 1.0 / filterscale, int(math.ceil(support)) * 2 + 1


def _exact_column(in_size: int, out_size: int, xx: int) -> np.ndarray:
    """Output ``xx``'s column of :func:`_resample_matrix`, computed scalar by scalar like the C code."""
    scale, support, ss, _ = _filter_geometry(in_size, out_size)
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    count = min(int(center + support + 0.5), in_size) - xmin
    weights = [_lanczos_scalar(((x + xmin) - center + 0.5) * ss) for x in range(count)]
    total = 0.0
    for w in weights:
        total += w
    column = np.zeros(in_size)
    column[xmin:xmin + count] = _to_fixed(np.array([w / total if total != 0.0 else w for w in weights]))
    return column


def _apply(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One resampling pass: exact integer sums (float64), rounded and clipped to 8 bits."""
    sums = pixels @ weights
    return np.clip(np.floor((sums + _HALF) / _ONE), 0.0, 255.0)


def _horizontal_first(grey: np.ndarray, sizes: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Resize to every (w, h), horizontal pass then vertical, as Pillow does.

    A pass is skipped when that axis keeps its size, as in Pillow.
    """
    height, width = grey.shape
    widths = sorted({w for w, _ in sizes})
    scaled_widths = [w for w in widths if w != width]
    columns: dict[int, np.ndarray] = {}
    if width in widths:
        columns[width] = grey.astype(np.float64)
    if scaled_widths:
        weights = np.concatenate([_resample_matrix(width, w) for w in scaled_widths], axis=1)
        step = max(1, _ROW_BLOCK_PIXELS // width)
        passed = np.concatenate([_apply(grey[y:y + step].astype(np.float64), weights)
                                 for y in range(0, height, step)])
        for w, start in zip(scaled_widths, np.cumsum([0] + scaled_widths)):
            columns[w] = passed[:, start:start + w]
    scaled_heights = sorted({h for _, h in sizes if h != height})
    if scaled_heights:
        weights = np.concatenate([_resample_matrix(height, h) for h in scaled_heights], axis=1).T
        both = _apply(weights, np.concatenate([columns[w] for w in widths], axis=1))
        row_start = dict(zip(scaled_heights, np.cumsum([0] + scaled_heights)))
        col_start = dict(zip(widths, np.cumsum([0] + widths)))
    out = {}
    for w, h in sizes:
        if h == height:
            out[w, h] = columns[w]
        else:
            r, c = row_start[h], col_start[w]
            out[w, h] = both[r:r + h, c:c + w]
    return out


def _pillow13_vertical_first(width: int, height: int, w: int, h: int) -> bool:
    # Pillow >= 13 runs the vertical pass first when the height shrinks more
    # than twice as much as the width; older Pillow always goes horizontal first.
    return height - h > 0 and height - h > (width - w) * 2


def _never_vertical_first(width: int, height: int, w: int, h: int) -> bool:
    return False


@lru_cache(maxsize=1)
def _pass_order():
    """The installed Pillow's pass-order rule, found by comparing with Pillow.

    None when neither known rule reproduces Pillow, and the hashes then use
    Pillow's own resize (slower, still exact).
    """
    rng = np.random.default_rng(0)
    probes = [((7, 60), (5, 6)), ((60, 7), (6, 5)), ((40, 90), (9, 9)), ((23, 301), (32, 32)),
              ((301, 23), (8, 8)), ((1, 50), (9, 8)), ((50, 50), (3, 3))]
    images = [(rng.integers(0, 256, size[::-1], dtype=np.uint8), target) for size, target in probes]
    for rule in (_pillow13_vertical_first, _never_vertical_first):
        if all(np.array_equal(_resize_exact(grey, {target}, rule)[target],
                              np.asarray(Image.fromarray(grey).resize(target, Image.Resampling.LANCZOS)))
               for grey, target in images):
            return rule
    return None


def _resize_exact(grey: np.ndarray, sizes: set[tuple[int, int]], vertical_first) -> dict:
    height, width = grey.shape
    transposed = {(w, h) for w, h in sizes if w != width and h != height and vertical_first(width, height, w, h)}
    out = _horizontal_first(grey, sizes - transposed) if sizes - transposed else {}
    if transposed:  # vertical first on the image is horizontal first on its transpose
        flipped = _horizontal_first(grey.T, {(h, w) for w, h in transposed})
        out.update({(w, h): grid.T for (h, w), grid in flipped.items()})
    return out


def _resize_many(grey: np.ndarray, sizes: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """``Image.fromarray(grey).resize((w, h), LANCZOS)`` for every (w, h), as float64 arrays."""
    rule = _pass_order()
    if rule is None:
        image = Image.fromarray(grey)
        return {s: np.asarray(image.resize(s, Image.Resampling.LANCZOS), dtype=np.float64) for s in sizes}
    return _resize_exact(grey, sizes, rule)


# --- Haar wavelet, in pywt's operation order -------------------------------------


def _dwt_axis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    even = _HAAR * (x[0::2] if axis == 0 else x[:, 0::2])
    odd = _HAAR * (x[1::2] if axis == 0 else x[:, 1::2])
    return odd + even, even - odd


def _idwt_axis(approx: np.ndarray, detail: np.ndarray, axis: int) -> np.ndarray:
    a, d = _HAAR * approx, _HAAR * detail
    if axis == 0:
        out = np.empty((a.shape[0] * 2, a.shape[1]))
        out[0::2], out[1::2] = a + d, a - d
    else:
        out = np.empty((a.shape[0], a.shape[1] * 2))
        out[:, 0::2], out[:, 1::2] = a + d, a - d
    return out


def _wavedec2(x: np.ndarray, level: int) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Like pywt.wavedec2(x, 'haar', level): (approximation, details finest first)."""
    details = []
    for _ in range(level):
        a, d = _dwt_axis(x, 0)
        aa, ad = _dwt_axis(a, 1)
        da, dd = _dwt_axis(d, 1)
        details.append((ad, da, dd))
        x = aa
    return x, details


def _waverec2(x: np.ndarray, details: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """Like pywt.waverec2 for the output of :func:`_wavedec2`."""
    for ad, da, dd in reversed(details):
        x = _idwt_axis(_idwt_axis(x, ad, 1), _idwt_axis(da, dd, 1), 0)
    return x


# --- the hashes ----------------------------------------------------------------------


def _bits_value(bits: np.ndarray) -> tuple[int, int]:
    flat = bits.ravel()
    packed = np.packbits(flat).tobytes()
    return int.from_bytes(packed, "big") >> (len(packed) * 8 - flat.size), flat.size


def _imagehash_value(kind: str, size: int, bits: np.ndarray) -> HashValue:
    value, nbits = _bits_value(bits)
    return HashValue(kind, size, f"{value:0{-(-nbits // 4)}x}", nbits, value)


def _dhash_rowcol(size: int, grid: np.ndarray) -> HashValue:
    top = grid[:size, :size]
    row, _ = _bits_value(top < grid[:size, 1:size + 1])
    col, _ = _bits_value(top < grid[1:size + 1, :size])
    width = size * size // 4  # dhash.format_hex's minimum width: not enough digits for odd sizes
    return HashValue("dhash_rowcol", size, f"{row:0{width}x}{col:0{width}x}", 2 * size * size,
                     row << (size * size) | col)


def _whash_bits(grey: Image.Image, size: int) -> np.ndarray:
    """imagehash.whash(image, size): Haar wavelet, lowest LL removed.

    Mathematically, removing the top-level LL subtracts the global mean and the
    level-k LL is a positive multiple of each block's sum, so a bit is set
    exactly when its block's integer pixel sum exceeds the median block sum.
    imagehash's floating-point steps err by ~1e-12 at most, while two distinct
    block sums differ by at least 1/(255 * block) ~ 1e-5 in its units, so the
    integer rule gives imagehash's bits unless a block sum ties with the
    median; only then do we replay imagehash's floating-point arithmetic.
    """
    natural = 2 ** int(np.log2(min(grey.size)))
    scale = max(natural, size)
    pixels = np.asarray(grey.resize((scale, scale), Image.Resampling.LANCZOS))
    block = scale // size
    sums = pixels.reshape(size, block, size, block).sum(axis=(1, 3), dtype=np.int64)
    median = np.median(sums)
    if not (sums == median).any():
        return sums > median
    return _whash_replay(pixels, size)


def _whash_replay(pixels: np.ndarray, size: int) -> np.ndarray:
    """imagehash.whash's floating-point steps on the resized pixels, op for op."""
    max_level = int(np.log2(pixels.shape[0]))
    approx, details = _wavedec2(pixels / 255.0, max_level)
    low, _ = _wavedec2(_waverec2(approx * 0, details), max_level - int(np.log2(size)))
    return low > np.median(low)


def check_sizes(dhash_sizes: Iterable[int], imagehash_sizes: Iterable[int]) -> tuple[list[int], list[int]]:
    dsizes, isizes = list(dhash_sizes), list(imagehash_sizes)
    if any(s < 1 for s in dsizes):
        raise BadInput("dhash sizes must be >= 1")
    if any(s < 2 or s & (s - 1) for s in isizes):
        raise BadInput("imagehash sizes must be powers of two >= 2 (whash needs a power of two)")
    return dsizes, isizes


def compute_hashes(img: Image.Image, *, dhash_sizes: Iterable[int] = range(1, 9),
                   imagehash_sizes: Iterable[int] = (8,)) -> list[HashValue]:
    """All perceptual hashes of ``img`` (an RGB image from ``images.open_image``).

    Returns ``dhash_rowcol`` at each of ``dhash_sizes``, then ``ahash``,
    ``dhash``, ``phash`` and ``whash`` at each of ``imagehash_sizes``; each
    equals what the ``dhash`` / ``imagehash`` package computes from ``img``.
    """
    dsizes, isizes = check_sizes(dhash_sizes, imagehash_sizes)
    if img.mode not in ("RGB", "L"):  # the dhash package flattens alpha on white, imagehash does not
        raise BadInput(f"expected an RGB image from images.open_image, got mode {img.mode}")
    grey = img.convert("L")
    wanted = {(s + 1, s + 1) for s in dsizes}
    for s in isizes:
        wanted |= {(s, s), (s + 1, s), (4 * s, 4 * s)}
    grids = _resize_many(np.asarray(grey), wanted)
    hashes = [_dhash_rowcol(s, grids[s + 1, s + 1]) for s in dsizes]
    for s in isizes:
        small = grids[s, s].astype(np.uint8)
        wide = grids[s + 1, s]
        hashes.append(_imagehash_value("ahash", s, small > np.mean(small)))
        hashes.append(_imagehash_value("dhash", s, wide[:, 1:] > wide[:, :-1]))
        dct = scipy.fft.dct(scipy.fft.dct(grids[4 * s, 4 * s].astype(np.uint8), axis=0), axis=1)
        low = dct[:s, :s]
        hashes.append(_imagehash_value("phash", s, low > np.median(low)))
        hashes.append(_imagehash_value("whash", s, _whash_bits(grey, s)))
    return hashes


def is_low_detail(img: Image.Image) -> bool:
    """True for flat or near-solid images, whose hashes are decided by noise.

    On an image with no structure every difference and every deviation from the
    mean that the hashes threshold is a rounding or compression artefact, so
    unrelated flat images (and two encodes of the same one) land on arbitrary,
    often all-zero, hashes and an exact hash match lumps them together. The
    rule: the standard deviation of the greyscale image box-averaged to 32x32
    (the scale the hashes look at) is below :data:`LOW_DETAIL_STD` grey levels.
    """
    small = img.convert("L").resize((32, 32), Image.Resampling.BOX)
    return float(np.asarray(small, dtype=np.float64).std()) < LOW_DETAIL_STD
