"""The copy transforms of the sample renderer and the dedupe dev set, one at a time, on a rendered photo."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.images import open_image, probe
from lookalike.samples import COPY_OPS, copy_image, render_samples, rotated_inner_box


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Image.Image:
    root = tmp_path_factory.mktemp("original")
    render_samples(root, per_label=1, seed=5, copy_share=0)
    return open_image(root / "leopard" / "leopard_0001.jpg")


def _copy(original: Image.Image, op: str, seed: int = 3) -> tuple[np.ndarray, bytes, str]:
    data, ext, transform = copy_image(original, [op], np.random.default_rng(seed))
    assert probe(data).format == ("PNG" if op == "png" else "JPEG")
    assert ext == ("png" if op == "png" else "jpg")
    return np.asarray(open_image(data), dtype=np.float32), data, transform


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def _param(transform: str, op: str) -> str:
    return dict(step.split(":") for step in transform.split("+"))[op]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_mirror(original):
    copy, _, transform = _copy(original, "mirror")
    assert transform == "mirror"
    assert _diff(copy, _px(ImageOps.mirror(original))) < 3 < _diff(copy, _px(original))


def test_crop_keeps_a_shifted_window_of_the_stated_share(original):
    copy, _, transform = _copy(original, "crop")
    share = float(_param(transform, "crop"))
    assert 0.05 <= share <= 0.30
    w, h = original.size
    assert copy.shape[:2] == (round(h * (1 - share)), round(w * (1 - share)))
    # Find where the copy sat: slide its top-left 24x24 corner over every allowed offset.
    grey = _px(original.convert("L"))
    corner = _px(Image.fromarray(copy.astype(np.uint8)).convert("L"))[:24, :24]
    windows = np.lib.stride_tricks.sliding_window_view(grey, (24, 24))[: h - copy.shape[0] + 1, : w - copy.shape[1] + 1]
    top, left = np.unravel_index(np.abs(windows - corner).mean(axis=(2, 3)).argmin(), windows.shape[:2])
    window = _px(original)[top:top + copy.shape[0], left:left + copy.shape[1]]
    assert _diff(copy, window) < 3


def test_rotate_turns_by_the_stated_angle_and_leaves_no_empty_corner(original):
    copy, _, transform = _copy(original, "rotate")
    degrees = float(_param(transform, "rotate"))
    assert 1 <= abs(degrees) <= 5
    left, top, right, bottom = rotated_inner_box(*original.size, degrees)
    assert copy.shape[:2] == (bottom - top, right - left)
    assert copy.shape[0] > 0.8 * original.height and copy.shape[1] > 0.8 * original.width
    turned = _px(original.rotate(degrees, Image.Resampling.BICUBIC).crop((left, top, right, bottom)))
    assert _diff(copy, turned) < 3 < _diff(copy, _px(original.resize((right - left, bottom - top))))
    # Rotating leaves black wedges outside the old frame: none of them may be in the copy.
    assert copy[[0, 0, -1, -1], [0, -1, 0, -1]].min() > 100
    # One pixel more on every side would reach into a wedge: the box is as large as it can be.
    grown = _px(original.rotate(degrees, Image.Resampling.BICUBIC, fillcolor=(255, 0, 255))
                .crop((left - 2, top - 2, right + 2, bottom + 2)))
    magenta = (grown[..., 0] > 200) & (grown[..., 1] < 60) & (grown[..., 2] > 200)
    assert magenta.any()


def test_squash_scales_one_side_by_ten_to_twenty_percent(original):
    seen = set()
    for seed in range(12):
        copy, _, transform = _copy(original, "squash", seed)
        value = _param(transform, "squash")
        axis, factor = value[0], float(value[1:])
        assert axis in "xy" and (0.8 <= factor <= 0.9 or 1.1 <= factor <= 1.2)
        w, h = original.size
        assert copy.shape[:2] == ((h, round(w * factor)) if axis == "x" else (round(h * factor), w))
        seen.add((axis, factor > 1))
    assert len(seen) == 4


def test_resize(original):
    copy, _, transform = _copy(original, "resize")
    factor = float(_param(transform, "resize"))
    assert 0.3 <= factor <= 0.8
    size = (round(original.width * factor), round(original.height * factor))
    assert copy.shape[:2] == size[::-1]
    assert _diff(copy, _px(original.resize(size, Image.Resampling.LANCZOS))) < 3


def test_border_frames_the_whole_image_in_one_colour(original):
    copy, _, transform = _copy(original, "border")
    n = int(_param(transform, "border"))
    assert 0.03 * min(original.size) - 1 <= n <= 0.1 * min(original.size) + 1
    assert copy.shape[:2] == (original.height + 2 * n, original.width + 2 * n)
    ring = np.concatenate([copy[:n - 1].reshape(-1, 3), copy[-n + 1:].reshape(-1, 3),
                           copy[:, :n - 1].reshape(-1, 3), copy[:, -n + 1:].reshape(-1, 3)])
    assert ring.std(axis=0).max() < 4
    assert _diff(copy[n:-n, n:-n], _px(original)) < 3


def test_pad_letterboxes_to_a_square(original):
    copy, _, transform = _copy(original, "pad")
    assert transform == "pad"
    side = max(original.size)
    assert copy.shape[:2] == (side, side)
    top, left = (side - original.height) // 2, (side - original.width) // 2
    assert _diff(copy[top:top + original.height, left:left + original.width], _px(original)) < 3


def test_light_changes_brightness_and_contrast_by_the_stated_factors(original):
    copy, _, transform = _copy(original, "light")
    bright, contrast = float(_param(transform, "brightness")), float(_param(transform, "contrast"))
    assert (0.7 <= bright <= 0.9 or 1.1 <= bright <= 1.3) and 0.7 <= contrast <= 1.3
    # Brightness scales every value; contrast then pulls them toward (or pushes them from) the mean grey.
    bright_px = np.clip(_px(original) * bright, 0, 255)
    mean = (bright_px @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean()
    expected = np.clip(mean + contrast * (bright_px - mean), 0, 255)
    assert _diff(copy, expected) < 3


def test_blur_removes_fine_detail(original):
    copy, _, transform = _copy(original, "blur")
    assert float(_param(transform, "blur")) > 0

    def detail(pixels: np.ndarray) -> float:
        grey = pixels.mean(axis=2)
        return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())

    assert detail(copy) < 0.7 * detail(_px(original))


def test_grey_saves_one_channel(original):
    copy, data, transform = _copy(original, "grey")
    assert transform == "grey"
    assert Image.open(io.BytesIO(data)).mode == "L"
    assert np.abs(copy - copy.mean(axis=2, keepdims=True)).max() == 0
    assert _diff(copy[..., 0], _px(original.convert("L"))) < 3


@pytest.mark.parametrize("op", ["text", "watermark"])
def test_overlays_change_a_part_of_the_image_only(original, op):
    copy, _, transform = _copy(original, op)
    assert transform == op
    changed = np.abs(copy - _px(original)).max(axis=2) > 40
    assert 0.002 < changed.mean() < 0.15
    rows, cols = np.nonzero(changed)
    h, w = changed.shape
    if op == "text":   # a caption in one corner
        assert rows.max() - rows.min() < 0.3 * h and cols.max() - cols.min() < 0.75 * w
        assert min(rows.min(), h - rows.max()) < 0.2 * h
    else:              # a word across the middle
        assert abs(rows.mean() - h / 2) < 0.15 * h and abs(cols.mean() - w / 2) < 0.15 * w


def test_jpeg_recompresses_at_the_stated_quality(original):
    _, data, transform = _copy(original, "jpeg")
    quality = int(_param(transform, "jpeg").removeprefix("q"))
    assert 15 <= quality <= 90
    reference = io.BytesIO()
    original.save(reference, "JPEG", quality=quality)
    assert Image.open(io.BytesIO(data)).quantization == Image.open(reference).quantization


def test_png_is_lossless(original):
    copy, _, transform = _copy(original, "png")
    assert transform == "png"
    assert np.array_equal(copy, _px(original))


def test_every_op_is_tested_here():
    tested = {name.split("_")[1] for name in globals() if name.startswith("test_")} | {"text", "watermark"}
    assert set(COPY_OPS) <= tested


def test_ops_apply_in_one_order_and_the_same_seed_gives_the_same_bytes(original):
    first = copy_image(original, ["crop", "mirror", "jpeg"], np.random.default_rng(9))
    again = copy_image(original, ["jpeg", "mirror", "crop"], np.random.default_rng(9))
    assert first == again
    assert first[2].startswith("mirror+crop:") and "+jpeg:q" in first[2]
    assert copy_image(original, ["crop", "mirror", "jpeg"], np.random.default_rng(10))[0] != first[0]


def test_an_unknown_transform_is_refused_by_name(original):
    with pytest.raises(ValueError, match="unknown copy transform.*sepia"):
        copy_image(original, ["mirror", "sepia"], np.random.default_rng(0))
