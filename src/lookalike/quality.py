"""Inspect step: an image-quality report stored per image (blurry, dark, bright, low-information, odd-aspect, tiny).

Reads ``images`` (status 'ok') and the image store; writes ``image_quality``,
one row per image: its scores, the flags they raise against
:data:`THRESHOLDS`, or why it could not be read. Each image is decoded once,
through :func:`lookalike.images.open_image`.

The issue types follow cleanvision's (its ``ImagePropertyIssueManager``),
where they are sound; where we differ, the score's comment says why. Every
score is computed on a grey thumbnail at most :data:`ANALYSIS_PX` pixels on
its long side, so that it means the same for a 300-pixel product shot and a
4,000-pixel photograph; the pixel size and the aspect ratio come from the
``images`` row (the displayed size, EXIF orientation applied).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.dialects import postgresql, sqlite
from tqdm import tqdm

from .db import Database, images, now, recorded_run
from .db.schema import image_quality
from .images import ImageError, open_image
from .steps import STEPS, check, default
from .workpool import FULL_DECODERS, cores

FLAGS: tuple[str, ...] = STEPS["inspect"].param("flag").choices
ANALYSIS_PX = 256          # long side of the grey thumbnail every score is computed on
COMMIT_EVERY = 200         # rows per transaction: an interrupted run keeps what it finished
NEAR_BLACK, NEAR_WHITE = 0.10, 0.90   # luminance (0..1) of a "near-black" and a "near-white" pixel


@dataclass(frozen=True)
class QualityThresholds:
    """When a score raises a flag. Calibrated on the dev set's real photographs (bench/bench_inspect.py)."""

    # Sharpness below this. Measured: the dev set's real photographs 0.024-4.4 (the two lowest are
    # OpenCV's motion-blurred licence plate, 0.024-0.025, which is blurry), the same photographs
    # after a Gaussian blur of 1 % of their size 0.0005-0.16 (98 % under 0.036).
    blurry: float = 0.03
    # The 99th percentile of luminance below this: even the brightest pixels are dim (cleanvision's
    # dark score and its Datalab threshold). Real photographs: 0.40 and up.
    dark: float = 0.32
    # The 1st percentile of luminance above this: even the darkest pixels are light, the picture is
    # washed out. cleanvision asks for the 5th percentile above 0.95, which only a near-white frame
    # meets; real photographs reach 0.68 here, and a product shot on white keeps its dark pixels.
    bright: float = 0.75
    # Grey-histogram entropy (bits, 0..8) below this: a near-solid image. Real photographs: 5.1 and up,
    # but a two-tone garment on white measures 3.2 (the sample set's lowest); a photograph reduced to
    # its mean colour with 4 % of it left: 1.1-3.4 (cleanvision: 3 bits, of the RGB histogram).
    low_information: float = 3.0
    odd_aspect: float = 0.35   # short side / long side below this (cleanvision's default)
    # Width x height below this (under 128 x 128). cleanvision flags sizes far from the collection's
    # mean instead; a stored flag must not change when other images are loaded.
    tiny: int = 128 * 128


THRESHOLDS = QualityThresholds()
# What a row records about how its scores and flags were made: another value re-inspects every image.
METHOD = (f"quality-1/{ANALYSIS_PX}px/pillow-{Image.__version__}/"
          f"{hashlib.sha256(repr(THRESHOLDS).encode()).hexdigest()[:8]}")


@dataclass(frozen=True)
class Scores:
    """What one image measures; pixel values as luminance 0..1."""

    sharpness: float      # variance of the Laplacian of the grey thumbnail, over the grey variance
    brightness: float     # mean luminance
    dark_share: float     # share of near-black pixels
    bright_share: float   # share of near-white pixels
    p01: float            # 1st percentile of luminance
    p99: float            # 99th percentile of luminance
    entropy: float        # bits, of the 256-bin grey histogram (0..8)
    aspect: float         # short side / long side
    pixels: int           # width x height


def measure(image: Image.Image, width: int | None = None, height: int | None = None) -> Scores:
    """The scores of a decoded RGB ``image``; ``width`` and ``height``: its full size when it was decoded smaller."""
    width, height = width or image.width, height or image.height
    grey = image.convert("L")
    grey.thumbnail((ANALYSIS_PX, ANALYSIS_PX))   # downscale only: a tiny image is measured as it is
    g = np.asarray(grey, dtype=np.float32) / 255.0
    return Scores(sharpness=_sharpness(g), brightness=float(g.mean()),
                  dark_share=float((g < NEAR_BLACK).mean()), bright_share=float((g > NEAR_WHITE).mean()),
                  p01=float(np.percentile(g, 1)), p99=float(np.percentile(g, 99)), entropy=_entropy(grey),
                  aspect=min(width, height) / max(width, height, 1), pixels=width * height)


