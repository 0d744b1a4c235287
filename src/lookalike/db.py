"""The database: connection, schema and its version.

Every table lives here so the schema has one version number. SQLite is the
embedded default; PostgreSQL keeps everything in the ``lookalike`` schema
(put first on the connection's search_path, so the same SQL runs on both).
Tables are only ever added or widened; ``SCHEMA_VERSION`` records which
additions a file has, and :func:`_migrate` brings an older file forward.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .config import ConfigError, default_store_dir, mask_url, parse_db_url, resolve_db_url, resolve_store_dir
from .store import ImageStore

SCHEMA_VERSION = 2
PG_SCHEMA = "lookalike"

metadata = sa.MetaData()

settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# One row per distinct content (sha256). An image whose bytes could not be
# decoded is kept, with status 'failed' and the reason.
images = sa.Table(
    "images", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("label", sa.Text),
    sa.Column("source", sa.Text, nullable=False),  # the first source it came from
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("format", sa.String(16)),
    sa.Column("byte_size", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(8), nullable=False),  # 'ok' | 'failed'
    sa.Column("reason", sa.Text),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", sa.Text),  # JSON object: extra manifest columns
    sa.CheckConstraint("status IN ('ok', 'failed')", name="images_status"),
)
sa.Index("images_label", images.c.label)

# Every source ever given to `load`: a path or URL, the image it gave (if its
# bytes were fetched) or why it could not be fetched.
image_sources = sa.Table(
    "image_sources", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text, nullable=False, unique=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE")),
    sa.Column("label", sa.Text),
    sa.Column("status", sa.String(8), nullable=False),  # 'ok' (bytes fetched) | 'failed'
    sa.Column("reason", sa.Text),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", sa.Text),
    sa.CheckConstraint("status IN ('ok', 'failed')", name="image_sources_status"),
)
sa.Index("image_sources_image", image_sources.c.image_id)

# ---- hash step: one row per image/kind/size; hex always, signed 64-bit form where it fits.
image_hashes = sa.Table(
    "image_hashes", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),   # dhash_rowcol | ahash | dhash | phash | whash
    sa.Column("size", sa.Integer, primary_key=True),
    sa.Column("hex", sa.String(128), nullable=False),
    sa.Column("value", sa.BigInteger),                    # two's-complement signed form when bits <= 64
    sa.Column("bits", sa.Integer, nullable=False),
    sa.Column("hasher", sa.String(64), nullable=False),   # e.g. pillow-13.0.0: never mix decode paths
)
sa.Index("image_hashes_lookup", image_hashes.c.kind, image_hashes.c.size, image_hashes.c.hex)

# One row per image the hash step has finished (all kinds), with its low-detail flag.
hashed_images = sa.Table(
    "hashed_images", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("low_detail", sa.Boolean, nullable=False),
    sa.Column("hasher", sa.String(64), nullable=False),
    sa.Column("hashed_at", sa.DateTime(timezone=True), nullable=False),
)

# ---- dedupe step: each run's groups; images are never deleted.
dedupe_runs = sa.Table(
    "dedupe_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(8), nullable=False),      # exact | near | verified
    sa.Column("hash_kind", sa.String(16), nullable=False),
    sa.Column("hash_size", sa.Integer, nullable=False),
    sa.Column("max_distance", sa.Integer),
    sa.Column("per_label", sa.Boolean, nullable=False),
    sa.Column("include_low_detail", sa.Boolean, nullable=False),
    sa.Column("groups", sa.Integer, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False),  # images that are not keepers
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("params", sa.Text),                         # JSON: the verified rule's thresholds and counts
)
duplicate_groups = sa.Table(
    "duplicate_groups", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("dedupe_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("group_id", sa.Integer, nullable=False),
    sa.Column("is_keeper", sa.Boolean, nullable=False),
    sa.Column("distance", sa.Integer, nullable=False),    # Hamming distance to the keeper
    sa.Column("score", sa.Float),                         # verified rule: the similarity that decided
    sa.Column("verified_by", sa.String(16)),              # verified rule: embedding | geometry (keeper: NULL)
)
sa.Index("duplicate_groups_group", duplicate_groups.c.run_id, duplicate_groups.c.group_id)

# ---- featurize step: the backbone is a first-class row; embeddings keyed by (image, model).
feature_models = sa.Table(
    "feature_models", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("weights_sha256", sa.String(64), nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("input_size", sa.Integer, nullable=False),
    sa.Column("preprocessing", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("name", "weights_sha256", name="feature_models_identity"),
)
embeddings = sa.Table(
    "embeddings", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("feature_models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32, little-endian, unit length
)
sa.Index("embeddings_by_model", embeddings.c.model_id, embeddings.c.image_id)

# ---- split step: a stored random number per image, so another ratio re-cuts without new randomness.
splits = sa.Table(
    "splits", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("random", sa.Float, nullable=False),        # uniform [0, 1), from (seed, sha256)
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("test_ratio", sa.Float, nullable=False),
    sa.Column("split", sa.String(8), nullable=False),     # train | test
    sa.CheckConstraint("split IN ('train', 'test')", name="splits_split"),
)

# ---- train step: classifiers, stored in a safe format (skops), never a pickle.
models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),     # e.g. texture-mlp
    sa.Column("kind", sa.String(32), nullable=False),     # mlp | logreg
    sa.Column("feature_model_id", sa.Integer, sa.ForeignKey("feature_models.id"), nullable=False),
    sa.Column("classes", sa.Text, nullable=False),        # JSON list, the order of score columns
    sa.Column("params", sa.Text, nullable=False),         # JSON
    sa.Column("model", sa.LargeBinary, nullable=False),   # skops bytes
    sa.Column("cv_accuracy", sa.Float),
    sa.Column("train_accuracy", sa.Float),
    sa.Column("test_accuracy", sa.Float),
    sa.Column("confusion", sa.Text),                      # JSON matrix, rows = true class
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
scores = sa.Table(
    "scores", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("predicted", sa.Text, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 class probabilities, in models.classes order
)

# ---- evaluate step: the ranking protocol's pairs and results.
evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")),
    sa.Column("feature_model_id", sa.Integer, sa.ForeignKey("feature_models.id"), nullable=False),
    sa.Column("params", sa.Text, nullable=False),         # JSON: queries per label, negatives, seed
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
evaluation_pairs = sa.Table(
    "evaluation_pairs", metadata,
    sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("query_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("candidate_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("is_positive", sa.Boolean, nullable=False),
)
evaluation_results = sa.Table(
    "evaluation_results", metadata,
    sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("space", sa.String(16), primary_key=True),   # embeddings | scores
    sa.Column("metric", sa.String(8), primary_key=True),   # cosine | l2
    sa.Column("measure", sa.String(16), primary_key=True), # top1 … top32, mean_rank, median_rank, map@10, recall@10
    sa.Column("value", sa.Float, nullable=False),
)

# ---- rank step: query images in, top-K out.
query_images = sa.Table(
    "query_images", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text, nullable=False),          # path, URL or "image:<id>"
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),  # bytes kept in the image store
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL")),  # when stored too
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
)
ranking_results = sa.Table(
    "ranking_results", metadata,
    sa.Column("query_id", sa.Integer, sa.ForeignKey("query_images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("space", sa.String(16), primary_key=True),
    sa.Column("rank", sa.Integer, primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("distance", sa.Float, nullable=False),
)

# ---- every step records what it did (the DBA's audit trail).
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.String(32), nullable=False),
    sa.Column("params", sa.Text),        # JSON
    sa.Column("counts", sa.Text),        # JSON
    sa.Column("outcome", sa.String(16), nullable=False),  # ok | failed | interrupted
    sa.Column("error", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
)

# ---- views (not tables: create_all never sees this metadata) ---------------------

_views = sa.MetaData()
unique_images = sa.Table(
    "unique_images", _views,
    *(sa.Column(c.name, c.type) for c in images.columns if c.name not in ("status", "reason")),
)
image_dhash = sa.Table(
    "image_dhash", _views,
    sa.Column("image_id", sa.Integer), sa.Column("label", sa.Text),
    sa.Column("width", sa.Integer), sa.Column("height", sa.Integer),
    *(sa.Column(f"dhash_hex_{size}", sa.String(128)) for size in range(1, 9)),
)

_UNIQUE_IMAGES_SQL = f"""
SELECT {", ".join(f"i.{c.name}" for c in unique_images.columns)}
FROM images i
WHERE i.status = 'ok'
  AND NOT EXISTS (SELECT 1 FROM duplicate_groups dg
                  WHERE dg.image_id = i.id AND NOT dg.is_keeper
                    AND dg.run_id = (SELECT MAX(id) FROM dedupe_runs))
