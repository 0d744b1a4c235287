"""``lookalike spark featurize``: the featurize step's engine (:func:`lookalike.backbones.embed_sources`) on
Spark's executors, the backbone loaded once per Python worker, over Arrow batches of the images with no
embedding yet; Parquet out, then into ``embeddings`` through the step's own write function, then the fitted
spaces and the vector index catch up, as after ``lookalike featurize``."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import DEFAULT_BACKBONE
from ..db import Database, recorded_run, vector_bytes
from ..features import FeaturizeSummary, embedded_count, feature_model_id, unembedded
from ..importing import after_embeddings
from ..steps import SPARK_MASTER, check, default
from .io import (SparkSummary, fail_once, job_session, output_dir, sources, store_output, todo_frame, with_files,
                 write_output)

YIELD_ROWS = 256   # rows per Arrow batch handed back: memory stays flat on a long partition


def _embedder(store: str, backbone: str, device: str, batch_size: int):
    def run(batches):
        import pyarrow as pa
        import torch
        from pyspark import TaskContext
        from ..backbones import embed_sources, load_backbone
        # The task's decoding workers and the model's threads share the task's cores (spark.task.cpus), not
        # every core of the machine with the other tasks; set before the first load, which sizes ONNX
        # Runtime's pool from it.
        cpus = max(1, TaskContext.get().cpus())
        torch.set_num_threads(cpus)
        # load_backbone keeps the model per process, and Spark reuses its Python workers: one load per worker.
        model = load_backbone(backbone, device=device)
        schema = _arrow_schema()
        for batch in batches:
            fail_once()
            items = sources(batch, store)
            shas = {image_id: sha for image_id, sha, _source in items}
            rows = []
            for image_id, vector, reason in embed_sources(
                    model, ((image_id, source) for image_id, _sha, source in items), batch_size=batch_size,
                    workers=cpus):
                rows.append({"image_id": image_id, "sha256": shas[image_id], "reason": reason,
                             "vector": None if vector is None else vector_bytes(vector)})
                if len(rows) >= YIELD_ROWS:
                    yield pa.RecordBatch.from_pylist(rows, schema=schema)
                    rows = []
            if rows:
                yield pa.RecordBatch.from_pylist(rows, schema=schema)
    return run


def _arrow_schema():
    import pyarrow as pa   # the spark extra: imported where the work runs
    return pa.schema([("image_id", pa.int64()), ("sha256", pa.string()), ("reason", pa.string()),
                      ("vector", pa.binary())])


def spark_featurize(db: Database, *, master: str = SPARK_MASTER.default, out: Path | None = None,
                    source: str | None = None, backbone: str = DEFAULT_BACKBONE,
                    device: str = default("featurize", "device"), batch_size: int = default("featurize", "batch_size"),
                    session=None) -> SparkSummary:
    """The featurize step on Spark: every ok image with no embedding for ``backbone``, Parquet into ``out``
    (default beside the store), then into the database. ``source``: read the files there instead of the image
    store (see :func:`~lookalike.spark.io.with_files`). ``session``: an open SparkSession to use instead of
    starting one on ``master``."""
    check("featurize", batch_size=batch_size)
    from pyspark.sql.pandas.types import from_arrow_schema   # the spark extra; the one schema is Arrow's
    from ..backbones import load_backbone
    model = load_backbone(backbone, device=device)   # here first: the model's row, and the ONNX file cached
    folder = output_dir(db, f"featurize-{backbone}", out)
    summary = FeaturizeSummary(model=backbone)
    params = {"backbone": backbone, "device": device, "batch_size": batch_size, "master": master, "out": str(folder),
              "source": source}
    started = time.monotonic()
    with recorded_run(db, "spark-featurize", params) as counts, job_session(master, session) as spark:
        model_id = feature_model_id(db, model)
        with db.engine.connect() as conn:
            summary.already = embedded_count(conn, model_id)
        todo = with_files(spark, todo_frame(spark, db, unembedded(model_id)), source)
        frame = todo.mapInArrow(_embedder(str(db.store.root), backbone, device, batch_size),
                                from_arrow_schema(_arrow_schema()))
        info = model.info
        write_output(frame, folder, {"job": "featurize", "model": {"name": info.name,
                                                                   "weights_sha256": info.weights_sha256}})
        stored = store_output(spark, db, folder, (model_id, model.info.dim))
        summary.embedded, summary.failed = stored.counts.written, stored.counts.failed
        summary.projected = after_embeddings(db, model_id)
        summary.seconds = time.monotonic() - started
        counts.update(embedded=summary.embedded, already=summary.already, failed=dict(summary.failed),
                      rejected=stored.counts.rejected)
    return SparkSummary(summary, folder, stored)