def _sharpness(g: np.ndarray) -> float:
    # Variance of the 4-neighbour Laplacian, as is usual; cleanvision takes the spread of Pillow's
    # FIND_EDGES instead. Both grow with contrast, so a dim or hazy but sharp photograph reads as
    # blurry (cleanvision patches that for dark images only): ours is divided by the grey variance,
    # which leaves how much of the image's variation is fine detail.
    if min(g.shape) < 3:
        return 0.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    spread = float(g.var())
    return float(lap.var()) / spread if spread > 1e-6 else 0.0


def _entropy(grey: Image.Image) -> float:
    # Of the grey histogram (cleanvision: Pillow's entropy of the RGB histogram): a flat or
    # two-tone image has few grey levels, whatever its colour.
    counts = np.asarray(grey.histogram(), dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def flags_of(scores: Scores, t: QualityThresholds = THRESHOLDS) -> list[str]:
    """The issues ``scores`` raise, in :data:`FLAGS` order."""
    raised = {"blurry": scores.sharpness < t.blurry, "dark": scores.p99 < t.dark,
              "bright": scores.p01 > t.bright, "low-information": scores.entropy < t.low_information,
              "odd-aspect": scores.aspect < t.odd_aspect, "tiny": scores.pixels < t.tiny}
    return [f for f in FLAGS if raised[f]]


SCORE_COLUMNS = tuple(c.name for c in image_quality.c
                      if c.name not in ("image_id", "status", "reason", "flags", "method", "inspected_at"))
# Each flag's score column and the order that lists the worst first.
_WORST_FIRST = {"blurry": image_quality.c.sharpness.asc(), "dark": image_quality.c.luminance_p99.asc(),
                "bright": image_quality.c.luminance_p01.desc(), "low-information": image_quality.c.entropy.asc(),
                "odd-aspect": image_quality.c.aspect.asc(), "tiny": image_quality.c.pixels.asc()}


@dataclass(frozen=True)
class QualityRow:
    """One image's stored report, with what identifies it."""

    image_id: int
    label: str | None
    source: str
    width: int | None
    height: int | None
    status: str
    reason: str | None
    flags: list[str]
    scores: dict[str, float | int | None]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QualityPage:
    total: int               # rows that match, over all pages
    rows: list[QualityRow]


@dataclass
class InspectSummary:
    inspected: int = 0
    already: int = 0
    failed: Counter = field(default_factory=Counter)   # reason -> images
    flagged: Counter = field(default_factory=Counter)  # flag -> images, over every stored row
    listed: QualityPage | None = None                  # the flagged images asked for
    seconds: float = 0.0
    interrupted: bool = False

    def lines(self) -> list[str]:
        rate = self.inspected / self.seconds if self.seconds > 0 else 0.0
        out = [f"inspect: {self.inspected} inspected ({rate:.1f} images/s), {self.already} already inspected, "
               f"{sum(self.failed.values())} failed"]
        out += [f"  failed: {n:>5}  {reason}" for reason, n in self.failed.most_common()]
        out.append("flagged: " + (", ".join(f"{f} {self.flagged[f]}" for f in FLAGS if self.flagged[f]) or "none"))
        if self.interrupted:
            out.append("interrupted: reports written so far are kept; run again to finish")
        return out


def inspect_one(path, width: int | None, height: int | None) -> tuple[Scores | None, str | None]:
    """(scores, None), or (None, why) for an image that cannot be read."""
    if not path.exists():
        return None, "missing from the image store"
    try:
        # JPEGs decode at reduced scale: every score but the size is taken on a thumbnail.
        image = open_image(path, draft=(ANALYSIS_PX, ANALYSIS_PX))
    except ImageError as exc:
        return None, str(exc)
    return measure(image, width, height), None


def _row(image_id: int, scores: Scores | None, reason: str | None) -> dict[str, Any]:
    row: dict[str, Any] = dict(image_id=image_id, method=METHOD, inspected_at=now())
    values = {} if scores is None else dict(
        sharpness=scores.sharpness, brightness=scores.brightness, dark_share=scores.dark_share,
        bright_share=scores.bright_share, luminance_p01=scores.p01, luminance_p99=scores.p99,
        entropy=scores.entropy, aspect=scores.aspect, pixels=scores.pixels)
    row.update({c: values.get(c) for c in SCORE_COLUMNS})   # every key in every row: one executemany
    if scores is None:
        return dict(row, status="failed", reason=reason, flags=None)
    return dict(row, status="ok", reason=None, flags=",".join(flags_of(scores)))


def _write(db: Database, rows: list[dict]) -> int:
    """Insert these images' rows, replacing the ones they have (an upsert: two runs at once never clash)."""
    if rows:
        insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(image_quality)
        upsert = insert.on_conflict_do_update(index_elements=["image_id"], set_={
            c.name: insert.excluded[c.name] for c in image_quality.c if c.name != "image_id"})
        with db.begin() as conn:
            conn.execute(upsert, rows)
    return len(rows)


def inspect_images(db: Database, *, all_images: bool = default("inspect", "all_images"),
                   flag: str | None = default("inspect", "flag"), workers: int | None = None,
                   progress: bool | None = None) -> InspectSummary:
    """Score every ok image not inspected yet (every one with ``all_images``) and list the flagged ones.

    Reads ``images`` and the store; writes ``image_quality``, one row per image,
    replaced when inspected again (an image inspected by another :data:`METHOD`
    counts as not inspected). An image that cannot be read gets a 'failed' row
    with the reason, and the run goes on. ``flag`` picks what ``listed`` holds
    (default: images with any flag).
    """
    check("inspect", flag=flag)
    if progress is None:
        progress = sys.stderr.isatty()
    summary = InspectSummary()
    with recorded_run(db, "inspect", {"all": all_images, "method": METHOD}) as counts:
        with db.engine.connect() as conn:
            query = sa.select(images.c.id, images.c.sha256, images.c.width, images.c.height) \
                .where(images.c.status == "ok").order_by(images.c.id)
            if not all_images:
                done = sa.select(image_quality.c.image_id).where(image_quality.c.method == METHOD)
                query = query.where(images.c.id.not_in(done))
            todo = conn.execute(query).all()
            summary.already = conn.execute(sa.select(sa.func.count()).select_from(images).where(
                images.c.status == "ok")).scalar() - len(todo)
        started = time.monotonic()
        pending: list[dict] = []

        def work(row):
            return row[0], inspect_one(db.store.path(row[1]), row[2], row[3])

        # Decoding and resizing release the GIL: one thread per core, at most FULL_DECODERS (memory).
        pool = ThreadPoolExecutor(workers or cores(at_most=FULL_DECODERS))
        try:
            with tqdm(total=len(todo), unit="img", desc="inspect", disable=not progress, leave=False) as bar:
                for image_id, (scores, reason) in pool.map(work, todo):
                    bar.update()
                    if scores is None:
                        summary.failed[reason] += 1
                    pending.append(_row(image_id, scores, reason))
                    if len(pending) >= COMMIT_EVERY:
                        summary.inspected += _write(db, pending)
                        pending.clear()
            summary.inspected += _write(db, pending)
        except KeyboardInterrupt:
            summary.inspected += _write(db, pending)
            summary.interrupted = True
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        summary.seconds = time.monotonic() - started
        summary.flagged = flag_counts(db)
        counts.update(inspected=summary.inspected, already=summary.already, failed=dict(summary.failed),
                      flagged=dict(summary.flagged), interrupted=summary.interrupted)
    summary.listed = quality_report(db, flag=flag)
    return summary


def _has_flag(flag: str):
    # flags is a comma-separated list: match whole names ("dark" must not match inside another one).
    return (sa.literal(",") + image_quality.c.flags + sa.literal(",")).contains(f",{flag},")


def flag_counts(db: Database) -> Counter:
    """Images per flag, over every stored report."""
    with db.engine.connect() as conn:
        return Counter({f: conn.execute(sa.select(sa.func.count()).select_from(image_quality)
                                        .where(_has_flag(f))).scalar() for f in FLAGS})


def quality_report(db: Database, *, flag: str | None = None, offset: int = 0,
                   limit: int | None = None) -> QualityPage:
    """Stored reports of the images with ``flag`` (any flag when None), worst first, then by id."""
    check("inspect", flag=flag)
    where = _has_flag(flag) if flag else sa.and_(image_quality.c.flags.is_not(None), image_quality.c.flags != "")
    order = [_WORST_FIRST[flag]] if flag else []
    with db.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(image_quality).where(where)).scalar()
        query = (sa.select(image_quality, images.c.label, images.c.source, images.c.width, images.c.height)
                 .join(images, images.c.id == image_quality.c.image_id).where(where)
                 .order_by(*order, image_quality.c.image_id).offset(offset))
        found = conn.execute(query if limit is None else query.limit(limit)).all()
    rows = [QualityRow(image_id=r.image_id, label=r.label, source=r.source, width=r.width, height=r.height,
                       status=r.status, reason=r.reason, flags=r.flags.split(",") if r.flags else [],
                       scores={c: getattr(r, c) for c in SCORE_COLUMNS}) for r in found]
    return QualityPage(total=total, rows=rows)
