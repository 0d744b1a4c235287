"""The database: connection, schema and its version.

Every table lives here so the schema has one version number. SQLite is the
embedded default; PostgreSQL keeps everything in the ``lookalike`` schema
(put first on the connection's search_path, so the same SQL runs on both).
Tables are only ever added or widened; ``SCHEMA_VERSION`` records which
additions a file has, and :func:`_migrate` brings an older file forward.
"""

from __future__ import annotations

import json
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

SCHEMA_VERSION = 1
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
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            raise ConfigError(f"cannot open database {self.masked_url}: {_first_line(exc)}") from None
        self.store = ImageStore(self._store_dir(resolve_store_dir(str(store_dir) if store_dir else None)))

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
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{PG_SCHEMA}"'))
        with self.engine.begin() as conn:
            found = _read_version(conn)
            if found is not None and found > SCHEMA_VERSION:
                raise ConfigError(f"database schema version {found} is newer than this lookalike "
                                  f"({SCHEMA_VERSION}); upgrade lookalike")
            metadata.create_all(conn)  # creates only missing tables
            _migrate(conn, found)
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
    migrations: dict[int, list[str]] = {}
    for version in range((found or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
        for statement in migrations.get(version, []):
            conn.execute(sa.text(statement))


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0]


def _make_engine(url) -> Engine:
    if url.get_backend_name() == "sqlite":
        if url.database not in (None, "", ":memory:"):
            Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")    # readers don't block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint, much faster
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    return sa.create_engine(url, connect_args={"options": f"-c search_path={PG_SCHEMA},public"},
                            pool_pre_ping=True)
