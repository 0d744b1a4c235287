"""What a PostgreSQL backend imports on its first lookalike call: no database driver.

``similar_images`` by a stored image's id is answered here, from the index folder
(:mod:`lookalike.index_files`) and a few reads through the server's own SPI
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
from pathlib import Path
from typing import Any

from .answers import DEFAULT_KEY, Match, auto_space, ranked
from .config import DEFAULT_BACKBONE, PG_SCHEMA
from .errors import BadInput
from .index_files import MappedIndex, _open_files, _read_header, _wanted_ivf, folder_name, index_root
from .steps import default, routine

# The model, its embeddings' generation, this database's id, the recorded default space and the fitted spaces
# (each with whether its parameters still match their checksum): one round trip.
_STATE = f"""
WITH model AS (SELECT id, weights_sha256 FROM {PG_SCHEMA}.feature_models WHERE name = $1 ORDER BY id DESC LIMIT 1)
SELECT model.id AS model_id, model.weights_sha256,
       (SELECT generation FROM {PG_SCHEMA}.embedding_generations WHERE model_id = model.id) AS generation,
       (SELECT value FROM {PG_SCHEMA}.settings WHERE key = 'database_id') AS database_id,
       (SELECT value FROM {PG_SCHEMA}.settings WHERE key = $2) AS recorded,
       (SELECT json_agg(json_build_object('name', name, 'id', id, 'checksum', checksum,
                                          'intact', encode(sha256(params), 'hex') = checksum))
          FROM {PG_SCHEMA}.similarity_spaces WHERE feature_model_id = model.id) AS spaces
FROM model"""
_LABELS = f"SELECT id, label, source FROM {PG_SCHEMA}.images WHERE id = ANY($1)"
# Whether this transaction has written (it has an xid) or holds a relation lock stronger than reading's.
HOLDS_MORE_THAN_READS = ("SELECT pg_current_xact_id_if_assigned() IS NOT NULL OR EXISTS (SELECT FROM pg_locks "
                         "WHERE pid = pg_backend_pid() AND locktype = 'relation' AND mode <> 'AccessShareLock') "
                         "AS holds")

_opened: dict[Path, MappedIndex] = {}   # per folder, reused while its header stays the same


def call(plpy, routine_name: str, store: str, **params: Any) -> Exception | None:
    """A procedure: :func:`lookalike.plpython.call`."""
    from . import plpython
    return plpython.call(plpy, routine_name, store, **params)


def similar(plpy, store: str, query: int | str | None, k: int | None) -> tuple[list[tuple], Exception | None]:
    """Rows of ``similar_images`` (rank, image_id, label, distance, similarity, source), or the error to raise."""
    if isinstance(query, int) and not isinstance(query, bool):
        matches = _from_folder(plpy, store, query, k)
        if matches is not None:
            return answered(plpy, matches), None
    from . import plpython
    return plpython.similar(plpy, store, query, k)


def answered(plpy, matches: list[Match]) -> list[tuple]:
    """The rows of ``matches``, after a NOTICE of the space that answered (the default evaluate chose, or where
    none, pca or the embeddings)."""
    if matches:
        plpy.notice(f"lookalike.similar_images: {len(matches)} results in the {matches[0].space} space")
    return [(m.rank, m.image_id, m.label, m.distance, m.similarity, m.source) for m in matches]


def _from_folder(plpy, store: str, image_id: int, k: int | None) -> list[Match] | None:
    """The matches from the index folder as it stands, or None where :mod:`lookalike.plpython` must answer."""
    try:
        routine("similar_images").check({"k": k})
    except BadInput:
        return None
    if k is None or plpy.execute(HOLDS_MORE_THAN_READS)[0]["holds"]:
        return None
    with plpy.subtransaction():   # a read that fails (no lookalike schema) leaves the transaction usable
        found = plpy.execute(plpy.prepare(_STATE, ["text", "text"]), [DEFAULT_BACKBONE, DEFAULT_KEY])
    if not found or found[0]["generation"] is None or found[0]["database_id"] is None:
        return None
    state = found[0]
    fitted: dict[str, dict] = {}
    for space in json.loads(state["spaces"] or "[]"):   # the newest row of each name, as a refit makes
        if space["name"] not in fitted or space["id"] > fitted[space["name"]]["id"]:
            fitted[space["name"]] = space
    asked = default("similar", "space")
    name = auto_space(json.loads(state["recorded"]) if state["recorded"] else None, state["model_id"],
                      set(fitted)) if asked == "auto" else asked
    if name == "scores" or name in fitted and not fitted[name]["intact"]:
        return None
    space = fitted.get(name)
    folder = index_root(store) / folder_name(state["model_id"], space["id"] if space else None)
    index = _current(folder)
    if index is None:
        return None
    h = index.header
    wanted = (state["database_id"], state["weights_sha256"], space["id"] if space else 0,
              space["checksum"] if space else "", state["generation"])
    kind = default("similar", "index")
    if (h.database, h.weights_sha256, h.space_id, h.space_sha256, h.generation) != wanted \
            or (_wanted_ivf(index, kind) and index.ivf is None) or len(index) == 0:
        return None
    index.use_ivf = kind != "exact"
    vector = index.vector(image_id)
    if vector is None:
        return None   # not stored: plpython says so, as the CLI does
    found_ids, distances = index.search(vector, k, exclude={image_id})
    rows = plpy.execute(plpy.prepare(_LABELS, ["bigint[]"]), [[int(i) for i in found_ids]])
    return ranked(found_ids, distances, {row["id"]: (row["label"], row["source"]) for row in rows}, name)


def _current(folder: Path) -> MappedIndex | None:
    """The folder's index, opened again only when its header changed."""
    header = _read_header(folder)
    if header is None:
        return None
    opened = _opened.get(folder)
    if opened is None or opened.header != header:
        opened = _open_files(folder)
        if opened is None:
            _opened.pop(folder, None)
            return None
        _opened[folder] = opened
    return opened
