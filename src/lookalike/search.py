"""Rank and query steps: the top-K most similar stored images for a query.

Spaces: ``embeddings`` (the CNN vectors), ``scores`` (the classifier's class
probabilities, what the original solution ranked in), and the spaces fitted on
the collection, ``pca`` and ``learned`` (:mod:`lookalike.spaces`). ``auto``,
the default, is the space the evaluate step measured best. Distances are cosine
distances; similarity = 1 − distance; ties (:data:`lookalike.answers.TIE_DECIMALS`) are listed by image id.

- :func:`similar_images` — one query: a stored image id, a path, a URL or bytes.
- :func:`add_queries` / :func:`rank_queries` — the batch form: ``query_images``
  in, ``ranking_results`` out, as in the original's stored procedure.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa

from .config import DEFAULT_BACKBONE
from .db import (Database, images, latest_classifier_scores, latest_feature_model,
                 non_keepers, now, query_images, ranking_results, recorded_run, scores, vector_from_bytes)
from .answers import BUILT_IN, Match, ranked
from .errors import BadInput, NotFound, Precondition
from .index import IndexUnavailable, generation, open_index
from .projection import FITTED, Space, fitted_id, load_space
from .spaces import resolve_space
from .steps import check, default
from .store import sha256_hex
from .vectors import build_index

if TYPE_CHECKING:
    from .net import FetchLimits

SPACES = BUILT_IN + FITTED
log = logging.getLogger(__name__)


class Collection:
    """What one space offers to search: the persistent index of the embeddings or of a fitted space (images
    featurized since the fit are projected with its stored parameters), or in memory the class scores.

    Labels and sources are read from the database for the results only, never for the whole collection.
    """

    def __init__(self, db: Database, space: str = "embeddings", backbone: str = DEFAULT_BACKBONE,
                 index: str = "auto"):
        if space not in SPACES:
            raise BadInput(f"space must be one of {SPACES}, not {space!r}")
        self.db, self.space, self.backbone = db, space, backbone
        self.fitted: Space | None = None
        with db.engine.connect() as conn:
            self.feature_model_id = latest_feature_model(conn, backbone)
            self.classifier_id = None
            if space == "scores":
                self.classifier_id, ids, matrix = _load_scores(conn, self.feature_model_id)
            elif space in FITTED:
                self.fitted = load_space(conn, space, self.feature_model_id)
                if self.fitted is None:
                    raise Precondition(f"no {space} space fitted on {backbone} embeddings: run `lookalike fit`")
            self.version = _version(conn, space, self.feature_model_id, self.classifier_id)
        if space == "scores":
            self.index = build_index(ids, _unit(matrix), kind="exact")   # a few class columns: exact is instant
        else:
            try:
                self.index = open_index(db, self.feature_model_id, index, space=self.fitted)
            except IndexUnavailable as exc:   # a read-only folder: this process indexes in a private one
                log.warning("%s; indexing in a temporary folder instead", exc)
                self.index = open_index(db, self.feature_model_id, index, private=True, space=self.fitted)
        if len(self.index) == 0:
            needs = "featurize and train" if space == "scores" else "featurize"
            raise Precondition(f"no stored {space} to search: run {needs}")

    @property
    def ids(self) -> np.ndarray:
        return self.index.ids

    def has(self, image_id: int) -> bool:
        return bool(self.index.rows_of([image_id])[0] >= 0)

    def labels(self, image_ids) -> dict[int, tuple[str | None, str]]:
        """(label, source) of each stored image among ``image_ids``."""
        wanted = [int(i) for i in image_ids]
        with self.db.engine.connect() as conn:
            return {row.id: (row.label, row.source) for row in conn.execute(
                sa.select(images.c.id, images.c.label, images.c.source).where(images.c.id.in_(wanted)))}

    def search(self, vector: np.ndarray, k: int, exclude: set[int] = frozenset(),
               label: str | None = None, exclude_duplicates: bool = False) -> list[Match]:
        """The k nearest stored images; with ``label``, the k nearest of that label (still k when there are);
        ``exclude_duplicates``: none of the latest dedupe run's non-keepers (still k)."""
        if exclude_duplicates:
            with self.db.engine.connect() as conn:
                exclude = set(exclude) | set(conn.execute(non_keepers()).scalars())
        allowed = None
        if label is not None:
            with self.db.engine.connect() as conn:
                allowed = np.array(conn.execute(sa.select(images.c.id).where(images.c.label == label)).scalars()
                                   .all(), dtype=np.int64)
            allowed = allowed[self.index.rows_of(allowed) >= 0]
            if not len(allowed):
                raise NotFound(f"no searchable image has label {label!r}")
        if self.space != "scores":
            found_ids, distances = self.index.search(vector, k, exclude=exclude, allowed=allowed)
        else:
            found, dists = self.index.search(_unit(vector.reshape(1, -1)), k, exclude=[exclude], allowed=allowed)
            found_ids, distances = found[0][found[0] >= 0], dists[0][found[0] >= 0]
        return ranked(found_ids, distances, self.labels(found_ids), self.space)

    def stored_vector(self, image_id: int) -> np.ndarray:
        if self.space != "scores":
            vector = self.index.vector(image_id)
        else:
            row = self.index.rows_of([image_id])[0]
            vector = None if row < 0 else self.index.vectors[row]
        if vector is None:
            raise NotFound(f"image {image_id} has no stored {self.space} vector")
        return vector


