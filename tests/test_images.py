"""open_image and probe on every file of the awkward-image corpus, from bytes, str and Path."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.images import ImageError, ImageInfo, open_image, probe
from support.corpus import CORPUS

GOOD = sorted(name for name, (_, expectation) in CORPUS.items() if expectation.ok)
BAD = sorted(name for name, (_, expectation) in CORPUS.items() if not expectation.ok)
SOURCE_KINDS = ["bytes", "str", "path"]


def _source(corpus: Path, name: str, kind: str) -> bytes | str | Path:
    path = corpus / name
    return {"bytes": path.read_bytes(), "str": str(path), "path": path}[kind]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("name", GOOD)
def test_open_image_gives_upright_rgb_with_expected_pixels(bad_corpus: Path, name: str, kind: str) -> None:
    expectation = CORPUS[name][1]
    expectation.assert_matches(open_image(_source(bad_corpus, name, kind)))


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("name", GOOD)
def test_probe_reports_displayed_size_and_format(bad_corpus: Path, name: str, kind: str) -> None:
    expectation = CORPUS[name][1]
    width, height = expectation.size
    assert probe(_source(bad_corpus, name, kind)) == ImageInfo(width, height, expectation.format)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("name", BAD)
def test_bad_files_raise_image_error_with_reason(bad_corpus: Path, name: str, kind: str) -> None:
    expectation = CORPUS[name][1]
    for function in (open_image, probe):
        with pytest.raises(ImageError) as caught:
            function(_source(bad_corpus, name, kind))
        assert expectation.reason in caught.value.reason
        assert len(caught.value.reason) < 200  # short enough to store on the image's row


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_files_store_the_picture_turned(bad_corpus: Path, orientation: int) -> None:
    # Guards the corpus itself: each file really is stored turned, with its EXIF tag.
    with Image.open(bad_corpus / f"orientation_{orientation}.jpg") as raw:
        assert raw.getexif()[0x0112] == orientation
        assert raw.size == ((32, 48) if orientation >= 5 else (48, 32))
        stored = np.asarray(raw.convert("RGB")).astype(int)
    red_corner = [corner for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]
                  if stored[corner][0] > 200 and stored[corner][1] < 60]
    assert len(red_corner) == 1
    expected_corner = {1: (0, 0), 2: (0, -1), 3: (-1, -1), 4: (-1, 0),
                       5: (0, 0), 6: (-1, 0), 7: (-1, -1), 8: (0, -1)}[orientation]
    assert red_corner[0] == expected_corner


def test_animated_gif_has_three_different_frames(bad_corpus: Path) -> None:
    with Image.open(bad_corpus / "animated.gif") as gif:
        assert gif.n_frames == 3
        colours = []
        for index in range(3):
            gif.seek(index)
            colours.append(gif.convert("RGB").getpixel((10, 10)))
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_corpus_raw_modes_are_the_awkward_ones(bad_corpus: Path) -> None:
    modes = {}
    for name in ["cmyk.jpg", "grey16.png", "rgba.png", "la.png", "palette_transparent.png", "bilevel.png"]:
        with Image.open(bad_corpus / name) as raw:
            modes[name] = raw.mode
    assert modes == {"cmyk.jpg": "CMYK", "grey16.png": "I;16", "rgba.png": "RGBA", "la.png": "LA",
                     "palette_transparent.png": "P", "bilevel.png": "1"}


def test_bombs_are_small_files_declaring_huge_sizes(bad_corpus: Path) -> None:
    for name, pixels in [("bomb.png", 20000 * 20000), ("bomb_warning.png", 10000 * 10000)]:
        assert (bad_corpus / name).stat().st_size < 100_000
        assert int.from_bytes((bad_corpus / name).read_bytes()[16:20]) ** 2 == pixels  # IHDR width


def test_missing_file_and_directory_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="unreadable file"):
        probe(tmp_path)


def test_draft_decodes_jpeg_smaller_but_still_upright_rgb(bad_corpus: Path, sample_images: dict[str, bytes]) -> None:
    full = open_image(sample_images["a.jpg"])
    small = open_image(sample_images["a.jpg"], draft=(16, 12))
    assert full.size == (64, 48) and small.size == (16, 12) and small.mode == "RGB"
    turned = open_image(bad_corpus / "orientation_6.jpg", draft=(16, 24))
    assert turned.size[0] > turned.size[1]  # still displayed landscape
    assert turned.getpixel((1, 1))[0] > 200 and turned.getpixel((1, 1))[1] < 80  # red block top-left


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_decoding_leaves_no_file_open(bad_corpus: Path) -> None:
    before = len(list(Path("/proc/self/fd").iterdir()))
    kept = []  # a caller recording failures keeps the errors (and their tracebacks) alive
    for name in sorted(CORPUS):
        try:
            kept.append(open_image(bad_corpus / name))
        except ImageError as error:
            kept.append(error)
    assert len(list(Path("/proc/self/fd").iterdir())) == before


# ---------------------------------------------------------------- the pixel budget

def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("budget, size", [(120_000, (400, 300)), (40_000, (200, 150)), (10_000, (100, 75)),
                                          (1_900, (50, 38))])
def test_a_jpeg_over_the_budget_decodes_at_a_scale_that_fits(budget: int, size: tuple[int, int]) -> None:
    image = open_image(_jpeg(400, 300), max_pixels=budget)
    assert image.size == size and image.mode == "RGB"
    assert image.getpixel((size[0] // 2, size[1] // 2))[0] > 150  # still the red picture
    # The caller's draft and the budget together: the smaller decode wins.
    assert open_image(_jpeg(400, 300), draft=(300, 200), max_pixels=10_000).size == (100, 75)


def test_anything_over_the_budget_that_cannot_shrink_is_refused() -> None:
    with pytest.raises(ImageError, match=r"too many pixels: 400x300 is 0.1 megapixels, over the limit of 0.0018"):
        open_image(_jpeg(400, 300), max_pixels=1_800)  # even 1/8 scale (50x38) is over
    png = io.BytesIO()
    Image.new("RGB", (400, 300)).save(png, "PNG")
    assert open_image(png.getvalue(), max_pixels=120_000).size == (400, 300)
    with pytest.raises(ImageError, match="too many pixels: 400x300"):
        open_image(png.getvalue(), max_pixels=119_999)


_HUGE_PNG_DECODER = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from support.pixels import blank_rgb_png
from lookalike.images import ImageError, QUERY_MAX_PIXELS, open_image, thumbnail_jpeg
data = blank_rgb_png(9000, 9000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for decode in (lambda: open_image(data, max_pixels=QUERY_MAX_PIXELS), lambda: thumbnail_jpeg(data, 256, 85)):
    try:
        decode()
        print("decoded")
    except ImageError as exc:
        print(exc.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.timeout(120)
def test_a_huge_png_is_refused_before_its_pixels_are_allocated() -> None:
    # 81 megapixels in a 236 KB file: a full decode peaks at about 640 MB (measured).
    tests = Path(__file__).parent
    result = subprocess.run([sys.executable, "-c", _HUGE_PNG_DECODER, str(tests)], capture_output=True,
                            text=True, timeout=100, check=True)
    *reasons, grown_mb = result.stdout.split("\n")[:-1]
    assert reasons == ["too many pixels: 9000x9000 is 81.0 megapixels, over the limit of 40"] * 2
    assert int(grown_mb) < 50  # MB of peak memory the two refusals added


def test_bombs_are_refused_alike_when_threads_decode_at_once(bad_corpus: Path) -> None:
    # inspect and ingest decode in threads; a per-call warnings switch raced there and
    # let a warning-size bomb through to a different refusal (a CI failure).
    from concurrent.futures import ThreadPoolExecutor
    bomb, ok = (bad_corpus / "bomb_warning.png").read_bytes(), (bad_corpus / "cmyk.jpg").read_bytes()

    def reason(data: bytes) -> str:
        try:
            open_image(data)
            return "decoded"
        except ImageError as exc:
            return str(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # threads swap often, so a race shows in a few hundred calls
    try:
        with ThreadPoolExecutor(8) as pool:
            reasons = list(pool.map(reason, [bomb, ok] * 300))
    finally:
        sys.setswitchinterval(switch)
    assert set(reasons[0::2]) == {"decompression bomb: Image size (100000000 pixels) exceeds limit of 89478485 pixels"}
    assert set(reasons[1::2]) == {"decoded"}
