"""Is image B a copy of image A? Local-feature geometry for the pairs an embedding cannot decide.

Pure image code (no database). A copy may be mirrored, cropped, padded,
squashed, slightly rotated, re-compressed, blurred, greyed or written on. For
such a pair we:

1. find ORB keypoints in both (at most :data:`VIEW_SIDE` pixels on a side) and
   match them with Lowe's ratio test, once as they are and once with B mirrored;
2. fit an affine map B → A with RANSAC and count its inliers;
3. check that the map explains the frames, not a detail: one image must lie
   mostly inside the other (a crop or a padded copy does; two shots framed
   half a frame apart do not);
4. warp B onto A and compare the pixels where they overlap: grey correlation
   of edges and texture (a copy's content lines up; another photo of the same
   tiled pattern, which RANSAC can align on its repeats, does not), and colour
   (the same design in another colour lines up in grey but not in colour; a
   grey copy is compared in grey only). Where the evidence is weaker (a map
   that fewer than half the matches fit, as a repeating pattern gives; a dense
   alignment; colours that differ somewhat), the pixels must agree more closely.

Images with too few keypoints to judge (skies, gradients) are aligned densely
instead (ECC on small grey images), then compared the same way.

The thresholds are in :class:`GeometryThresholds`, calibrated on the
real-photograph dev set (``bench/bench_dedupe_quality.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import cv2
import numpy as np
from PIL import Image

from .images import Source, open_image

VIEW_SIDE = 400            # longest side the verification works at, in pixels
_ORB_FEATURES = 600
_RATIO = 0.8               # Lowe's ratio test: a match must be clearly better than the runner-up
_RANSAC_PIXELS = 6.0       # reprojection tolerance at VIEW_SIDE
_COLOURFUL_CHROMA = 10.0   # Lab chroma from which a pixel counts as coloured
_GREY_SHARE = 0.01         # an image with fewer coloured pixels than this share is grey: colours are not compared
_SMOOTH_PRECHECK = 0.5     # correlation of 24x24 thumbnails below which dense alignment is not tried
_SMOOTH_SIDE = 96         # longest side of the dense (ECC) alignment: smooth images lose little at this size


@dataclass(frozen=True)
class GeometryThresholds:
    min_inliers: int = 12            # RANSAC inliers of the affine map
    min_inlier_share: float = 0.15   # inliers / ratio-test matches (repetitive scenes such as a chessboard: ~0.2)
    min_containment: float = 0.7     # share of the smaller frame inside the other
    min_correlation: float = 0.5     # grey correlation where the warped images overlap
    max_colour_difference: float = 0.45  # chroma difference where they overlap (0 same .. 1 unrelated), colour pairs only
    # Weaker evidence asks for closer pixels: a map that fewer than half the matches fit (a repeating pattern,
    # such as stripes, aligns on its repeats), a dense alignment, or colours that differ somewhat. Two striped
    # garments aligned so correlate 0.50-0.71; copies stay at 0.73 and more (dev and sample sets).
    clear_inlier_share: float = 0.5
    clear_colour_difference: float = 0.25
    min_doubtful_correlation: float = 0.8
    min_smooth_correlation: float = 0.95  # images with too few keypoints: grey correlation of the ECC alignment

    def as_dict(self) -> dict:
        return asdict(self)


class View:
    """An image as verification sees it: small, grey, Lab chroma, keypoints (the mirrored ones when asked)."""

    def __init__(self, grey: np.ndarray, chroma: np.ndarray):
        self.grey = grey              # uint8 (h, w)
        self.chroma = chroma          # uint8 (h, w, 2): Lab a, b as OpenCV stores them (+128)
        self.keypoints = _keypoints(grey)   # (points float32 (n, 2), descriptors uint8 (n, 32)) or (None, None)

    @cached_property
    def mirrored(self) -> tuple[np.ndarray, np.ndarray]:
        """(grey, chroma) mirrored left to right."""
        return np.ascontiguousarray(self.grey[:, ::-1]), np.ascontiguousarray(self.chroma[:, ::-1])

    @cached_property
    def mirrored_keypoints(self) -> tuple:
        return _keypoints(self.mirrored[0])


@dataclass(frozen=True)
class Geometry:
    """What the geometric check measured for one pair (B mapped onto A)."""

    matched: bool
    inliers: int = 0
    inlier_share: float = 0.0
    containment: float = 0.0
    correlation: float = 0.0
    colour_difference: float = 0.0
    mirrored: bool = False
    reason: str = ""


_orb = None


def _detector():
    global _orb
    if _orb is None:  # one detector per process; ORB's detectAndCompute is reentrant
        _orb = cv2.ORB_create(nfeatures=_ORB_FEATURES, fastThreshold=10)
    return _orb


def _keypoints(grey: np.ndarray) -> tuple:
    points, descriptors = _detector().detectAndCompute(grey, None)
    if descriptors is None or len(points) < 2:
        return None, None
    return np.float32([p.pt for p in points]), descriptors


def make_view(image: Image.Image) -> View:
    """A :class:`View` of a decoded RGB image."""
    small = image.copy()
    small.thumbnail((VIEW_SIDE, VIEW_SIDE), Image.Resampling.BILINEAR)
    rgb = np.asarray(small.convert("RGB"))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return View(grey, np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[:, :, 1:]))


def load_view(source: Source) -> View:
    """Decode (JPEG at reduced scale) and make a :class:`View`; raises ``ImageError`` as ``open_image``."""
    return make_view(open_image(source, draft=(VIEW_SIDE, VIEW_SIDE)))


def _ratio_matches(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Matched point pairs (points in B, points in A) that pass the ratio test."""
    if a[1] is None or b[1] is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(b[1], a[1], k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < _RATIO * p[1].distance]
    return (np.float32([b[0][m.queryIdx] for m in good]).reshape(-1, 2),
            np.float32([a[0][m.trainIdx] for m in good]).reshape(-1, 2))


