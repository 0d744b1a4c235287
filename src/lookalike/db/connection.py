"""Opening a database: the engine, its checks, the schema brought up to date, the image store beside it.

SQLite is the embedded default; PostgreSQL keeps everything in the ``lookalike``
schema (put first on the connection's search_path, so the same SQL runs on both).
"""

from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ..config import ConfigError, default_store_dir, mask_url, parse_db_url, resolve_db_url, resolve_store_dir
from ..store import ImageStore
from .migrations import SCHEMA_VERSION, check_version, migrate, read_version, record_version
from .schema import PG_SCHEMA, metadata, settings
from .views import ensure_views, register_sqlite_functions

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_identifier(name: str) -> str:
    """Accept a SQL identifier only if it is a plain name (never quoted user text)."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigError(f"invalid SQL identifier: {name!r} (letters, digits and _ only)")
    return name


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

    def _dialect_insert(self, table: sa.Table):
        """This dialect's INSERT, which has ON CONFLICT. Looked up here, not imported at the top: importing
        PostgreSQL's dialect was 0.13 s of a cold start on SQLite (a by-id search takes 1.5 s in all)."""
        return importlib.import_module(f"sqlalchemy.dialects.{self.dialect}").insert(table)

    def insert_ignore(self, table: sa.Table):
        """INSERT … ON CONFLICT DO NOTHING, in this database's dialect."""
        return self._dialect_insert(table).on_conflict_do_nothing()

    def upsert(self, table: sa.Table, keys: list[str], values: dict[str, Any]) -> None:
        stmt = self._dialect_insert(table).values(**values)
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
            found = read_version(conn)
            check_version(found)
            migrate(conn, found)       # the tables an older database has, brought forward
            metadata.create_all(conn)  # then every missing table, at the current version
            ensure_views(conn, self.dialect)
            if found != SCHEMA_VERSION:
                record_version(conn)


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
