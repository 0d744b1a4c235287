"""Where things are: the database URL and the image store, from flags or the environment."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

DEFAULT_DB = "sqlite:///lookalike.db"
DB_ENV = "LOOKALIKE_DB"
STORE_ENV = "LOOKALIKE_STORE"
DEFAULT_BACKBONE = "efficientnet-lite0"   # the CNN that featurize, search and the verified dedupe use
PG_SCHEMA = "lookalike"                   # on PostgreSQL the tables, views and routines live in this schema
SCHEMA_VERSION = 4                        # the newest migration's (db/migrations.py checks); here for readers
                                          # that import no SQLAlchemy (lookalike.quick)


class ConfigError(BadInput):
    """A setting the user gave that cannot work; the message says what to fix."""


def resolve_db_url(flag: str | None = None) -> str:
    return flag or os.environ.get(DB_ENV) or DEFAULT_DB


def parse_db_url(url: str) -> URL:
    """Parse and normalise a database URL (``postgresql://`` uses psycopg 3)."""
    # SQLAlchemy where a URL is parsed, not on import: the steps' registry imports this module, and a
    # PL/Python backend answering a query by id needs no database driver (lookalike.backend).
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {mask_secrets(url)!r} "
                          "(expected sqlite:///path.db or postgresql://user@host/db)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL with its password hidden, safe for logs and errors."""
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
        return parsed.render_as_string(hide_password=True)
    except ArgumentError:
        return mask_secrets(str(url))


_SECRET_PATTERNS = [
    re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"),                          # user:password@
    re.compile(r"((?:AccountKey|SharedAccessSignature|password)=)[^;&\s]+", re.I),
]


def mask_secrets(text: str) -> str:
    """Hide passwords and storage keys anywhere in a message."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***\2" if pattern.groups == 2 else r"\1***", text)
    return text


def default_store_dir(url: URL) -> Path:
    """Beside a SQLite file (``x.db`` → ``x.store``); ``./lookalike-store`` otherwise."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db_path = Path(url.database).expanduser().resolve()
        return db_path.with_name(db_path.stem + ".store")
    return Path("lookalike-store").resolve()


def resolve_store_dir(flag: str | None = None) -> Path | None:
    value = flag or os.environ.get(STORE_ENV)
    return Path(value).expanduser().resolve() if value else None
