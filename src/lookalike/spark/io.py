"""What the Spark jobs share: the images still to do as a DataFrame, the Parquet they write, and its way into
the database (per partition from the executors on PostgreSQL, :func:`lookalike.importing.import_output` at the
driver on SQLite)."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from ..db import PG_SCHEMA, Database
from ..errors import BadInput
from ..importing import COLUMNS, FORMAT, MANIFEST, ImportCounts, ImportSummary, import_parts, read_manifest, write_batch
from .session import POSTGRESQL_JAR, job_failed, spark_session

ROWS_PER_PARTITION = 2000   # images per task: small enough that a retried task redoes little
# A task-local property naming a file: the first task that finds the file deletes it and kills its Python
# worker (tests use it to lose an executor's work mid-job; Spark then runs the task again).
FAIL_ONCE = "lookalike.fail_once"


@dataclass
class SparkSummary:
    """A job's summary: the step's own (HashSummary, FeaturizeSummary), where the Parquet went, and what the
    database took of it."""
    step: Any
    out: Path
    stored: ImportSummary

    def lines(self) -> list[str]:
        out = self.step.lines() + [f"  parquet: {self.out}"]
        if self.stored.counts.rejected or self.stored.bad_files:
            out += self.stored.lines()
        return out


@contextmanager
def job_session(master: str, session=None) -> Iterator:
    """``session`` when given, else the one running in this process (both stay open), else a new one on
    ``master``, stopped at the end."""
    if session is None:
        try:
            from pyspark.sql import SparkSession
            session = SparkSession.getActiveSession()
        except ImportError:
            pass   # spark_session says what to install
    owned = session is None
    session = spark_session(master, app="lookalike") if owned else session
    try:
        yield session
    except Exception as exc:   # a failed job: the executors' error in one line, not the JVM's traceback
        failed = job_failed(exc)
        if failed is None:
            raise
        raise failed from None
    finally:
        if owned:
            session.stop()


def output_dir(db: Database, job: str, out: Path | None) -> Path:
    """``out``, or ``<store>.spark/<job>`` beside the image store (where executors must see it too)."""
    root = db.store.root
    return Path(out).expanduser().resolve() if out else root.with_name(root.name + ".spark") / job


def jdbc_options(db: Database) -> dict[str, str]:
    """The database's JDBC connection options. A unix-socket URL becomes localhost at the same port
    (JDBC speaks TCP only): fine for ``local[*]``; a cluster's executors need a host they can reach."""
    if not POSTGRESQL_JAR.exists():
        raise BadInput(f"reading PostgreSQL from Spark needs the JDBC driver at {POSTGRESQL_JAR}: "
                       "apt-get install libpostgresql-jdbc-java")
    url = db.url
    host = url.host or url.query.get("host") or "localhost"
    host = "localhost" if not isinstance(host, str) or host.startswith("/") else host
    host = f"[{host}]" if ":" in host else host
    port = url.port or url.query.get("port") or 5432
    options = {"url": f"jdbc:postgresql://{host}:{port}/{url.database}", "driver": "org.postgresql.Driver",
               "currentSchema": PG_SCHEMA}
    if url.username:
        options["user"] = url.username
    if url.password:
        options["password"] = url.password
    return options