_cache: dict[tuple, Collection] = {}
_cache_lock = threading.Lock()


def collection(db: Database, space: str = "embeddings", backbone: str = DEFAULT_BACKBONE,
               index: str = "auto") -> Collection:
    """A cached :class:`Collection`, opened again only when the stored vectors changed.

    ``index``: "exact", "ivf" (FAISS, approximate) or "auto" (IVF from 200,000 vectors). For the
    embeddings the check is one row (the generation counter) and the index catches up incrementally.
    """
    with db.engine.connect() as conn:   # auto: the space evaluate recorded as best (one settings row)
        space = resolve_space(conn, space, latest_feature_model(conn, backbone))
    key = (db.masked_url, str(db.store.root), space, backbone, index)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            with db.engine.connect() as conn:
                if _version(conn, space, cached.feature_model_id, cached.classifier_id) == cached.version:
                    return cached
        fresh = Collection(db, space, backbone, index)
        _cache[key] = fresh
        return fresh


def _version(conn, space: str, feature_model_id: int, classifier_id: int | None) -> tuple:
    if space == "embeddings":   # O(1): the counter the triggers on embeddings bump
        return (space, feature_model_id, generation(conn, feature_model_id)[0])
    if space in FITTED:         # a refit is a new row; a new embedding bumps the counter
        return (space, fitted_id(conn, space, feature_model_id), generation(conn, feature_model_id)[0])
    count, top = conn.execute(sa.select(sa.func.count(), sa.func.max(scores.c.image_id))
                              .where(scores.c.model_id == classifier_id)).one()
    return (space, feature_model_id, classifier_id, count, top)


def _load_scores(conn, feature_model_id: int):
    model_id, stored = latest_classifier_scores(conn, feature_model_id)
    if model_id is None:
        raise Precondition("no trained classifier: run `lookalike train` first (or use --space embeddings)")
    ids = np.array(sorted(stored), dtype=np.int64)
    matrix = np.stack([vector_from_bytes(stored[i]) for i in ids.tolist()]) if stored else np.zeros((0, 0), np.float32)
    return model_id, ids, matrix


