"""A query by a stored image's id, answered from a current index folder without SQLAlchemy or psycopg.

A cold search spent most of its time importing database libraries (SQLAlchemy alone
took about half a second here). When the folder already holds what the database says
it should (the same database, weights, space and generation of the embeddings), the
answer needs only the folder (:mod:`lookalike.index_files`) and a few rows: the
model, the generation counter, the recorded default space, and the results' labels.
Two readers give them: :func:`lookalike.backend.similar` through a PostgreSQL
backend's own SPI, and :func:`similar_on_sqlite` through the standard library's
sqlite3 for the CLI. Whenever the folder cannot answer as it stands (missing, torn,
behind, the scores space, an older or newer schema), they return None and the caller
takes the long way (:func:`lookalike.search.similar_images`), which catches up and
gives the same rows.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .answers import AUTO, DEFAULT_KEY, Match, auto_space, ranked
from .config import SCHEMA_VERSION
from .index_files import MappedIndex, _open_files, _read_header, _same_source, _wanted_ivf, folder_name, index_root

_opened: dict[Path, MappedIndex] = {}   # per folder, reused while its header stays the same
# On PostgreSQL, whether this transaction has written (it has an xid) or holds a relation lock stronger than
# reading's: a search through another connection could neither see those changes nor wait for those locks.
HOLDS_MORE_THAN_READS = ("SELECT pg_current_xact_id_if_assigned() IS NOT NULL OR EXISTS (SELECT FROM pg_locks "
                         "WHERE pid = pg_backend_pid() AND locktype = 'relation' AND mode <> 'AccessShareLock') "
                         "AS holds")


@dataclass(frozen=True)
class FittedRow:
    """A fitted space's newest row, as :func:`lookalike.index_files._same_source` reads a space."""

    id: int
    checksum: str


@dataclass(frozen=True)
class Stored:
    """What the database says the folder must hold."""

    model_id: int
    weights_sha256: str
    generation: int
    database_id: str
    recorded: dict | None          # the default space evaluate recorded (settings row), if any
    fitted: dict[str, FittedRow]   # fitted space name -> its newest row


# (database id, space id, checksum) of the fitted spaces whose parameters matched their checksum in this process
_intact: set[tuple[str, int, str]] = set()


def by_id(store: str | Path, stored: Stored, image_id: int, k: int, space: str, kind: str,
          labels: Callable[[list[int]], dict[int, tuple[str | None, str]]],
          params: Callable[[int], bytes]) -> list[Match] | None:
    """The ``k`` nearest images to stored image ``image_id`` in ``space`` (``auto`` resolved as everywhere)
    from the folder beside ``store``; None where the folder cannot answer as it stands.
    ``labels``: (label, source) of given image ids; ``params``: a fitted space's stored parameters, by id."""
    name = auto_space(stored.recorded, stored.model_id, set(stored.fitted)) if space == AUTO else space
    fitted = stored.fitted.get(name)
    if name == "scores" or name != "embeddings" and (
            fitted is None or not _params_intact(stored.database_id, fitted, params)):
        return None
    folder = index_root(store) / folder_name(stored.model_id, fitted.id if fitted else None)
    index = _current(folder)
    if index is None:
        return None
    if not _same_source(index.header, stored.database_id, stored.weights_sha256, fitted) \
            or index.header.generation != stored.generation \
            or (_wanted_ivf(index, kind) or kind == "ivf") and index.ivf is None or len(index) == 0:
        return None   # (an IVF asked of a folder without one: built, or refused, the long way)
    index.use_ivf = kind != "exact"
    vector = index.vector(image_id)
    if vector is None:
        return None   # not stored: the long way says so
    found_ids, distances = index.search(vector, k, exclude={image_id})
    return ranked(found_ids, distances, labels([int(i) for i in found_ids]), name)


def newest_rows(spaces: list[dict]) -> dict[str, FittedRow]:
    """The newest row of each fitted space's name (a refit makes a new one), from ``name``, ``id`` and
    ``checksum`` of each."""
    newest: dict[str, FittedRow] = {}
    for space in spaces:
        if space["name"] not in newest or space["id"] > newest[space["name"]].id:
            newest[space["name"]] = FittedRow(space["id"], space["checksum"])
    return newest


def _params_intact(database_id: str, row: FittedRow, params: Callable[[int], bytes]) -> bool:
    """Whether the space's stored parameters still match their checksum, as the long way's
    :func:`~lookalike.projection.load_space` checks: read and hashed once a process (a few MB), not on
    every query of a warm PL/Python session (the long way, too, loads a space once while its row stays)."""
    key = (database_id, row.id, row.checksum)
    if key not in _intact:
        if hashlib.sha256(params(row.id)).hexdigest() != row.checksum:
            return False
        _intact.add(key)
    return True


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


def similar_on_sqlite(database: Path, image_id: int, k: int, *, space: str, kind: str,
                      backbone: str) -> list[Match] | None:
    """:func:`by_id` on a SQLite file, read-only through sqlite3; None for the long way (also where the file's
    schema is not this version's, or its store was never recorded)."""
    try:
        conn = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        setting = dict(conn.execute("SELECT key, value FROM settings WHERE key IN "
                                    "('schema_version', 'store_path', 'database_id', ?)", (DEFAULT_KEY,)).fetchall())
        model = conn.execute("SELECT id, weights_sha256 FROM feature_models WHERE name = ? ORDER BY id DESC LIMIT 1",
                             (backbone,)).fetchone()
        if setting.get("schema_version") != str(SCHEMA_VERSION) or not setting.get("store_path") \
                or not setting.get("database_id") or model is None:
            return None
        generation = conn.execute("SELECT generation FROM embedding_generations WHERE model_id = ?",
                                  (model[0],)).fetchone()
        if generation is None:
            return None
        spaces = [{"name": name, "id": space_id, "checksum": checksum} for name, space_id, checksum in conn.execute(
            "SELECT name, id, checksum FROM similarity_spaces WHERE feature_model_id = ?", (model[0],))]
        stored = Stored(model[0], model[1], generation[0], setting["database_id"],
                        json.loads(setting[DEFAULT_KEY]) if DEFAULT_KEY in setting else None, newest_rows(spaces))

        def labels(ids: list[int]) -> dict[int, tuple[str | None, str]]:
            marks = ",".join("?" * len(ids))
            return {row[0]: (row[1], row[2]) for row in conn.execute(
                f"SELECT id, label, source FROM images WHERE id IN ({marks})", ids)} if ids else {}

        def params(space_id: int) -> bytes:
            return conn.execute("SELECT params FROM similarity_spaces WHERE id = ?", (space_id,)).fetchone()[0]

        return by_id(setting["store_path"], stored, image_id, k, space, kind, labels, params)
    except sqlite3.Error:   # an older schema, a locked or damaged file: the long way explains
        return None
    finally:
        conn.close()
