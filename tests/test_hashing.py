"""Perceptual hashes equal the dhash and imagehash packages' on real encoded images."""

from __future__ import annotations

import io
from pathlib import Path

import dhash
import imagehash
import numpy as np
import PIL
import pytest
from PIL import Image, ImageDraw
from skimage import data

from lookalike.hamming import hamming_hex
from lookalike.images import open_image
from lookalike.phash import (DRAFT_HASHER_VERSION, HASHER_VERSION, KINDS, HashValue, _exact_column,
                             _pass_order, _resample_matrix, _resize_many, _whash_replay, compute_hashes,
                             is_low_detail)
from support.corpus import CORPUS

# dhash 1.4 calls Image.getdata, deprecated in Pillow 13: the reference's warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata is deprecated:DeprecationWarning")

IMAGEHASH = {"ahash": imagehash.average_hash, "dhash": imagehash.dhash,
             "phash": imagehash.phash, "whash": imagehash.whash}


def _reference(img: Image.Image, imagehash_sizes=(8,)) -> list[tuple[str, int, str]]:
    """What a user of the two packages gets, in compute_hashes' order."""
    out = [("dhash_rowcol", n, dhash.format_hex(*dhash.dhash_row_col(img, size=n), size=n)) for n in range(1, 9)]
    for size in imagehash_sizes:
        out += [(kind, size, str(function(img, hash_size=size))) for kind, function in IMAGEHASH.items()]
    return out


def _ours(img: Image.Image, imagehash_sizes=(8,)) -> list[tuple[str, int, str]]:
    return [(h.kind, h.size, h.hex) for h in compute_hashes(img, imagehash_sizes=imagehash_sizes)]


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photos() -> list[np.ndarray]:
    grey = [data.camera(), data.moon(), data.page(), data.coins(), data.text(), data.checkerboard(),
            (data.horse() * 255).astype(np.uint8)]
    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()] + [np.stack([g] * 3, -1) for g in grey]