"""
_IMAGE_DHASH_SQL = f"""
SELECT i.id AS image_id, i.label, i.width, i.height,
       {", ".join(f"MAX(CASE WHEN h.size = {s} THEN h.hex END) AS dhash_hex_{s}" for s in range(1, 9))}
FROM images i JOIN image_hashes h ON h.image_id = i.id AND h.kind = 'dhash_rowcol'
WHERE i.status = 'ok'
GROUP BY i.id, i.label, i.width, i.height
"""
VIEWS = {"unique_images": _UNIQUE_IMAGES_SQL, "image_dhash": _IMAGE_DHASH_SQL}

# popcount(int(a, 16) XOR int(b, 16)): the shorter hex is left-padded with zeros,
# so hashes of one kind and size compare bit for bit, and the function never raises.
_PG_HAMMING_SQL = f"""
CREATE FUNCTION {PG_SCHEMA}.hamming(a text, b text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT bit_count(('x' || lpad(a, greatest(length(a), length(b)), '0'))::varbit
                 # ('x' || lpad(b, greatest(length(a), length(b)), '0'))::varbit)::integer
$$"""


def hamming_sql(a: str | None, b: str | None) -> int | None:
    """The SQL ``hamming(hex_a, hex_b)`` function: bits that differ between two hex hashes (NULL in, NULL out)."""
    if a is None or b is None:
        return None
    return (int(a or "0", 16) ^ int(b or "0", 16)).bit_count()


def register_sqlite_functions(dbapi_conn) -> None:
    """Register ``hamming(hex_a, hex_b)`` on a sqlite3 connection (SQLite has no XOR or popcount)."""
    dbapi_conn.create_function("hamming", 2, hamming_sql, deterministic=True)


def ensure_views(conn: Connection, dialect: str) -> None:
    """Create the ``unique_images`` and ``image_dhash`` views (and PostgreSQL's ``hamming``) if missing.

    Existing objects are left as they are, so this is cheap to call on every
    open; a change to a definition belongs in a schema migration that drops it.
    """
    if dialect == "sqlite":
        for name, body in VIEWS.items():
            conn.exec_driver_sql(f"CREATE VIEW IF NOT EXISTS {name} AS {body}")
        return
    for name, body in VIEWS.items():
        if conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": f"{PG_SCHEMA}.{name}"}).scalar() is None:
            conn.exec_driver_sql(f"CREATE VIEW {PG_SCHEMA}.{name} AS {body}")
    if conn.execute(sa.text("SELECT to_regprocedure(:sig)"),
                    {"sig": f"{PG_SCHEMA}.hamming(text,text)"}).scalar() is None:
        conn.exec_driver_sql(_PG_HAMMING_SQL)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_identifier(name: str) -> str:
    """Accept a SQL identifier only if it is a plain name (never quoted user text)."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigError(f"invalid SQL identifier: {name!r} (letters, digits and _ only)")
    return name


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_json(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else None


class Database:
    """An open lookalike database: engine, schema, and the image store beside it."""

    def __init__(self, url: str | None = None, store_dir: str | Path | None = None):
        self.url = parse_db_url(resolve_db_url(url))
        self.dialect = self.url.get_backend_name()
        self.engine = _make_engine(self.url)
        try:
            self._ensure_schema()
            store_path = self._store_dir(resolve_store_dir(str(store_dir) if store_dir else None))
        except sa.exc.DBAPIError as exc:
            self.engine.dispose()
            raise ConfigError(f"cannot open database {self.masked_url}: {describe_db_error(exc)}") from None
        self.store = ImageStore(store_path)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def insert_ignore(self, table: sa.Table):
        """INSERT … ON CONFLICT DO NOTHING, in this database's dialect."""
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        return dialect_insert(table).on_conflict_do_nothing()

    def upsert(self, table: sa.Table, keys: list[str], values: dict[str, Any]) -> None:
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=keys,
                                          set_={k: v for k, v in values.items() if k not in keys})
        with self.begin() as conn:
            conn.execute(stmt)

    def setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(settings.c.value).where(settings.c.key == key)).scalar()

    def set_setting(self, key: str, value: str) -> None:
        self.upsert(settings, ["key"], {"key": key, "value": value})

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _store_dir(self, explicit: Path | None) -> Path:
        # An explicit --store wins and is remembered (that is how a store is moved).
        recorded = self.setting("store_path")
        if explicit is not None:
            if recorded != str(explicit):
                self.set_setting("store_path", str(explicit))
            return explicit
        if recorded:
            return Path(recorded)
        path = default_store_dir(self.url)
        self.set_setting("store_path", str(path))
        return path

    def _ensure_schema(self) -> None:
        if self.dialect == "postgresql":
            with self.engine.begin() as conn:
                # Checked first: CREATE SCHEMA needs a privilege a role using an installed schema may lack.
                if conn.execute(sa.text("SELECT to_regnamespace(:s)"), {"s": PG_SCHEMA}).scalar() is None:
                    conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{PG_SCHEMA}"'))
        with self.engine.begin() as conn:
            found = _read_version(conn)
            if found is not None and found > SCHEMA_VERSION:
                raise ConfigError(f"database schema version {found} is newer than this lookalike "
                                  f"({SCHEMA_VERSION}); upgrade lookalike")
            metadata.create_all(conn)  # creates only missing tables
            _migrate(conn, found)
            ensure_views(conn, self.dialect)
            if found != SCHEMA_VERSION:
                conn.execute(sa.delete(settings).where(settings.c.key == "schema_version"))
                conn.execute(sa.insert(settings).values(key="schema_version", value=str(SCHEMA_VERSION)))


def _read_version(conn: Connection) -> int | None:
    if not sa.inspect(conn).has_table("settings"):
        return None
    value = conn.execute(sa.select(settings.c.value).where(settings.c.key == "schema_version")).scalar()
    return int(value) if value else None


def _migrate(conn: Connection, found: int | None) -> None:
    """Column changes between versions go here, keyed by the version they lead to."""
    migrations: dict[int, list[str]] = {
        2: ["ALTER TABLE dedupe_runs ADD COLUMN params TEXT",
            "ALTER TABLE duplicate_groups ADD COLUMN score FLOAT",
            "ALTER TABLE duplicate_groups ADD COLUMN verified_by VARCHAR(16)"],
    }
    for version in range((found or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
        for statement in migrations.get(version, []):
            conn.execute(sa.text(statement))


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0]


# sqlite3 error names (by prefix) -> what they mean to the user
_SQLITE_ERRORS = {
    "SQLITE_NOTADB": "the file is not a SQLite database",
    "SQLITE_CORRUPT": "the database file is damaged",
    "SQLITE_READONLY": "the database is read-only",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_CANTOPEN": "cannot open the database file",
    "SQLITE_IOERR": "the disk failed a read or write",
}


def describe_db_error(exc: Exception) -> str:
    """One line for a database error: its cause, then the driver's first line."""
    name = getattr(getattr(exc, "orig", exc), "sqlite_errorname", None) or ""
    meaning = next((text for prefix, text in _SQLITE_ERRORS.items() if name.startswith(prefix)), None)
    return f"{meaning}: {_first_line(exc)}" if meaning else _first_line(exc)


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite touches anything, a file that is not a database, is cut short,
    or cannot be written (SQLite would otherwise leave -wal/-shm files or fail half-way)."""
    where = f"cannot open database {path}"
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"{where}: not a regular file")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
        if head and not head.startswith(SQLITE_HEADER):
            raise ConfigError(f"{where}: the file is not a SQLite database")
        if head and len(head) < 100:
            raise ConfigError(f"{where}: the database file is damaged: cut short at {size} bytes")
        wal = path.with_name(path.name + "-wal")
        if head and not (wal.exists() and wal.stat().st_size):   # while a WAL is pending the header may lead
            page_size = int.from_bytes(head[16:18], "big")
            expected = int.from_bytes(head[28:32], "big") * (65536 if page_size == 1 else page_size)
            if head[24:28] == head[92:96] and size < expected:  # the page count is valid (SQLite >= 3.7)
                raise ConfigError(f"{where}: the database file is damaged: {size} bytes, "
                                  f"its header says {expected}")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"{where}: the database file is read-only (lookalike records every run in it)")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: the folder {folder} is read-only "
                          "(SQLite keeps its -wal and -shm files beside the database)")


def _make_engine(url) -> Engine:
    if url.get_backend_name() == "sqlite":
        if url.database not in (None, "", ":memory:"):
            path = Path(url.database).expanduser().resolve()
            _check_sqlite_file(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")    # readers don't block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint, much faster
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            register_sqlite_functions(dbapi_conn)
        return engine
    # client_encoding: on an SQL_ASCII (C-locale) database psycopg would otherwise hand back bytes, not text.
    return sa.create_engine(url, connect_args={"options": f"-c search_path={PG_SCHEMA},public",
                                               "client_encoding": "utf8"},
                            pool_pre_ping=True)


def vector_bytes(vector) -> bytes:
    """A vector as stored: float32 little-endian bytes."""
    import numpy as np
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes):
    import numpy as np
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
    import time
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
