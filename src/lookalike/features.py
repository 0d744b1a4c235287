"""Featurize step: a CNN embedding for every loaded image that has none for the model.

Reads ``images`` (status 'ok') and the image store; writes ``feature_models``
(the backbone as a row: name, weights checksum, dimension, preprocessing) and
``embeddings`` (image, model, float32 unit vector). Commits every batch, so an
interrupted run keeps what it did and a re-run does only the rest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections import Counter

import sqlalchemy as sa

from .config import DEFAULT_BACKBONE
from .db import Database, embeddings, feature_models, images, now, recorded_run, vector_bytes
from .steps import check, default

if TYPE_CHECKING:
    from .backbones import Backbone   # imported where used: torch stays out of a by-id search

COMMIT_SECONDS = 2.0


@dataclass
class FeaturizeSummary:
    model: str
    embedded: int = 0
    already: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False
    projected: int = 0          # new vectors in the fitted similarity spaces (lookalike.spaces)

    def lines(self) -> list[str]:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        out = [f"featurize ({self.model}): {self.embedded} embedded ({rate:.1f} images/s), "
               f"{self.already} already had one, {sum(self.failed.values())} failed"]
        out += [f"  failed: {n:>5}  {reason}" for reason, n in self.failed.most_common()]
        if self.projected:
            out.append(f"  {self.projected} vectors projected into the fitted similarity spaces")
        if self.interrupted:
            out.append("interrupted: embeddings written so far are kept; run again to finish")
        return out


def feature_model_id(db: Database, backbone: Backbone) -> int:
    """The row for this backbone (name + weights checksum), created on first use."""
    info = backbone.info
    with db.begin() as conn:
        conn.execute(db.insert_ignore(feature_models).values(
            name=info.name, weights_sha256=info.weights_sha256, dim=info.dim, input_size=info.input_size,
            preprocessing=info.preprocessing, created_at=now()))
        return conn.execute(sa.select(feature_models.c.id).where(
            feature_models.c.name == info.name, feature_models.c.weights_sha256 == info.weights_sha256)).scalar_one()


def featurize_images(db: Database, *, backbone: str = DEFAULT_BACKBONE, device: str = default("featurize", "device"),
                     batch_size: int = default("featurize", "batch_size"),
                     progress: bool | None = None) -> FeaturizeSummary:
    """Embed every ok image that has no embedding for ``backbone`` yet."""
    check("featurize", batch_size=batch_size)
    if progress is None:
        progress = sys.stderr.isatty()
    from .backbones import embed_sources, load_backbone
    model = load_backbone(backbone, device=device)
    summary = FeaturizeSummary(model=backbone)
    with recorded_run(db, "featurize", {"backbone": backbone, "device": device, "batch_size": batch_size}) as counts:
        model_id = feature_model_id(db, model)
        with db.engine.connect() as conn:
            todo = conn.execute(unembedded(model_id)).all()
            summary.already = embedded_count(conn, model_id)
        sources = ((image_id, db.store.path(sha)) for image_id, sha in todo)
        started = time.monotonic()
        pending: list[dict] = []
        last_commit = time.monotonic()
        try:
            for image_id, vector, reason in embed_sources(model, sources, batch_size=batch_size, progress=progress):
                if vector is None:
                    summary.failed[reason] += 1
                    continue
                pending.append({"image_id": image_id, "model_id": model_id, "vector": vector_bytes(vector)})
                if len(pending) >= batch_size and time.monotonic() - last_commit > COMMIT_SECONDS:
                    summary.embedded += write_embeddings(db, pending)
                    pending, last_commit = [], time.monotonic()
            summary.embedded += write_embeddings(db, pending)
        except KeyboardInterrupt:
            summary.embedded += write_embeddings(db, pending)
            summary.interrupted = True
        if not summary.interrupted:   # new images join the fitted spaces, with the stored parameters
            from .spaces import project_fitted
            summary.projected = project_fitted(db, model_id)
        summary.seconds = time.monotonic() - started
        counts.update(embedded=summary.embedded, already=summary.already, failed=dict(summary.failed),
                      interrupted=summary.interrupted)
    return summary


def unembedded(model_id: int) -> sa.Select:
    """(id, sha256) of the ok images with no embedding for the model yet, by id: the step's and the Spark job's work."""
    done = sa.select(embeddings.c.image_id).where(embeddings.c.model_id == model_id)
    return (sa.select(images.c.id, images.c.sha256).where(images.c.status == "ok", images.c.id.not_in(done))
            .order_by(images.c.id))


def embedded_count(conn, model_id: int) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(embeddings)
                        .where(embeddings.c.model_id == model_id)).scalar()


def write_embeddings(db: Database, rows: list[dict]) -> int:
    """One transaction of ``embeddings`` rows (the step's and the Spark job's, :mod:`lookalike.spark.featurize`);
    a row already stored is kept (ON CONFLICT DO NOTHING), so a batch written twice is stored once. Triggers
    log the new rows for the vector index."""
    if rows:
        with db.begin() as conn:
            conn.execute(db.insert_ignore(embeddings), rows)
    return len(rows)
