"""Shared fixtures: a real PostgreSQL server, a real HTTP server, real image files."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.corpus import build_bad_corpus, sample_images as make_sample_images
from support.http import LocalHTTPServer
from support.pg import PG_MAJOR, PostgresCluster, find_pg_bin

_database_numbers = itertools.count(1)
PG_FIXTURES = {"pg_cluster", "pg_url"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test on the PostgreSQL server gets the `postgres` marker, so `-m "not postgres"` works.
    for item in items:
        if PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL 15 server for the whole session.

    Skipped when PostgreSQL is not installed, except under CI (env ``CI`` set),
    where a missing server is a failure.
    """
    if find_pg_bin() is None:
        message = (f"PostgreSQL {PG_MAJOR} is not installed "
                   f"(apt-get install postgresql-{PG_MAJOR} postgresql-plpython3-{PG_MAJOR})")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> str:
    """SQLAlchemy URL of a fresh, empty database for this test."""
    return pg_cluster.create_database(f"test_{next(_database_numbers)}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a new SQLite file in this test's tmp dir."""
    return f"sqlite:///{tmp_path}/t.db"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """An empty database, once as a SQLite file and once on the PostgreSQL server."""
    from lookalike.db import Database
    url = request.getfixturevalue("sqlite_url") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    with Database(url, tmp_path / "store") as database:
        yield database


@pytest.fixture(scope="session")
def spark():
    """One local Spark session (two cores) per test worker: a JVM start costs about 15 s."""
    from lookalike.spark.session import spark_session
    session = spark_session("local[2]", app="lookalike-tests")
    session.conf.set("spark.sql.shuffle.partitions", "4")   # the default 200 is slow on small data
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_images() -> dict[str, bytes]:
    """Encoded sample images: ``a.jpg`` (64x48), ``b.png`` (40x32), ``c.jpg`` (60x80)."""
    return make_sample_images()


@pytest.fixture
def http_server(sample_images: dict[str, bytes]) -> Iterator[LocalHTTPServer]:
    """A fresh local HTTP server per test (fresh ``hits`` and flaky state), serving ``sample_images``."""
    with LocalHTTPServer(sample_images) as server:
        yield server


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dir holding every file of ``support.corpus.CORPUS``."""
    root = tmp_path_factory.mktemp("bad_corpus")
    build_bad_corpus(root)
    return root