def _polygon_area(points: np.ndarray) -> float:
    return float(cv2.contourArea(points.astype(np.float32)))


def _containment(transform: np.ndarray, b_shape: tuple, a_shape: tuple) -> float:
    """The larger of: share of B's mapped frame inside A, share of A inside B's mapped frame."""
    hb, wb = b_shape
    ha, wa = a_shape
    corners = np.float32([[0, 0], [wb, 0], [wb, hb], [0, hb]])
    mapped = (corners @ transform[:, :2].T + transform[:, 2]).astype(np.float32)
    frame_a = np.float32([[0, 0], [wa, 0], [wa, ha], [0, ha]])
    mapped_area = _polygon_area(mapped)
    if mapped_area <= 1.0:
        return 0.0
    overlap, _ = cv2.intersectConvexConvex(np.ascontiguousarray(mapped), frame_a)
    return max(overlap / mapped_area, overlap / float(wa * ha))


def _detail(grey: np.ndarray, scale: float) -> np.ndarray:
    """Band-pass grey (difference of Gaussians): edges and texture, without flat areas, JPEG noise or lighting.

    ``scale`` widens the band where B was enlarged onto A, so both keep only
    the detail the smaller image has.
    """
    grey = grey.astype(np.float32)
    return cv2.GaussianBlur(grey, (0, 0), 1.2 * scale) - cv2.GaussianBlur(grey, (0, 0), 4.0 * scale)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else 0.0


