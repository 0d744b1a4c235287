"""What is in a database: counts per label and status, where the data lives."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import sqlalchemy as sa

from .db import (Database, duplicates_by_label, embeddings, feature_models, hashed_images, image_sources, images,
                 latest_dedupe_run, runs, splits)


@dataclass(frozen=True)
class CollectionStatus:
    database: str                              # masked URL
    store: str
    by_label: list[tuple[str | None, str, int]]  # (label, status, images)
    fetch_failures: list[tuple[str, int]]        # (reason, sources) for sources with no bytes
    hashed: int = 0                              # ok images the hash step has finished
    embedded: list[tuple[str, int]] = ()         # (feature model, images with an embedding)
    split: list[tuple[str, int]] = ()            # (train | test, images)
    last_runs: list[tuple[str, str, str, float]] = ()  # (step, outcome, started, seconds), latest per step
    duplicates: dict[str, int] = field(default_factory=dict)  # label ("" none) -> ok images the dedupe left out
    dedupe_run: int | None = None                # the dedupe run that decides duplicates (None before any)

    def lines(self) -> list[str]:
        out = [f"database: {self.database}", f"store:    {self.store}"]
        if not self.by_label:
            out.append("no images loaded yet")
        totals: dict[str, int] = {}
        labels = sorted({label or "" for label, _, _ in self.by_label})
        # unique: the ok images the latest dedupe run keeps; duplicates: the ok images it leaves out.
        row = "{:<20} {:>8} {:>8} {:>8} {:>11}".format
        if labels:
            out.append(row("label", "ok", "failed", "unique", "duplicates"))
        for label in labels:
            counts = {status: n for lab, status, n in self.by_label if (lab or "") == label}
            lost = self.duplicates.get(label, 0)
            out.append(row(label or "(none)", counts.get("ok", 0), counts.get("failed", 0),
                           counts.get("ok", 0) - lost, lost))
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        if labels:
            lost = sum(self.duplicates.values())
            out.append(row("total", totals.get("ok", 0), totals.get("failed", 0), totals.get("ok", 0) - lost, lost))
            out.append(f"duplicates: left out by dedupe run {self.dedupe_run}, the latest" if self.dedupe_run
                       else "duplicates: none (no dedupe run yet)")
        for reason, n in self.fetch_failures:
            out.append(f"not fetched: {n:>5}  {reason}")
        if self.by_label:
            ok = totals.get("ok", 0)
            out.append(f"hashed:   {self.hashed} of {ok} ok images")
            out += [f"embedded: {n} of {ok} ok images ({model})" for model, n in self.embedded] or ["embedded: none"]
            out.append("split:    " + (", ".join(f"{n} {part}" for part, n in self.split) or "none"))
        if self.last_runs:
            out.append("last run of each step:")
            out += [f"  {step:<10} {outcome:<12} {started}  {seconds:.1f} s"
                    for step, outcome, started, seconds in self.last_runs]
        return out


def collection_status(db: Database) -> CollectionStatus:
    with db.engine.connect() as conn:
        by_label = conn.execute(
            sa.select(images.c.label, images.c.status, sa.func.count())
            .group_by(images.c.label, images.c.status).order_by(images.c.label, images.c.status)
        ).all()
        reasons = conn.execute(sa.select(image_sources.c.reason).where(image_sources.c.image_id.is_(None))).scalars()
        # A manifest line's reason starts "line N: "; the count is per reason, whatever the line.
        failures = Counter(re.sub(r"^line \d+: ", "", reason or "") for reason in reasons).most_common()
        hashed = conn.execute(sa.select(sa.func.count()).select_from(hashed_images)
                              .join(images, images.c.id == hashed_images.c.image_id)
                              .where(images.c.status == "ok")).scalar()
        embedded = conn.execute(sa.select(feature_models.c.name, sa.func.count())
                                .join(embeddings, embeddings.c.model_id == feature_models.c.id)
                                .group_by(feature_models.c.id, feature_models.c.name)
                                .order_by(feature_models.c.id)).all()
        split = conn.execute(sa.select(splits.c.split, sa.func.count()).group_by(splits.c.split)
                             .order_by(splits.c.split.desc())).all()
        latest = sa.select(sa.func.max(runs.c.id)).group_by(runs.c.step)
        last_runs = conn.execute(sa.select(runs.c.step, runs.c.outcome, runs.c.started_at, runs.c.seconds)
                                 .where(runs.c.id.in_(latest)).order_by(runs.c.id)).all()
        duplicates = duplicates_by_label(conn)
        dedupe_run = conn.execute(sa.select(latest_dedupe_run())).scalar()
    return CollectionStatus(db.masked_url, str(db.store.root),
                            [tuple(r) for r in by_label], [tuple(r) for r in failures], hashed,
                            [tuple(r) for r in embedded], [tuple(r) for r in split],
                            [(step, outcome, f"{started:%Y-%m-%d %H:%M:%S}", seconds)
                             for step, outcome, started, seconds in last_runs], duplicates, dedupe_run)