def _synthetic(rng: np.random.Generator) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:96, 0:128] / 96.0
    out = [
        np.stack([xx * 180, yy * 255, (xx + yy) * 100], -1),                      # gradients
        np.stack([np.hypot(xx - 0.6, yy - 0.5) * 300] * 3, -1),                   # radial
        np.stack([(np.sin(xx * 40) > 0) * 255] * 3, -1),                           # stripes: ties
        np.stack([((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 255] * 3, -1),
        rng.integers(0, 256, (96, 128, 3)),                                       # noise
        128 + rng.normal(0, 2, (96, 128, 3)),                                     # near-flat
    ]
    out += [np.full((64, 80, 3), colour) for colour in [(0, 0, 0), (255, 255, 255), (200, 30, 60)]]
    for _ in range(8):                                                          # shapes
        img = Image.new("RGB", (120, 90), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, 100), rng.integers(0, 70)
            box = [int(x0), int(y0), int(x0 + rng.integers(5, 60)), int(y0 + rng.integers(5, 60))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(np.asarray(img))
    return [np.clip(a, 0, 255).astype(np.uint8) for a in out]


SIZES = [(1, 1), (2, 2), (9, 9), (3, 7), (1, 40), (40, 1), (8, 8), (17, 150), (150, 17), (64, 64),
         (33, 90), (90, 33), (100, 75), (128, 128), (16, 200), (250, 40)]


def _corpus_images() -> list[tuple[str, bytes]]:
    """About 230 encoded images: photos and synthetic images, crops and resizes, many sizes."""
    rng = np.random.default_rng(7)
    bases = _photos() + _synthetic(rng)
    encoded = []
    for index, base in enumerate(bases):
        image = Image.fromarray(base)
        small = image.resize((160, int(160 * image.height / image.width)), Image.Resampling.BILINEAR)
        encoded.append((f"base{index}.png", _encode(small, "PNG")))
        for k in range(7):
            w, h = SIZES[(index * 7 + k) % len(SIZES)]
            x0, y0 = int(rng.integers(0, image.width // 3 + 1)), int(rng.integers(0, image.height // 3 + 1))
            crop = image.crop((x0, y0, x0 + image.width * 2 // 3, y0 + image.height * 2 // 3))
            variant = crop.resize((w, h), Image.Resampling.BICUBIC)
            if k % 2:
                encoded.append((f"v{index}_{k}.jpg", _encode(variant, "JPEG", quality=int(rng.integers(30, 95)))))
            else:
                encoded.append((f"v{index}_{k}.png", _encode(variant, "PNG")))
    return encoded


def _mode_images() -> list[tuple[str, bytes]]:
    """RGBA, palette, 16-bit, grey+alpha and CMYK files, which open_image normalises to RGB."""
    rng = np.random.default_rng(3)
    photo = Image.fromarray(data.chelsea()).resize((90, 60))
    alpha = Image.fromarray(np.linspace(0, 255, 90 * 60).reshape(60, 90).astype(np.uint8))
    rgba = photo.copy()
    rgba.putalpha(alpha)
    palette = photo.quantize(64)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    grey16 = Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257 + rng.integers(0, 200, (60, 90)))
                             .astype(np.uint16))
    la = photo.convert("LA")
    la.putalpha(alpha)
    return [("rgba.png", _encode(rgba, "PNG")), ("palette.png", _encode(palette, "PNG")),
            ("palette_transparent.png", _encode(transparent, "PNG")), ("grey16.png", _encode(grey16, "PNG")),
            ("la.png", _encode(la, "PNG")), ("cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG")),
            ("palette.gif", _encode(palette, "GIF"))]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, Image.Image]]:
    return [(name, open_image(blob)) for name, blob in _corpus_images() + _mode_images()]


def test_every_hash_equals_the_reference_packages(corpus: list[tuple[str, Image.Image]]) -> None:
    assert len(corpus) >= 200
    mismatches = [(name, img.size, ours, ref) for name, img in corpus
                  for ours, ref in zip(_ours(img), _reference(img)) if ours != ref]
    assert mismatches == []


def test_size_16_hashes_equal_imagehash(corpus: list[tuple[str, Image.Image]]) -> None:
    sample = corpus[::5]
    mismatches = [(name, ours, ref) for name, img in sample
                  for ours, ref in zip(_ours(img, (8, 16)), _reference(img, (8, 16))) if ours != ref]
    assert mismatches == []
    assert {h.bits for h in compute_hashes(sample[0][1], imagehash_sizes=(16,)) if h.kind == "phash"} == {256}


def test_awkward_files_hash_like_the_references(bad_corpus: Path) -> None:
    # CMYK, 16-bit, alpha, palette, bilevel, animated, EXIF-turned, WebP, TIFF: decoded once by open_image.
    for name in sorted(name for name, (_, expectation) in CORPUS.items() if expectation.ok):
        img = open_image(bad_corpus / name)
        assert _ours(img) == _reference(img), name


def test_mode_files_are_in_the_corpus_and_decode_to_rgb(corpus: list[tuple[str, Image.Image]]) -> None:
    by_name = dict(corpus)
    for name, _ in _mode_images():
        assert by_name[name].mode == "RGB"
    # the 16-bit file keeps its detail through open_image, so its hashes are not those of a flat image
    assert not is_low_detail(by_name["grey16.png"])


def test_resize_equals_pillow_for_both_pass_orders_and_boundary_coefficients() -> None:
    # Pillow 13 resizes vertically first when the height shrinks more than twice as much as the
    # width; 2637 -> 3 has a weight within 1e-6 of a rounding boundary, recomputed exactly.
    rng = np.random.default_rng(11)
    shapes = [(int(w), int(h)) for w, h in rng.integers(1, 300, (40, 2))]
    shapes += [(10, 400), (400, 10), (2637, 5), (5, 2637), (1, 1), (33, 33)]
    targets = {(2, 2), (3, 3), (9, 8), (8, 8), (9, 9), (32, 32), (5, 17)}
    assert _pass_order() is not None  # the installed Pillow's pass order is known: the fast path runs
    for width, height in shapes:
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        ours = _resize_many(grey, targets)
        for size in targets:
            expected = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.LANCZOS))
            assert np.array_equal(ours[size], expected), (width, height, size)


def test_whash_float_replay_equals_imagehash_on_photos() -> None:
    # compute_hashes replays imagehash's floating-point wavelet steps only when a block sum ties
    # with the median; check the replay itself on images where it is not needed.
    for photo in _photos()[:5]:
        img = Image.fromarray(photo).resize((300, 200))
        scale = 128
        pixels = np.asarray(img.convert("L").resize((scale, scale), Image.Resampling.LANCZOS))
        for size in (8, 16):
            assert np.array_equal(_whash_replay(pixels, size), imagehash.whash(img, hash_size=size).hash)


def test_hash_values_and_integer_forms(corpus: list[tuple[str, Image.Image]]) -> None:
    img = dict(corpus)["base0.png"]
    hashes = compute_hashes(img, imagehash_sizes=(8, 16))
    assert [h.kind for h in hashes] == ["dhash_rowcol"] * 8 + list(KINDS[1:]) * 2
    for h in hashes:
        if h.kind == "dhash_rowcol":
            assert h.bits == 2 * h.size ** 2
            assert h.to_int() == dhash.dhash_int(img, size=h.size)
        else:
            assert h.bits == h.size ** 2
            assert h.to_int() == int(h.hex, 16) and len(h.hex) == h.bits // 4
        assert 0 <= h.to_int() < 2 ** h.bits
        signed = h.to_signed64()
        if h.bits > 64:
            assert signed is None
        else:
            assert -2 ** 63 <= signed < 2 ** 63 and signed % 2 ** 64 == h.to_int()


