"""The db package: its migrations registry brings an older database forward, on SQLite and PostgreSQL;
the SQL hamming() function is the one Hamming distance."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from lookalike.config import ConfigError
from lookalike.db import (MIGRATIONS, SCHEMA_VERSION, Database, dedupe_runs, duplicate_groups, hamming_sql, images,
                          now, settings)
from lookalike.hamming import hamming

VERSION_2_COLUMNS = {("dedupe_runs", "params"), ("duplicate_groups", "score"), ("duplicate_groups", "verified_by")}


def url_of(db: Database) -> str:
    return db.url.render_as_string(hide_password=False)


def columns(db: Database) -> set[tuple[str, str]]:
    with db.engine.connect() as conn:
        inspector = sa.inspect(conn)
        return {(table, c["name"]) for table in ("dedupe_runs", "duplicate_groups")
                for c in inspector.get_columns(table)}


def version(db: Database) -> str | None:
    return db.setting("schema_version")


def make_version_1(db: Database) -> None:
    """Turn a current database into what lookalike's first schema left: no version-2 columns, version 1."""
    with db.begin() as conn:
        image = conn.execute(sa.insert(images).values(sha256="a" * 64, source="a.jpg", byte_size=1, status="ok",
                                                      loaded_at=now()).returning(images.c.id)).scalar_one()
        run = conn.execute(sa.insert(dedupe_runs).values(
            rule="exact", hash_kind="dhash_rowcol", hash_size=3, per_label=False, include_low_detail=False,
            groups=1, duplicates=0, created_at=now()).returning(dedupe_runs.c.id)).scalar_one()
        conn.execute(sa.insert(duplicate_groups).values(run_id=run, image_id=image, group_id=1, is_keeper=True,
                                                        distance=0))
        # The views read these tables; they are made again when the database is opened.
        conn.exec_driver_sql("DROP VIEW unique_images")
        for table, column in sorted(VERSION_2_COLUMNS):
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute(sa.update(settings).where(settings.c.key == "schema_version").values(value="1"))


def test_the_registry_runs_from_version_2_to_the_schema_version():
    assert sorted(MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1))
    assert all(m.version == v and m.description and m.steps for v, m in MIGRATIONS.items())


def test_a_new_database_is_at_the_current_version(db):
    assert version(db) == str(SCHEMA_VERSION)
    assert VERSION_2_COLUMNS <= columns(db)


def test_an_older_database_is_brought_forward_and_keeps_its_rows(db):
    make_version_1(db)
    assert not VERSION_2_COLUMNS & columns(db) and version(db) == "1"
    url, store = url_of(db), db.store.root
    db.close()
    with Database(url, store) as again:
        assert VERSION_2_COLUMNS <= columns(again) and version(again) == str(SCHEMA_VERSION)
        with again.engine.connect() as conn:
            kept = conn.execute(sa.select(duplicate_groups.c.group_id, duplicate_groups.c.score)).all()
            unique = conn.execute(sa.text("SELECT count(*) FROM unique_images")).scalar_one()
        assert kept == [(1, None)] and unique == 1
    with Database(url, store) as third:  # opening again changes nothing
        assert version(third) == str(SCHEMA_VERSION)


def test_a_newer_database_is_refused_and_left_as_it_is(db):
    with db.begin() as conn:
        conn.execute(sa.update(settings).where(settings.c.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION + 1)))
    url, store = url_of(db), db.store.root
    db.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1} is newer than this lookalike"):
        Database(url, store)
    engine = sa.create_engine(url, connect_args={"options": "-c search_path=lookalike"}
                              if url.startswith("postgresql") else {})
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM settings WHERE key = 'schema_version'")).scalar() == \
            str(SCHEMA_VERSION + 1)
    engine.dispose()


def test_the_sql_hamming_function_is_the_one_hamming(db):
    pairs = [("1", "1ff"), ("ff", "00"), ("0", "0"), ("f0f0f0f0f0f0f0f0", "0f0f0f0f0f0f0f0f"),
             ("ffffffffffffffffffffffffffffffff", "0")]
    with db.engine.connect() as conn:
        found = [conn.execute(sa.text("SELECT hamming(:a, :b)"), {"a": a, "b": b}).scalar() for a, b in pairs]
        null = conn.execute(sa.text("SELECT hamming(NULL, 'ff')")).scalar()
    assert found == [hamming(a, b) for a, b in pairs] == [hamming_sql(a, b) for a, b in pairs] == [8, 8, 0, 64, 128]
    assert null is None and hamming_sql(None, "ff") is None
