"""The read queries more than one step or front end shares: one definition each.

What counts as a unique image (the latest dedupe run decides), a dedupe run's
groups, the stored embeddings per model, the classifier scores that go with
them, the newest evaluation. Each takes an
open connection (or builds a clause to put in another query) and returns rows.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from ..config import DEFAULT_BACKBONE
from ..errors import BadInput, Precondition
from .records import vector_from_bytes

from .schema import (dedupe_runs, duplicate_groups, embeddings, evaluation_results, evaluations, feature_models, images,
                     models, scores)


def latest_feature_model(conn: Connection, name: str = DEFAULT_BACKBONE) -> int:
    """The id of the newest feature model with this name; a clear error when none was featurized."""
    model_id = conn.execute(sa.select(sa.func.max(feature_models.c.id)).where(feature_models.c.name == name)).scalar()
    if model_id is None:
        from ..backbones import available_backbones   # lazy, and only here: the backbones import torch
        if name not in available_backbones():   # a typo, not a missing step
            raise BadInput(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
        raise Precondition(f"no embeddings for model {name!r}: run `lookalike featurize` first")
    return model_id


IDS_PER_QUERY = 5_000   # ids in one IN list: SQLite takes at most 32,766 bound values in a statement


def load_embeddings(conn: Connection, model_id: int, image_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of stored embeddings for ``model_id`` (only those of ``image_ids`` when given), by image id."""
    query = sa.select(embeddings.c.image_id, embeddings.c.vector).where(embeddings.c.model_id == model_id)
    if image_ids is None:
        rows = conn.execute(query.order_by(embeddings.c.image_id)).all()
    else:
        wanted = sorted({int(i) for i in image_ids})
        rows = [row for start in range(0, len(wanted), IDS_PER_QUERY)
                for row in conn.execute(query.where(embeddings.c.image_id.in_(wanted[start:start + IDS_PER_QUERY]))
                                        .order_by(embeddings.c.image_id))]
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    matrix = np.stack([vector_from_bytes(r[1]) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    return ids, matrix


def latest_dedupe_run() -> sa.ScalarSelect:
    """Id of the dedupe run whose groups decide what is a duplicate: the latest (NULL before any)."""
    return sa.select(sa.func.max(dedupe_runs.c.id)).scalar_subquery()


def non_keepers() -> sa.Select:
    """Ids of the images the latest dedupe run marked as duplicates (none before any dedupe)."""
    return sa.select(duplicate_groups.c.image_id).where(
        duplicate_groups.c.run_id == latest_dedupe_run(), duplicate_groups.c.is_keeper == sa.false())


def is_unique_image() -> sa.ColumnElement[bool]:
    """A WHERE condition on ``images``: status ok and not a duplicate in the latest dedupe run."""
    return sa.and_(images.c.status == "ok", images.c.id.not_in(non_keepers()))


def unique_image_ids(conn: Connection) -> list[int]:
    """Ids of the unique images (ok, not a non-keeper of the latest dedupe run), ascending."""
    return list(conn.execute(sa.select(images.c.id).where(is_unique_image()).order_by(images.c.id)).scalars())


def duplicates_by_label(conn: Connection) -> dict[str, int]:
    """Ok images each label lost to the latest dedupe run (non-keepers), by label; "" is no label."""
    rows = conn.execute(sa.select(images.c.label, sa.func.count()).where(
        images.c.status == "ok", images.c.id.in_(non_keepers())).group_by(images.c.label)).all()
    out: dict[str, int] = defaultdict(int)
    for label, n in rows:
        out[label or ""] += n
    return dict(sorted(out.items()))


def dedupe_run_rows(conn: Connection) -> list[Row]:
    """Every dedupe run, newest first."""
    return conn.execute(sa.select(dedupe_runs).order_by(dedupe_runs.c.id.desc())).all()


def group_member_rows(conn: Connection, run_id: int) -> list[Row]:
    """The members of a dedupe run's groups with their images' columns: by group, keeper first, then by distance."""
    return conn.execute(
        sa.select(duplicate_groups.c.group_id, duplicate_groups.c.is_keeper, duplicate_groups.c.distance,
                  duplicate_groups.c.score, duplicate_groups.c.verified_by, images.c.id, images.c.label, images.c.width, images.c.height, images.c.byte_size,
                  images.c.format, images.c.sha256, images.c.source)
        .join(images, images.c.id == duplicate_groups.c.image_id)
        .where(duplicate_groups.c.run_id == run_id)
        .order_by(duplicate_groups.c.group_id, duplicate_groups.c.is_keeper.desc(),
                  duplicate_groups.c.distance, images.c.id)).all()


def embedding_counts(conn: Connection) -> list[tuple[str, int, int]]:
    """(model name, dimension, embeddings stored) per feature model, models without any included."""
    return [tuple(r) for r in conn.execute(
        sa.select(feature_models.c.name, feature_models.c.dim, sa.func.count(embeddings.c.image_id))
        .select_from(feature_models.outerjoin(embeddings, embeddings.c.model_id == feature_models.c.id))
        .group_by(feature_models.c.id, feature_models.c.name, feature_models.c.dim)
        .order_by(feature_models.c.id))]


def latest_evaluation(conn: Connection) -> tuple[Row, list[Row]] | None:
    """The newest evaluation (id, created_at) and its result rows (space, metric, measure, value)."""
    latest = conn.execute(sa.select(evaluations.c.id, evaluations.c.created_at)
                          .order_by(evaluations.c.id.desc()).limit(1)).first()
    if latest is None:
        return None
    rows = conn.execute(sa.select(evaluation_results.c.space, evaluation_results.c.metric,
                                  evaluation_results.c.measure, evaluation_results.c.value)
                        .where(evaluation_results.c.evaluation_id == latest.id)).all()
    return latest, rows


def latest_classifier_scores(conn: Connection, feature_model_id: int) -> tuple[int | None, dict[int, bytes]]:
    """The newest classifier trained on this feature model's embeddings, and its stored score vectors by image
    id (raw bytes: ``vector_from_bytes`` reads one); ``(None, {})`` when none was trained."""
    model_id = conn.execute(sa.select(sa.func.max(models.c.id))
                            .where(models.c.feature_model_id == feature_model_id)).scalar()
    if model_id is None:
        return None, {}
    return model_id, dict(conn.execute(sa.select(scores.c.image_id, scores.c.vector)
                                       .where(scores.c.model_id == model_id)).all())
