"""`lookalike spark neardup`: the near rule's all-pairs Hamming search on Spark's executors.

The driver plans the search (:class:`lookalike.neardup.Search`, the same
multi-index hashing :func:`~lookalike.neardup.pairs_within` runs), broadcasts
the hashes with their image ids (16 bytes a 64-bit hash: 160 MB for ten
million) and runs each search task as one Spark task, longest first. A Python
worker builds a chunk's table once and keeps it for its next tasks. Each pair
is found by one task only, so the pairs are exactly those of ``pairs_within``;
they are written as Parquet (``image_id_a < image_id_b``, ``distance``).

From the database's hashes the job is a dedupe run with the near rule whose
pairs come from Spark: the dedupe step loads the hashes, calls this search
and groups the pairs by its own rules. From a Parquet of hashes it writes the
pairs only.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dedupe import DedupeSummary, dedupe_images, hash_bits, hash_matrix, rule_hash
from ..errors import BadInput
from ..neardup import Search
from .io import fail_once, job_session, output_dir
from .session import DEFAULT_MASTER

PAIRS_SCHEMA = "image_id_a long, image_id_b long, distance short"
# Spark tasks per core, each running several search tasks of about equal total cost: a Spark task
# costs about a second, so one per search task (57 for 3,000 hashes at radius 8) would cost more
# than the search; a few per core let a core that finishes early take another.
PARTS_PER_CORE = 4

_searches: dict[str, tuple[np.ndarray, Search]] = {}   # per Python worker: the broadcast's ids and search


@dataclass
class NeardupSummary:
    hashes: int
    max_distance: int
    tasks: int
    pairs: int
    out: Path
    seconds: float
    dedupe: DedupeSummary | None = None
    left_out: int = 0            # --hashes rows without an image id or a readable hash

    def lines(self) -> list[str]:
        out = [f"spark neardup: {self.pairs} pairs within {self.max_distance} bits among {self.hashes} hashes "
               f"({self.tasks} tasks, {self.seconds:.1f} s), written to {self.out}"]
        if self.left_out:
            out.append(f"  left out: {self.left_out} rows without an image id or a readable hash")
        return out + (self.dedupe.lines() if self.dedupe else [])


def neardup_job(db, *, master: str = DEFAULT_MASTER, out: Path | None = None, hashes: str | None = None,
                hash_kind: str | None = None, size: int | None = None, max_distance: int | None = None,
                per_label: bool = False, include_low_detail: bool = False, session=None) -> NeardupSummary:
    """Pairs within ``max_distance`` as Parquet at ``out``; from the database also a near-rule dedupe run.

    ``hashes``: a Parquet of ``image_id`` and ``value`` (the signed 64-bit form)
    or ``hex`` to search instead of the database (rows of other kinds or
    sizes are left out where it has ``kind`` and ``size`` columns). The hash
    kind, size and radius default as ``lookalike dedupe --rule near`` has them.
    ``out`` defaults to ``<store>.spark/neardup``; ``session``: a running Spark session to use.
    """
    started = time.monotonic()
    kind, size, max_distance = rule_hash("near", hash_kind, size, max_distance)
    out = output_dir(db, "neardup", out)
    seen = {"hashes": 0, "tasks": 0, "pairs": 0}
    with job_session(master, session) as spark:
        def search(ids: np.ndarray, words: np.ndarray, radius: int):
            a, b, distance = spark_pairs(spark, ids, words, radius, str(out))
            tasks = _tasks(Search(words, radius), spark.sparkContext.defaultParallelism)
            seen.update(hashes=len(ids), tasks=len(tasks), pairs=len(a))
            return np.searchsorted(ids, a), np.searchsorted(ids, b), distance

        if hashes is None:
            summary = dedupe_images(db, rule="near", hash_kind=kind, size=size, max_distance=max_distance,
                                    per_label=per_label, include_low_detail=include_low_detail, pair_search=search)
            if summary.images < 2:   # the dedupe step had nothing to compare: still leave a (empty) result
                search(np.zeros(0, np.int64), np.zeros(0, np.uint64), max_distance)
        else:
            summary = None
            ids, words, left_out = read_hashes(spark, hashes, kind, size)
            seen["left_out"] = left_out
            search(ids, words, max_distance)
    return NeardupSummary(seen["hashes"], max_distance, seen["tasks"], seen["pairs"], out,
                          time.monotonic() - started, summary, seen.get("left_out", 0))


def read_hashes(spark, path: str, kind: str, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(image ids ascending, uint64 hash words, rows left out) from a Parquet of hashes; a row without an id
    or a readable hash is left out and counted."""
    frame = spark.read.parquet(path)
    columns = set(frame.columns)
    if "image_id" not in columns or not columns & {"value", "hex"}:
        raise BadInput(f"{path}: a Parquet of hashes needs an image_id column and a value or hex column, "
                       f"not {', '.join(sorted(columns))}")
    if {"kind", "size"} <= columns:
        frame = frame.where((frame.kind == kind) & (frame.size == size))
    bits = hash_bits(kind, size)
    use = "value" if "value" in columns and bits <= 64 else "hex"
    if use not in columns:
        raise BadInput(f"{path}: {kind} size {size} hashes ({bits} bits) need a hex column")
    frame = frame.select("image_id", use)
    total = frame.count()
    # Nulls go before pandas sees them: a long column with a null would arrive as float, losing bits.
    rows = frame.where(frame.image_id.isNotNull() & frame[use].isNotNull()).toPandas()
    if use == "hex":   # hex digits, no more than the hash holds (hash_matrix checks the rest)
        rows = rows[rows[use].str.fullmatch(f"[0-9a-fA-F]{{1,{-(-bits // 4)}}}").astype(bool)]
    rows = rows.sort_values("image_id", kind="stable")
    ids = rows["image_id"].to_numpy(np.int64)
    if np.any(ids[1:] == ids[:-1]):
        raise BadInput(f"{path}: image {ids[1:][ids[1:] == ids[:-1]][0]} has more than one {kind} size {size} hash")
    values = rows[use].tolist()
    if use == "value":
        words = np.array(values, dtype=np.int64).view(np.uint64)
    elif bits <= 64:
        words = np.array([int(text, 16) for text in values], dtype=np.uint64)
    else:
        words = hash_matrix(kind, size, bits, values, [])
    return ids, words, total - len(ids)


