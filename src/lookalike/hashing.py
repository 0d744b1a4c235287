"""Hash step: perceptual hashes (:mod:`lookalike.phash`) of every loaded image, stored.

Reads ``images`` and the image store; writes ``image_hashes`` (one row per
image, kind and size) and ``hashed_images`` (the image is done, with its
low-detail flag). The maths lives in :mod:`lookalike.phash`, which imports no
database.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from tqdm import tqdm

from .db import Database, hashed_images, image_hashes, images, now, recorded_run
from .images import ImageError, open_image
from .phash import (DRAFT_HASHER_VERSION, DRAFT_SIZE, HASHER_VERSION, KINDS, check_sizes, compute_hashes,
                    is_low_detail)
from .workpool import FULL_DECODERS, cores

# KINDS: the choices of the step's hash-kind parameters; the hasher versions: what rows record.
__all__ = ["KINDS", "HASHER_VERSION", "DRAFT_HASHER_VERSION", "HashSummary", "hash_images", "hash_one", "hash_records", "hashed_count",
           "unhashed", "write_hashes"]

COMMIT_EVERY = 200   # images per transaction: an interrupted run keeps what it finished


@dataclass
class HashSummary:
    hashed: int = 0
    already: int = 0
    low_detail: int = 0
    failed: Counter = field(default_factory=Counter)   # reason -> images
    seconds: float = 0.0
    interrupted: bool = False

    def lines(self) -> list[str]:
        rate = self.hashed / self.seconds if self.seconds > 0 else 0.0
        out = [f"hash: {self.hashed} hashed ({rate:.1f} images/s), {self.already} already hashed, "
               f"{self.low_detail} low-detail, {sum(self.failed.values())} failed"]
        out += [f"  failed: {n:>5}  {reason}" for reason, n in self.failed.most_common()]
        if self.interrupted:
            out.append("interrupted: hashes written so far are kept; run again to finish")
        return out


def hash_one(source, dhash_sizes, imagehash_sizes, draft):
    """(hashes, low-detail flag, None) for the image at path ``source`` (or its bytes), or (None, None, reason):
    the step's and the Spark job's per-image work (:mod:`lookalike.spark.hash`)."""
    if isinstance(source, Path) and not source.exists():   # one reason for all such images, not one per path
        return None, None, "missing from the image store"
    try:
        img = open_image(source, draft=draft)
    except ImageError as exc:
        return None, None, str(exc)
    return compute_hashes(img, dhash_sizes=dhash_sizes, imagehash_sizes=imagehash_sizes), is_low_detail(img), None


def unhashed() -> sa.Select:
    """(id, sha256) of the ok images not hashed yet, by id: the step's and the Spark job's work."""
    return (sa.select(images.c.id, images.c.sha256)
            .where(images.c.status == "ok", images.c.id.not_in(sa.select(hashed_images.c.image_id)))
            .order_by(images.c.id))


def hashed_count(conn) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(hashed_images)).scalar()


def hash_records(image_id, hashes, hasher) -> list[dict]:
    """The ``image_hashes`` rows of one image's hashes."""
    return [dict(image_id=image_id, kind=h.kind, size=h.size, hex=h.hex, value=h.to_signed64(), bits=h.bits,
                 hasher=hasher) for h in hashes]


def write_hashes(db: Database, hash_rows: list[dict], done_rows: list[dict]) -> None:
    """One transaction of ``image_hashes`` and ``hashed_images`` rows; rows already stored are kept as they
    are (ON CONFLICT DO NOTHING), so a batch written twice, or by two runs, is stored once."""
    if done_rows:
        with db.begin() as conn:
            if hash_rows:
                conn.execute(db.insert_ignore(image_hashes), hash_rows)
            conn.execute(db.insert_ignore(hashed_images), done_rows)


def hash_images(db: Database, *, imagehash_sizes: Iterable[int] = (8,), draft: bool = False,
                workers: int | None = None, progress: bool | None = None) -> HashSummary:
    """Store dHash 1..8 and a/d/p/wHash at ``imagehash_sizes`` for every ok image not hashed yet.

    Reads ``images`` and the store; writes ``image_hashes`` (one row per image,
    kind and size) and ``hashed_images`` (the image is done, its low-detail
    flag). ``draft=True`` decodes JPEGs at reduced scale: faster, but its
    hashes differ from the reference packages' and are marked as such.
    """
    dsizes, isizes = check_sizes(range(1, 9), imagehash_sizes)
    hasher = DRAFT_HASHER_VERSION if draft else HASHER_VERSION
    if progress is None:
        progress = sys.stderr.isatty()
    summary = HashSummary()
    params = {"imagehash_sizes": isizes, "draft": draft, "hasher": hasher}
    with recorded_run(db, "hash", params) as counts:
        with db.engine.connect() as conn:
            todo = conn.execute(unhashed()).all()
            summary.already = hashed_count(conn)
        started = time.monotonic()
        hash_rows: list[dict] = []
        done_rows: list[dict] = []

        def flush():
            if done_rows:
                write_hashes(db, hash_rows, done_rows)
                summary.hashed += len(done_rows)
                hash_rows.clear()
                done_rows.clear()

        def work(row):
            return row[0], hash_one(db.store.path(row[1]), dsizes, isizes, DRAFT_SIZE if draft else None)

        # Decoding and resizing release the GIL: one thread per core, at most FULL_DECODERS (memory).
        pool = ThreadPoolExecutor(workers or cores(at_most=FULL_DECODERS))
        try:
            with tqdm(total=len(todo), unit="img", desc="hash", disable=not progress, leave=False) as bar:
                for image_id, (hashes, low, reason) in pool.map(work, todo):
                    bar.update()
                    if hashes is None:
                        summary.failed[reason] += 1
                        continue
                    hash_rows.extend(hash_records(image_id, hashes, hasher))
                    done_rows.append(dict(image_id=image_id, low_detail=low, hasher=hasher, hashed_at=now()))
                    summary.low_detail += bool(low)
                    if len(done_rows) >= COMMIT_EVERY:
                        flush()
            flush()
        except KeyboardInterrupt:
            flush()
            summary.interrupted = True
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        summary.seconds = time.monotonic() - started
        counts.update(hashed=summary.hashed, already=summary.already, low_detail=summary.low_detail,
                      failed=dict(summary.failed), interrupted=summary.interrupted)
    return summary
