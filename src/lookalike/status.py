"""What is in a database: counts per label and status, where the data lives."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from .db import Database, image_sources, images


@dataclass(frozen=True)
class CollectionStatus:
    database: str                              # masked URL
    store: str
    by_label: list[tuple[str | None, str, int]]  # (label, status, images)
    fetch_failures: list[tuple[str, int]]        # (reason, sources) for sources with no bytes

    def lines(self) -> list[str]:
        out = [f"database: {self.database}", f"store:    {self.store}"]
        if not self.by_label:
            out.append("no images loaded yet")
        totals: dict[str, int] = {}
        labels = sorted({label or "" for label, _, _ in self.by_label})
        if labels:
            out.append(f"{'label':<20} {'ok':>8} {'failed':>8}")
        for label in labels:
            counts = {status: n for lab, status, n in self.by_label if (lab or "") == label}
            out.append(f"{label or '(none)':<20} {counts.get('ok', 0):>8} {counts.get('failed', 0):>8}")
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        if labels:
            out.append(f"{'total':<20} {totals.get('ok', 0):>8} {totals.get('failed', 0):>8}")
        for reason, n in self.fetch_failures:
            out.append(f"not fetched: {n:>5}  {reason}")
        return out


def collection_status(db: Database) -> CollectionStatus:
    with db.engine.connect() as conn:
        by_label = conn.execute(
            sa.select(images.c.label, images.c.status, sa.func.count())
            .group_by(images.c.label, images.c.status).order_by(images.c.label, images.c.status)
        ).all()
        failures = conn.execute(
            sa.select(image_sources.c.reason, sa.func.count())
            .where(image_sources.c.image_id.is_(None))
            .group_by(image_sources.c.reason).order_by(sa.func.count().desc())
        ).all()
    return CollectionStatus(db.masked_url, str(db.store.root),
                            [tuple(r) for r in by_label], [tuple(r) for r in failures])
