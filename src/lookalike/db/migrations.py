"""The migrations registry: how a database made by an older lookalike is brought forward.

Version 1 is the first schema. Each later version is one :class:`Migration`
that changes the tables an older database already has; tables that are new in
a version need no migration, as ``create_all`` makes every missing table at
the current version. All of it runs in the transaction that opens the database,
so a failed upgrade leaves the database as it was. A database newer than
:data:`SCHEMA_VERSION` is refused, never downgraded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import SCHEMA_VERSION, ConfigError
from .schema import (create_generation_triggers, duplicate_decisions, embedding_changes, embedding_generations,
                     settings)


@dataclass(frozen=True)
class Migration:
    version: int          # the version it leads to
    description: str
    steps: tuple[Callable[[Connection], None], ...]

    def apply(self, conn: Connection) -> None:
        for step in self.steps:
            step(conn)


def add_column(table: str, column: str, sql_type: str) -> Callable[[Connection], None]:
    """A step adding ``column`` to ``table``, skipped where the table lacks nothing (or does not exist yet)."""
    def step(conn: Connection) -> None:
        inspector = sa.inspect(conn)
        if inspector.has_table(table) and column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
    return step


def index_generations(conn: Connection) -> None:
    """The vector index's generation counter and change log, and the triggers on embeddings that write them."""
    embedding_generations.create(conn, checkfirst=True)
    embedding_changes.create(conn, checkfirst=True)
    create_generation_triggers(conn)


MIGRATIONS: dict[int, Migration] = {m.version: m for m in [
    Migration(2, "verified dedupe rule: a run's thresholds, a member's score and the check that decided", (
        add_column("dedupe_runs", "params", "TEXT"),
        add_column("duplicate_groups", "score", "FLOAT"),
        add_column("duplicate_groups", "verified_by", "VARCHAR(16)"),
    )),
    Migration(3, "vector index: a generation counter per feature model, bumped by triggers on embeddings", (
        index_generations,
    )),
    Migration(4, "duplicate review: people's decisions on groups, which later dedupe runs honour", (
        lambda conn: duplicate_decisions.create(conn, checkfirst=True),
    )),
]}
if max(MIGRATIONS) != SCHEMA_VERSION:   # one number, stated where readers without SQLAlchemy find it
    raise RuntimeError(f"config.SCHEMA_VERSION is {SCHEMA_VERSION}, the newest migration {max(MIGRATIONS)}")


def read_version(conn: Connection) -> int | None:
    """The schema version a database records; None for a new one."""
    if not sa.inspect(conn).has_table("settings"):
        return None
    value = conn.execute(sa.select(settings.c.value).where(settings.c.key == "schema_version")).scalar()
    return int(value) if value else None


def check_version(found: int | None) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise ConfigError(f"database schema version {found} is newer than this lookalike "
                          f"({SCHEMA_VERSION}); upgrade lookalike")


def migrate(conn: Connection, found: int | None) -> list[int]:
    """Apply every migration after version ``found`` (none for a new database); the versions applied."""
    applied = []
    for version in range((found or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version].apply(conn)
        applied.append(version)
    return applied


def record_version(conn: Connection) -> None:
    conn.execute(sa.delete(settings).where(settings.c.key == "schema_version"))
    conn.execute(sa.insert(settings).values(key="schema_version", value=str(SCHEMA_VERSION)))
