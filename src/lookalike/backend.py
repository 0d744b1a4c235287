"""What a PostgreSQL backend imports on its first lookalike call: no database driver.

``similar_images`` by a stored image's id is answered here, from the index folder
(:func:`lookalike.quick.by_id`) and a few reads through the server's own SPI
(``plpy``): a fresh session imports NumPy (and faiss, for an IVF folder) but
neither SQLAlchemy nor psycopg, which took most of a fresh session's second.
Everything else goes to :mod:`lookalike.plpython`, which reaches the database
again over the unix socket as the CLI's steps do: the procedures, a query by
path or URL, and a query by id whenever the folder cannot answer as it stands
(missing, torn or behind the database, the scores space, parameters to refuse,
a transaction that wrote). That path catches the folder up and answers the
same rows, as tests/test_plpython.py checks.
"""

from __future__ import annotations

import json
from typing import Any

from .answers import DEFAULT_KEY, Match
from .config import DEFAULT_BACKBONE, PG_SCHEMA
from .errors import BadInput
from .quick import HOLDS_MORE_THAN_READS, Stored, by_id, newest_rows
from .steps import default, routine

# The model, its embeddings' generation, this database's id, the recorded default space and the fitted spaces:
# one round trip.
_STATE = f"""
WITH model AS (SELECT id, weights_sha256 FROM {PG_SCHEMA}.feature_models WHERE name = $1 ORDER BY id DESC LIMIT 1)
SELECT model.id AS model_id, model.weights_sha256,
       (SELECT generation FROM {PG_SCHEMA}.embedding_generations WHERE model_id = model.id) AS generation,
       (SELECT value FROM {PG_SCHEMA}.settings WHERE key = 'database_id') AS database_id,
       (SELECT value FROM {PG_SCHEMA}.settings WHERE key = $2) AS recorded,
       (SELECT json_agg(json_build_object('name', name, 'id', id, 'checksum', checksum))
          FROM {PG_SCHEMA}.similarity_spaces WHERE feature_model_id = model.id) AS spaces
FROM model"""
_LABELS = f"SELECT id, label, source FROM {PG_SCHEMA}.images WHERE id = ANY($1)"
_PARAMS = f"SELECT params FROM {PG_SCHEMA}.similarity_spaces WHERE id = $1"


def call(plpy, routine_name: str, store: str, **params: Any) -> Exception | None:
    """A procedure: :func:`lookalike.plpython.call`."""
    from . import plpython
    return plpython.call(plpy, routine_name, store, **params)


def similar(plpy, store: str, query: int | str | None, k: int | None) -> tuple[list[tuple], Exception | None]:
    """Rows of ``similar_images`` (rank, image_id, label, distance, similarity, source), or the error to raise."""
    matches = _from_folder(plpy, store, query, k) if isinstance(query, int) and not isinstance(query, bool) else None
    if matches is None:
        from . import plpython
        matches, failure = plpython.similar(plpy, store, query, k)
        if failure is not None:
            return [], failure
    # Which space answered: the default evaluate chose, or where none, pca or the embeddings.
    if matches:
        plpy.notice(f"lookalike.similar_images: {len(matches)} results in the {matches[0].space} space")
    return [(m.rank, m.image_id, m.label, m.distance, m.similarity, m.source) for m in matches], None


def _from_folder(plpy, store: str, image_id: int, k: int | None) -> list[Match] | None:
    """The matches from the index folder as it stands (:func:`lookalike.quick.by_id`), or None where
    :mod:`lookalike.plpython` must answer."""
    try:
        routine("similar_images").check({"k": k})
    except BadInput:
        return None
    if plpy.execute(HOLDS_MORE_THAN_READS)[0]["holds"]:   # (k is not NULL: checked above)
        return None
    try:
        with plpy.subtransaction():   # a read that fails (no lookalike schema) leaves the transaction usable
            found = plpy.execute(plpy.prepare(_STATE, ["text", "text"]), [DEFAULT_BACKBONE, DEFAULT_KEY])
    except plpy.SPIError:
        return None   # the long way says what is wrong
    if not found or found[0]["generation"] is None or found[0]["database_id"] is None:
        return None
    state = found[0]
    stored = Stored(state["model_id"], state["weights_sha256"], state["generation"], state["database_id"],
                    json.loads(state["recorded"]) if state["recorded"] else None,
                    newest_rows(json.loads(state["spaces"] or "[]")))

    def labels(ids: list[int]) -> dict[int, tuple[str | None, str]]:
        rows = plpy.execute(plpy.prepare(_LABELS, ["bigint[]"]), [ids])
        return {row["id"]: (row["label"], row["source"]) for row in rows}

    def params(space_id: int) -> bytes:
        return plpy.execute(plpy.prepare(_PARAMS, ["int"]), [space_id])[0]["params"]

    return by_id(store, stored, image_id, k, default("similar", "space"), default("similar", "index"), labels,
                 params)
