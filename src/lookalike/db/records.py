"""What steps write besides their own tables: the run record, timestamps, JSON and vectors as stored."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import sqlalchemy as sa

from .connection import Database
from .schema import image_sources, images, runs


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_json(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else None


def vector_bytes(vector) -> bytes:
    """A vector as stored: float32 little-endian bytes."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes):
    return np.frombuffer(data, dtype="<f4")


def committed_since(db: Database, since: datetime) -> str:
    """What a load committed from ``since`` on, for an error that stops it half-way."""
    with db.engine.connect() as conn:
        new = conn.execute(sa.select(sa.func.count()).where(images.c.loaded_at >= since)).scalar()
        sources = conn.execute(sa.select(sa.func.count()).where(image_sources.c.loaded_at >= since)).scalar()
    return f"{new} new images and {sources} sources committed by this load before it stopped"


@contextmanager
def recorded_run(db: Database, step: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Time a step and write its summary row to ``runs``; the caller fills the yielded counts dict.

    The row is written whether the step succeeds, fails or is interrupted, in its own
    transaction, so a failed step leaves its audit trail without keeping its half work.
    """
    counts: dict[str, Any] = {}
    started, clock = now(), time.monotonic()
    outcome, error = "ok", None
    try:
        yield counts
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except BaseException as exc:
        outcome, error = "failed", f"{type(exc).__name__}: {exc}"[:2000]
        raise
    finally:
        if outcome == "ok" and counts.get("interrupted"):   # a step that caught Ctrl-C and kept its work
            outcome = "interrupted"
        with db.begin() as conn:
            conn.execute(sa.insert(runs).values(
                step=step, params=json.dumps(params or {}, sort_keys=True, default=str),
                counts=json.dumps(counts, sort_keys=True, default=str), outcome=outcome, error=error,
                started_at=started, seconds=time.monotonic() - clock))