def _unit(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- one query

def query_bytes(query: str | Path | bytes, limits: FetchLimits | None = None, *, allow_private: bool = True) -> bytes:
    """The bytes of a query image given as bytes, a path or a URL (through :func:`lookalike.net.fetch_one`)."""
    if isinstance(query, bytes):
        return query
    from .net import FetchError, FetchLimits, fetch_one   # lazy: a by-id search imports no HTTP client
    limits = limits or FetchLimits()
    try:
        # abspath, not resolve: no file-system call, so a name the locale cannot encode still reaches fetch
        return fetch_one(os.path.abspath(os.path.expanduser(query)) if "://" not in str(query) else str(query),
                         limits, allow_private=allow_private)
    except FetchError as exc:
        raise type(exc)(f"cannot read query image: {exc.reason}") from None


def query_vector(db: Database, coll: Collection, data: bytes) -> tuple[np.ndarray, int | None]:
    """The query's vector in ``coll``'s space, and its stored id if these bytes are in the collection."""
    with db.engine.connect() as conn:
        stored_id = conn.execute(sa.select(images.c.id).where(images.c.sha256 == sha256_hex(data))).scalar()
    if stored_id is not None and coll.has(stored_id):
        return coll.stored_vector(stored_id), stored_id
    from .backbones import load_backbone   # lazy: torch only for a query that is not stored
    from .images import QUERY_MAX_PIXELS, open_image
    # Within the query budget: a query is anyone's upload. ImageError says why it can't be used.
    embedding = load_backbone(coll.backbone).embed([open_image(data, max_pixels=QUERY_MAX_PIXELS)])
    if coll.space == "embeddings":
        return embedding[0], None
    if coll.fitted is not None:
        return coll.fitted.project(embedding)[0], None
    from .classify import load_classifier  # lazy: scikit-learn only for a query in scores space
    estimator, _classes, _row = load_classifier(db, coll.classifier_id)
    return estimator.predict_proba(embedding)[0].astype(np.float32), None


def similar_images(db: Database, query: int | str | Path | bytes, *, k: int = default("similar", "k"),
                   space: str = default("similar", "space"), backbone: str = DEFAULT_BACKBONE,
                   limits: FetchLimits | None = None, index: str = default("similar", "index"),
                   label: str | None = None, exclude_duplicates: bool = default("similar", "exclude_duplicates"),
                   allow_private: bool = True) -> list[Match]:
    """The ``k`` stored images most similar to ``query`` (an image id, a path, a URL or bytes), best first.

    ``label`` keeps only images with that label (``k`` of them when there are); ``exclude_duplicates``
    hides the non-keepers of the latest dedupe run (still ``k``).
    ``allow_private=False`` refuses URLs to loopback and private addresses (a server's callers).

    The query itself is never among the results when it is a stored image.
    """
    check("similar", k=k)
    by_id = isinstance(query, int) or (isinstance(query, str) and query.isdigit())
    # Read first: a refused or unreadable query fails before any vectors are loaded.
    data = None if by_id else query_bytes(query, limits, allow_private=allow_private)
    coll = collection(db, space, backbone, index)
    if by_id:
        image_id = int(query)
        return coll.search(coll.stored_vector(image_id), k, exclude={image_id}, label=label,
                           exclude_duplicates=exclude_duplicates)
    vector, stored_id = query_vector(db, coll, data)
    return coll.search(vector, k, exclude={stored_id} if stored_id is not None else set(), label=label,
                       exclude_duplicates=exclude_duplicates)


# ---------------------------------------------------------------- batch: query_images -> ranking_results

def add_queries(db: Database, queries: list[str], *, limits: FetchLimits | None = None) -> list[int]:
    """Put images (ids, paths or URLs) into ``query_images``; returns their query ids.

    The bytes go to the image store, so ranking never fetches again.
    """
    added = []
    for query in queries:
        if str(query).isdigit():
            with db.engine.connect() as conn:
                row = conn.execute(sa.select(images.c.id, images.c.sha256).where(images.c.id == int(query))).first()
            if row is None:
                raise NotFound(f"no image with id {query}")
            source, sha, image_id = f"image:{row.id}", row.sha256, row.id
        else:
            data = query_bytes(query, limits)
            from .images import open_image   # lazy, like the decoder itself: a by-id search needs neither
            open_image(data)  # refuse what cannot be decoded now, not at rank time
            sha = db.store.put(data)
            source = str(query)
            with db.engine.connect() as conn:
                image_id = conn.execute(sa.select(images.c.id).where(images.c.sha256 == sha)).scalar()
        with db.begin() as conn:
            conn.execute(db.insert_ignore(query_images).values(source=source, sha256=sha, image_id=image_id,
                                                               added_at=now()))
            added.append(conn.execute(sa.select(query_images.c.id).where(query_images.c.sha256 == sha)).scalar_one())
    return added


@dataclass(frozen=True)
class RankSummary:
    queries: int
    rows: int
    space: str
    top: int

    def lines(self) -> list[str]:
        return [f"rank: top {self.top} in {self.space} space for {self.queries} queries → "
                f"{self.rows} rows in ranking_results"]


def rank_queries(db: Database, *, top: int = default("rank", "top"), space: str = default("rank", "space"),
                 backbone: str = DEFAULT_BACKBONE) -> RankSummary:
    """Write the top ``top`` matches of every query in ``query_images`` to ``ranking_results``."""
    check("rank", top=top)
    with recorded_run(db, "rank", {"top": top, "space": space, "backbone": backbone}) as counts:
        coll = collection(db, space, backbone)
        space = coll.space   # auto resolved: results are stored under the space that answered
        counts.update(space=space)
        with db.engine.connect() as conn:
            queries = conn.execute(sa.select(query_images.c.id, query_images.c.sha256, query_images.c.image_id)
                                   .order_by(query_images.c.id)).all()
        rows = []
        for query_id, sha, image_id in queries:
            if image_id is not None and coll.has(image_id):
                vector, stored_id = coll.stored_vector(image_id), image_id
            else:
                vector, stored_id = query_vector(db, coll, db.store.get(sha))
            exclude = {stored_id} if stored_id is not None else set()
            rows += [{"query_id": query_id, "space": space, "rank": m.rank, "image_id": m.image_id,
                      "distance": m.distance} for m in coll.search(vector, top, exclude)]
        with db.begin() as conn:  # replace this space's results in one transaction
            conn.execute(sa.delete(ranking_results).where(ranking_results.c.space == space))
            if rows:
                conn.execute(sa.insert(ranking_results), rows)
        counts.update(queries=len(queries), rows=len(rows))
    return RankSummary(len(queries), len(rows), space, top)


def image_sha256(db: Database, image_id: int) -> str:
    """The sha256 (store key) of a stored image."""
    with db.engine.connect() as conn:
        sha = conn.execute(sa.select(images.c.sha256).where(images.c.id == image_id)).scalar()
    if sha is None:
        raise NotFound(f"no image with id {image_id}")
    return sha