def _colour_difference(a_chroma: np.ndarray, b_chroma: np.ndarray) -> float:
    """How far two aligned Lab chroma arrays differ: the summed distance between their (a, b) vectors
    over their summed lengths, 0 for the same colours, 1 for unrelated ones.

    Brightness and contrast changes scale chroma (copies stay under 0.34 on
    the dev and sample sets); a recolouring turns it (0.58 and more). A side
    with almost no coloured pixels is grey: a grey copy is a copy, so only
    grey is compared (0).
    """
    a = a_chroma.reshape(-1, 2).astype(np.float32) - 128.0
    b = b_chroma.reshape(-1, 2).astype(np.float32) - 128.0
    length_a, length_b = np.hypot(a[:, 0], a[:, 1]), np.hypot(b[:, 0], b[:, 1])
    if min((length_a >= _COLOURFUL_CHROMA).mean(), (length_b >= _COLOURFUL_CHROMA).mean()) < _GREY_SHARE:
        return 0.0
    total = float((length_a + length_b).sum())
    return float(np.hypot(*(a - b).T).sum() / total) if total > 0 else 0.0


def _overlap_statistics(a: View, b_grey: np.ndarray, b_chroma: np.ndarray,
                        transform: np.ndarray) -> tuple[float, float]:
    """Detail correlation and colour difference where B, warped onto A, overlaps A."""
    height, width = a.grey.shape
    warped = cv2.warpAffine(b_grey, transform, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(np.full(b_grey.shape, 255, np.uint8), transform, (width, height), flags=cv2.INTER_NEAREST)
    inside = cv2.erode(inside, np.ones((9, 9), np.uint8)) > 0   # away from the warped border
    if inside.sum() < 0.05 * width * height:
        return 0.0, 180.0
    scale = max(1.0, float(np.sqrt(abs(np.linalg.det(transform[:, :2])))))
    # Both statistics are of blurred signals: every other row and column is as good as all, at a quarter the cost.
    inside = inside[::2, ::2]
    correlation = _correlation(_detail(a.grey, scale)[::2, ::2][inside], _detail(warped, scale)[::2, ::2][inside])
    chroma = cv2.warpAffine(b_chroma, transform, (width, height), flags=cv2.INTER_LINEAR)
    difference = _colour_difference(cv2.blur(a.chroma, (5, 5))[::2, ::2][inside],
                                    cv2.blur(chroma, (5, 5))[::2, ::2][inside])
    return correlation, difference


def _oriented(b: View, mirrored: bool) -> tuple[np.ndarray, np.ndarray]:
    """B's grey and chroma as compared: mirrored when asked."""
    return b.mirrored if mirrored else (b.grey, b.chroma)


def _pixel_checks(a: View, b_grey: np.ndarray, b_chroma: np.ndarray, transform: np.ndarray,
                  inlier_share: float, thresholds: GeometryThresholds) -> tuple[float, float, str]:
    """(correlation, colour difference, the first check that failed or "") for B mapped onto A by ``transform``
    (``inlier_share`` 0 for a dense alignment)."""
    correlation, colour_difference = _overlap_statistics(a, b_grey, b_chroma, transform)
    clear = (inlier_share >= thresholds.clear_inlier_share
             and colour_difference <= thresholds.clear_colour_difference)
    needed = thresholds.min_correlation if clear else thresholds.min_doubtful_correlation
    checks = [(correlation >= needed, "aligned pixels do not agree"),
              (colour_difference <= thresholds.max_colour_difference, "colours differ")]
    return correlation, colour_difference, next((reason for ok, reason in checks if not ok), "")


def _fit(a: View, b: View, mirrored: bool, thresholds: GeometryThresholds) -> Geometry:
    source, target = _ratio_matches(a.keypoints, b.mirrored_keypoints if mirrored else b.keypoints)
    if len(source) < thresholds.min_inliers:
        return Geometry(False, inliers=len(source), mirrored=mirrored, reason="too few keypoint matches")
    transform, mask = cv2.estimateAffine2D(source, target, method=cv2.RANSAC,
                                           ransacReprojThreshold=_RANSAC_PIXELS, maxIters=2000,
                                           confidence=0.995, refineIters=10)
    if transform is None:
        return Geometry(False, mirrored=mirrored, reason="no consistent map")
    inliers = int(mask.sum())
    share = inliers / len(source)
    b_grey, b_chroma = _oriented(b, mirrored)
    containment = _containment(transform, b_grey.shape, a.grey.shape)
    checks = [(inliers >= thresholds.min_inliers, "too few inliers"),
              (share >= thresholds.min_inlier_share, "inliers are a small share of the matches"),
              (containment >= thresholds.min_containment, "the frames overlap too little")]
    failed = next((reason for ok, reason in checks if not ok), "")
    if failed:   # the pixel checks cost most: only for a map that could be a copy's
        return Geometry(False, inliers, share, containment, mirrored=mirrored, reason=failed)
    correlation, colour_difference, failed = _pixel_checks(a, b_grey, b_chroma, transform, share, thresholds)
    return Geometry(not failed, inliers, share, containment, correlation, colour_difference, mirrored, failed)


def _smooth_match(a: View, b: View, mirrored: bool, thresholds: GeometryThresholds) -> Geometry:
    """For images with too few keypoint matches (skies, gradients, repeated prints): align B to A densely
    (ECC on small grey images), then compare the aligned full views as a keypoint map is compared."""
    height, width = a.grey.shape
    scale = _SMOOTH_SIDE / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    b_grey, b_chroma = _oriented(b, mirrored)
    target = cv2.resize(a.grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    source = cv2.resize(b_grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    # A copy cropped by 30 % or turned by 5 degrees still correlates at 24 pixels; most other pairs do not,
    # and are refused before the (costly) dense alignment.
    if _correlation(cv2.resize(target, (24, 24), interpolation=cv2.INTER_AREA),
                    cv2.resize(source, (24, 24), interpolation=cv2.INTER_AREA)) < _SMOOTH_PRECHECK:
        return Geometry(False, mirrored=mirrored, reason="too few keypoints, and the small images differ")
    warp = np.eye(2, 3, dtype=np.float32)
    try:
        dense, warp = cv2.findTransformECC(target, source, warp, cv2.MOTION_AFFINE,
                                           (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 60, 1e-5), None, 5)
    except cv2.error:   # did not converge: nothing lines up
        return Geometry(False, mirrored=mirrored, reason="too few keypoints, and no dense alignment")
    if dense < thresholds.min_smooth_correlation:
        return Geometry(False, correlation=float(dense), mirrored=mirrored,
                        reason="too few keypoints, and the dense alignment correlates too little")
    # The warp maps A's small image into B's (both resized to A's small size); as a map of B's view onto A's:
    to_small_a = np.diag([size[0] / width, size[1] / height, 1.0])
    to_small_b = np.diag([size[0] / b_grey.shape[1], size[1] / b_grey.shape[0], 1.0])
    a_to_b = np.linalg.inv(to_small_b) @ np.vstack([warp, [0.0, 0.0, 1.0]]) @ to_small_a
    transform = np.linalg.inv(a_to_b)[:2]
    # Silhouettes alike (two garments cut the same) align too: their edges and texture must agree as well.
    correlation, colour_difference, failed = _pixel_checks(a, b_grey, b_chroma, transform, 0.0, thresholds)
    return Geometry(not failed, correlation=correlation, colour_difference=colour_difference, mirrored=mirrored,
                    containment=1.0, reason=failed)


def match_geometry(a: View, b: View, thresholds: GeometryThresholds = GeometryThresholds()) -> Geometry:
    """Whether B is a copy of A by keypoint geometry, trying B as it is and mirrored; the better result.

    Where neither orientation has enough keypoint matches to judge, a dense
    alignment of the small grey images decides instead.
    """
    results = []
    for mirrored in (False, True):
        fit = _fit(a, b, mirrored, thresholds)
        if fit.matched:
            return fit
        results.append(fit)
    if all(r.reason == "too few keypoint matches" for r in results):
        for mirrored in (False, True):
            fit = _smooth_match(a, b, mirrored, thresholds)
            if fit.matched:
                return fit
            results.append(fit)
    return max(results, key=lambda g: (g.inliers, g.correlation))
