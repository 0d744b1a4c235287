"""``lookalike spark hash``: the hash step's per-image work (:func:`lookalike.hashing.hash_one`) on Spark's
executors, over Arrow batches of the images not hashed yet; Parquet out, then into ``image_hashes`` and
``hashed_images`` through the step's own write function."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from ..db import Database, recorded_run
from ..hashing import (DRAFT_HASHER_VERSION, HASHER_VERSION, HashSummary, hash_one, hash_records, hashed_count,
                       unhashed)
from ..phash import DRAFT_SIZE, check_sizes
from ..steps import SPARK_MASTER
from .io import (SparkSummary, fail_once, job_session, output_dir, sources, store_output, todo_frame, with_files,
                 write_output)

def _hasher(store: str, dsizes: list[int], isizes: list[int], draft: bool, hasher: str):
    def run(batches):
        import pyarrow as pa   # the spark extra: imported where the work runs
        schema = _arrow_schema()
        for batch in batches:
            fail_once()
            rows = []
            for image_id, sha, source in sources(batch, store):
                hashes, low, reason = hash_one(source, dsizes, isizes, DRAFT_SIZE if draft else None)
                records = [{k: r[k] for k in ("kind", "size", "hex", "value", "bits")}
                           for r in hash_records(image_id, hashes, hasher)] if hashes else None
                rows.append({"image_id": image_id, "sha256": sha, "reason": reason, "hasher": hasher,
                             "low_detail": low, "hashes": records})
            yield pa.RecordBatch.from_pylist(rows, schema=schema)
    return run


def _arrow_schema():
    import pyarrow as pa
    hashes = pa.struct([("kind", pa.string()), ("size", pa.int32()), ("hex", pa.string()), ("value", pa.int64()),
                        ("bits", pa.int32())])
    return pa.schema([("image_id", pa.int64()), ("sha256", pa.string()), ("reason", pa.string()),
                      ("hasher", pa.string()), ("low_detail", pa.bool_()), ("hashes", pa.list_(hashes))])


def spark_hash(db: Database, *, master: str = SPARK_MASTER.default, out: Path | None = None,
               source: str | None = None, imagehash_sizes: Iterable[int] = (8,), draft: bool = False, session=None) -> SparkSummary:
    """The hash step on Spark: every ok image not hashed yet, Parquet into ``out`` (default beside the store),
    then into the database. ``source``: read the files there instead of the image store (see
    :func:`~lookalike.spark.io.with_files`). ``session``: an open SparkSession to use instead of starting one
    on ``master``."""
    dsizes, isizes = check_sizes(range(1, 9), imagehash_sizes)
    from pyspark.sql.pandas.types import from_arrow_schema   # the spark extra; the one schema is Arrow's
    hasher = DRAFT_HASHER_VERSION if draft else HASHER_VERSION
    folder = output_dir(db, "hash", out)
    summary = HashSummary()
    params = {"imagehash_sizes": isizes, "draft": draft, "hasher": hasher, "master": master, "out": str(folder),
              "source": source}
    started = time.monotonic()
    with recorded_run(db, "spark-hash", params) as counts, job_session(master, session) as spark:
        with db.engine.connect() as conn:
            summary.already = hashed_count(conn)
        todo = with_files(spark, todo_frame(spark, db, unhashed()), source)
        frame = todo.mapInArrow(_hasher(str(db.store.root), dsizes, isizes, draft, hasher),
                                from_arrow_schema(_arrow_schema()))
        write_output(frame, folder, {"job": "hash", "hasher": hasher})
        stored = store_output(spark, db, folder)
        summary.hashed, summary.low_detail = stored.counts.written, stored.counts.low_detail
        summary.failed = stored.counts.failed
        summary.seconds = time.monotonic() - started
        counts.update(hashed=summary.hashed, low_detail=summary.low_detail, failed=dict(summary.failed),
                      rejected=stored.counts.rejected)
    return SparkSummary(summary, folder, stored)