def todo_frame(spark, db: Database, query: sa.Select):
    """The ``(id, sha256)`` rows of ``query`` as a DataFrame: read over JDBC on PostgreSQL in id ranges (one
    per task), read here and parallelised on SQLite."""
    query = query.order_by(None)
    sub = query.subquery()
    with db.engine.connect() as conn:
        count, low, high = conn.execute(sa.select(sa.func.count(), sa.func.min(sub.c.id), sa.func.max(sub.c.id))).one()
        parts = max(spark.sparkContext.defaultParallelism, math.ceil(count / ROWS_PER_PARTITION))
        if count and db.dialect == "postgresql":
            # Literal values only (a status and ids): no user text reaches this SQL.
            sql = str(query.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
            frame = (spark.read.format("jdbc").options(**jdbc_options(db))
                     .option("dbtable", f"({sql}) AS todo").option("partitionColumn", "id")
                     .option("lowerBound", str(low)).option("upperBound", str(high + 1))
                     .option("numPartitions", str(parts)).option("fetchsize", "10000").load())
            return frame.selectExpr("CAST(id AS BIGINT) AS id", "sha256")
        rows = conn.execute(query).all()
    rdd = spark.sparkContext.parallelize([(int(i), s) for i, s in rows], parts)   # split here: no shuffle
    return spark.createDataFrame(rdd, "id bigint, sha256 string")


def with_files(spark, todo, source: str | None):
    """``todo`` with each image's bytes (``content``) read by Spark itself from the files under ``source`` (a
    folder, or any path Spark's filesystems read: hdfs://, s3a://), matched by SHA-256; an image with no file
    there is left out. Without ``source`` the content is null and the executors read the image store."""
    from pyspark.sql import functions as F
    if source is None:
        return todo.withColumn("content", F.lit(None).cast("binary"))
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
             .select(F.sha2("content", 256).alias("sha256"), "content").dropDuplicates(["sha256"]))
    return todo.join(files, "sha256")


def sources(batch, store: str) -> list[tuple[int, str, Any]]:
    """(id, sha256, bytes or store path) of each image of an Arrow batch of :func:`with_files` rows."""
    from ..store import ImageStore
    image_store = ImageStore(store)
    return [(image_id, sha, image_store.path(sha) if content is None else content)
            for image_id, sha, content in zip(*(batch.column(c).to_pylist() for c in ("id", "sha256", "content")))]


def fail_once() -> None:
    """The :data:`FAIL_ONCE` fault, when the task's job set it."""
    from pyspark import TaskContext
    context = TaskContext.get()
    marker = context.getLocalProperty(FAIL_ONCE) if context else None
    if marker:
        try:
            os.remove(marker)   # atomic: one task wins
        except FileNotFoundError:
            return
        os._exit(3)


def write_output(frame, out: Path, manifest: dict) -> None:
    """``frame`` as Parquet in ``out`` (replacing an earlier output), then its manifest beside the parts.
    A folder holding anything else is refused: Spark's overwrite deletes the whole folder first."""
    if out.exists() and (not out.is_dir() or any(not p.name.startswith(("part-", "_", ".")) for p in out.iterdir())):
        raise BadInput(f"refusing to replace {out}: it holds files that are not a Spark job's output; "
                       "give --out a new or empty folder")
    frame.write.mode("overwrite").parquet(str(out))
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, sort_keys=True), encoding="utf-8")


def _partition_writer(url: str, store: str, job: str, model: tuple[int, int] | None) -> Callable:
    def write(batches):
        import pyarrow as pa
        db = worker_database(url, store)
        counts = ImportCounts()
        for batch in batches:
            fail_once()
            counts.add(write_batch(db, job, batch.to_pylist(), model))
        yield pa.RecordBatch.from_pydict({"counts": [counts.as_json()]})
    return write


_databases: dict[tuple[str, str], Database] = {}


def worker_database(url: str, store: str) -> Database:
    """The database, opened once per Python worker (Spark reuses workers across tasks)."""
    if (url, store) not in _databases:
        _databases[url, store] = Database(url, store)
    return _databases[url, store]


def store_output(spark, db: Database, out: Path, model: tuple[int, int] | None = None) -> ImportSummary:
    """The Parquet in ``out`` into the database: on PostgreSQL by the executors, a transaction per batch of
    each partition; on SQLite by :func:`~lookalike.importing.import_parts` here. Idempotent either way."""
    summary = ImportSummary(read_manifest(out)["job"], out)
    if db.dialect != "postgresql":
        import_parts(db, summary, model)
        return summary
    writer = _partition_writer(db.url.render_as_string(hide_password=False), str(db.store.root), summary.job,
                               model)
    rows = spark.read.parquet(str(out)).select(*COLUMNS[summary.job]).mapInArrow(writer, "counts string").collect()
    for row in rows:
        summary.counts.add(ImportCounts.from_json(row.counts))
    return summary
