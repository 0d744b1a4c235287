"""Geometric verification (lookalike.verify) on real pixels: what it must refuse, and what it must accept.

Three cases that once went wrong:
- the recolouring of a dark, muted photograph (few pixels colourful enough for
  a hue angle) passed as a copy;
- rendered garments cut alike, with few keypoint matches between them, were
  aligned densely on their silhouettes and passed as copies;
- rendered striped garments were aligned on their repeating stripes and passed as copies.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image, ImageEnhance

from lookalike.samples import copy_image
from lookalike.verify import make_view, match_geometry

CHINA = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def recoloured(image: Image.Image, turn: int) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + turn) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def test_the_recolouring_of_a_dark_muted_photograph_is_refused_and_its_copies_are_not():
    # A dusk photograph: dark, most pixels nearly grey, a few coloured (as opencv-doc's scenetext02).
    muted = ImageEnhance.Color(ImageEnhance.Brightness(Image.open(CHINA).convert("RGB")).enhance(0.45)).enhance(0.5)
    chroma = np.asarray(make_view(muted).chroma, np.float32) - 128
    assert 0.01 < (np.hypot(chroma[..., 0], chroma[..., 1]) >= 10).mean() < 0.2   # muted indeed
    original = make_view(muted)
    for turn in (64, 128, 192):   # 90, 180, 270 degrees
        result = match_geometry(original, make_view(recoloured(muted, turn)))
        assert not result.matched and result.reason == "colours differ", (turn, result)
    rng = np.random.default_rng(5)
    for ops in [("grey",), ("light",), ("jpeg",), ("mirror", "crop")]:
        data, _, steps = copy_image(muted, ops, rng)
        result = match_geometry(original, make_view(decoded(data)))
        assert result.matched, (steps, result)


DATA = Path(__file__).parent / "data"
# Pairs of rendered garments (``lookalike samples --per-label 700``) that once passed as copies.
# garments_cut_alike: different products cut alike, whose silhouettes the dense alignment lined up.
# striped_aligned_on_repeats: striped garments that keypoint RANSAC aligned on their repeating stripes
# (a third to a half of the matches fit the map, edges correlating 0.57-0.71).
LOOKALIKE_PAIRS = {
    "garments_cut_alike": [("dotted_0008", "dotted_0371"), ("dotted_0024", "dotted_0638"),
                           ("leopard_0038", "leopard_0267"), ("leopard_0624", "leopard_0643")],
    "striped_aligned_on_repeats": [("striped_0005", "striped_0601"), ("striped_0061", "striped_0236"),
                                   ("striped_0073", "striped_0272"), ("striped_0198", "striped_0310")],
}


@pytest.mark.parametrize("folder", sorted(LOOKALIKE_PAIRS))
def test_different_garments_that_align_are_not_copies_while_their_copies_are(folder):
    rng = np.random.default_rng(11)
    for first, second in LOOKALIKE_PAIRS[folder]:
        a, b = (Image.open(DATA / folder / f"{name}.jpg").convert("RGB") for name in (first, second))
        result = match_geometry(make_view(a), make_view(b))
        assert not result.matched, (first, second, result)
        for ops in [("crop",), ("mirror", "jpeg"), ("rotate",), ("light",)]:
            data, _, steps = copy_image(b, ops, rng)
            assert match_geometry(make_view(b), make_view(decoded(data))).matched, (second, steps)