def test_signed_form_of_a_high_bit_hash() -> None:
    h = HashValue("ahash", 8, "ff00000000000001", 64, 0xFF00000000000001)
    assert h.to_signed64() == 0xFF00000000000001 - 2 ** 64
    assert HashValue("ahash", 8, "7f00000000000001", 64, 0x7F00000000000001).to_signed64() == 0x7F00000000000001


def test_odd_dhash_sizes_keep_the_packages_unpadded_hex() -> None:
    # dhash.format_hex pads each half to size*size//4 digits, too few for 9 or 25 bits.
    img = Image.fromarray(data.astronaut()).resize((64, 64))
    by_size = {h.size: h for h in compute_hashes(img, imagehash_sizes=()) if h.kind == "dhash_rowcol"}
    for size in (1, 3, 5, 7):
        assert by_size[size].hex == dhash.format_hex(*dhash.dhash_row_col(img, size=size), size=size)
        assert by_size[size].to_int() == dhash.dhash_int(img, size=size)


def test_hamming_hex_equals_imagehash_difference(corpus: list[tuple[str, Image.Image]]) -> None:
    images = [img for _, img in corpus[:30]]
    for a, b in zip(images, images[1:]):
        for function in IMAGEHASH.values():
            ha, hb = function(a), function(b)
            assert hamming_hex(str(ha), str(hb)) == ha - hb
    with pytest.raises(ValueError):
        hamming_hex("ff", "fff")


def test_low_detail_flags_flat_images_only() -> None:
    rng = np.random.default_rng(5)
    white = Image.new("RGB", (300, 200), "white")
    noisy = Image.fromarray(np.clip(128 + rng.normal(0, 3, (200, 300)), 0, 255).astype(np.uint8)).convert("RGB")
    faint = Image.fromarray(np.tile(np.linspace(120, 124, 300), (200, 1)).astype(np.uint8)).convert("RGB")
    logo = white.copy()
    ImageDraw.Draw(logo).rectangle([140, 90, 160, 110], fill="black")
    text = white.copy()
    ImageDraw.Draw(text).text((10, 90), "hello world", fill="black")
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 300), (200, 1)).astype(np.uint8)).convert("RGB")
    flat = [white, Image.new("RGB", (40, 30), (200, 30, 60)), noisy, faint]
    detailed = [logo, text, gradient, Image.fromarray(data.astronaut()), Image.fromarray(data.moon()).convert("RGB")]
    for img in flat + detailed:
        decoded = open_image(_encode(img, "JPEG", quality=60))
        assert is_low_detail(decoded) == (img in flat)
    # why it matters: two look-alike flat images get unrelated hashes, decided by their noise
    twin = Image.fromarray(np.clip(128 + rng.normal(0, 3, (200, 300)), 0, 255).astype(np.uint8)).convert("RGB")
    ahashes = [next(h for h in compute_hashes(open_image(_encode(img, "JPEG"))) if h.kind == "ahash")
               for img in (noisy, twin)]
    assert hamming_hex(ahashes[0].hex, ahashes[1].hex) > 10


def test_bad_sizes_are_refused() -> None:
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError):
        compute_hashes(img, imagehash_sizes=(12,))  # whash needs a power of two
    with pytest.raises(ValueError):
        compute_hashes(img, imagehash_sizes=(1,))
    with pytest.raises(ValueError):
        compute_hashes(img, dhash_sizes=(0,))


def test_hasher_version_names_pillow() -> None:
    assert HASHER_VERSION == f"pillow-{PIL.__version__}"
    assert DRAFT_HASHER_VERSION.startswith(HASHER_VERSION) and DRAFT_HASHER_VERSION != HASHER_VERSION


@pytest.mark.parametrize("in_size, out_size", [(2637, 3), (400, 9), (401, 32), (7, 32), (1, 8), (100, 100)])
def test_vectorised_weights_equal_the_scalar_c_replica(in_size: int, out_size: int) -> None:
    # The NumPy build of Pillow's fixed-point weights against the scalar copy of the C loop
    # (math.sin is the C library's sin); 2637 -> 3 is a size where the scalar copy is used.
    matrix = _resample_matrix(in_size, out_size)
    for xx in range(out_size):
        assert np.array_equal(matrix[:, xx], _exact_column(in_size, out_size, xx)), xx


def test_images_with_alpha_must_come_through_open_image() -> None:
    # The references disagree on alpha (dhash flattens it on white, imagehash drops it).
    with pytest.raises(ValueError):
        compute_hashes(Image.new("RGBA", (10, 10)))
