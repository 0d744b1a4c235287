"""`lookalike spark index`: the persistent vector index rebuilt, its IVF structure filled on Spark.

It is ``lookalike index rebuild`` with one step moved: the driver writes the
matrix and id map from the database and trains the IVF quantiser on a sample
(the same sample and seed, so the same structure); the executors each take a
range of rows, add them to an empty copy of the trained structure
(``add_with_ids``, row numbers as ids) and send it back serialised; the driver
merges the copies in row order (``merge_from``) and commits the index files in
their usual format, so ``lookalike similar``, the web app and PL/Python open
it unchanged. The executors read their rows from the matrix file: on a
cluster the index folder (``<store>.index`` beside the image store) must be at
the same path on every node, as the store is.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ..config import DEFAULT_BACKBONE
from ..index import Header, IndexStatus, rebuild_index
from ..steps import INDEX_KIND
from ..vectors import faiss
from .io import fail_once, job_session
from .session import DEFAULT_MASTER

MAX_TASK_ROWS = 1 << 16   # rows one executor task adds: 330 MB of 1280-d float32 at most
PARTS_PER_CORE = 2


def index_job(db, *, master: str = DEFAULT_MASTER, backbone: str = DEFAULT_BACKBONE,
              index: str = INDEX_KIND.default, session=None) -> IndexStatus:
    """Rebuild the index of ``backbone``'s latest model, adding the IVF structure's rows on Spark."""
    with job_session(master, session) as spark:
        return rebuild_index(db, backbone=backbone, index=index, add=partial(spark_add, spark))


def spark_add(spark, ivf, path: Path, h: Header, start: int) -> None:
    """Rows ``start``.. of the matrix at ``path`` into ``ivf``, added on the executors and merged here."""
    if start >= h.rows:
        return
    sc = spark.sparkContext
    step = min(MAX_TASK_ROWS, -(-(h.rows - start) // (PARTS_PER_CORE * sc.defaultParallelism)))
    ranges = [(lo, min(lo + step, h.rows)) for lo in range(start, h.rows, step)]
    shared = sc.broadcast(faiss.serialize_index(ivf))
    try:
        frame = spark.createDataFrame(sc.parallelize(ranges, len(ranges)), "lo long, hi long")
        parts = frame.mapInPandas(lambda batches: _add_ranges(batches, shared, str(path), h.dim),
                                  "lo long, part binary").collect()
    finally:
        shared.destroy()
    for part in sorted(parts, key=lambda row: row.lo):   # row order: the lists hold what a single add gives
        ivf.merge_from(faiss.deserialize_index(np.frombuffer(part.part, dtype=np.uint8)), 0)


def _add_ranges(batches, shared, path: str, dim: int):
    """On an executor: each (lo, hi) row range added to an empty copy of the trained structure, serialised."""
    import pandas as pd

    for batch in batches:
        for lo, hi in zip(batch["lo"].tolist(), batch["hi"].tolist()):
            fail_once()   # tests: a task whose worker dies (lookalike.spark.io.FAIL_ONCE)
            part = faiss.deserialize_index(shared.value)
            part.reset()   # the structure's training only, no rows
            rows = np.fromfile(path, dtype="<f4", count=(hi - lo) * dim, offset=lo * dim * 4)
            if rows.size != (hi - lo) * dim:
                raise OSError(f"the index matrix {Path(path).name} is shorter than its header says")
            part.add_with_ids(rows.reshape(hi - lo, dim), np.arange(lo, hi, dtype=np.int64))
            yield pd.DataFrame({"lo": [lo], "part": [faiss.serialize_index(part).tobytes()]})