def spark_pairs(spark, ids: np.ndarray, words: np.ndarray, max_distance: int,
                out: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair within ``max_distance``, found on the executors and written to ``out`` (Parquet, replaced).

    ``ids`` ascend, one per row of ``words``. Returns (image id a, image id b,
    distance) sorted by (a, b): the pairs of ``pairs_within`` under these ids.
    """
    sc = spark.sparkContext
    search = Search(words, max_distance)
    tasks = _tasks(search, sc.defaultParallelism)
    if tasks:
        shared = sc.broadcast((ids, search.words))
        parts = _balanced(tasks, search.cost, min(len(tasks), PARTS_PER_CORE * sc.defaultParallelism))
        frame = spark.createDataFrame(sc.parallelize(parts, len(parts)).flatMap(lambda part: part),
                                      "chunk int, source int, lo long, hi long")
        key = uuid.uuid4().hex   # names this search in the workers' cache
        pairs = frame.mapInPandas(lambda batches: _run_tasks(batches, key, shared, max_distance), PAIRS_SCHEMA)
    else:
        shared, pairs = None, spark.createDataFrame([], PAIRS_SCHEMA)
    try:
        pairs.write.mode("overwrite").parquet(out)
    finally:
        if shared is not None:
            shared.destroy()
    found = spark.read.parquet(out).toPandas().sort_values(["image_id_a", "image_id_b"])
    return (found["image_id_a"].to_numpy(np.int64), found["image_id_b"].to_numpy(np.int64),
            found["distance"].to_numpy(np.int16))


def _tasks(search: Search, parallelism: int) -> list[tuple[int, int, int, int]]:
    """The search's tasks, cut into row ranges where one would be more than a Spark task's share of the
    work (at 10 million hashes the largest is 3.4% of it: cut once there are more than about 8 cores)."""
    tasks = search.tasks()
    costs = [search.cost(task) for task in tasks]
    parts = math.ceil(max(costs, default=0) * PARTS_PER_CORE * parallelism / max(sum(costs), 1))
    return search.tasks(parts) if parts > 1 else tasks


def _balanced(tasks: list, cost, bins: int) -> list[list]:
    """``tasks`` in ``bins`` lists of about equal cost: the costliest first, each to the lightest bin."""
    parts: list[list] = [[] for _ in range(bins)]
    load = [0] * bins
    for task in sorted(tasks, key=cost, reverse=True):
        lightest = load.index(min(load))
        parts[lightest].append(task)
        load[lightest] += cost(task)
    return parts


def _run_tasks(batches, key: str, shared, max_distance: int):
    """On an executor: run the search tasks in ``batches`` and yield their pairs under image ids."""
    import pandas as pd

    if key not in _searches:   # key: one per search (a worker's Broadcast object carries no id)
        _searches.clear()   # one search at a time: a worker keeps only the latest broadcast's tables
        ids, words = shared.value
        _searches[key] = ids, Search(words, max_distance)
    ids, search = _searches[key]
    for batch in batches:
        for task in zip(*(batch[column].tolist() for column in ("chunk", "source", "lo", "hi"))):
            fail_once()   # tests: a task whose worker dies (lookalike.spark.io.FAIL_ONCE)
            i, j, distance = search.pairs([search.run(task)])
            yield pd.DataFrame({"image_id_a": ids[i], "image_id_b": ids[j], "distance": distance})
