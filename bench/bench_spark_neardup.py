"""`lookalike spark neardup` on synthetic 64-bit hashes: wall time, and no pair missed.

Random 64-bit hashes with planted near-copies (0..8 bits flipped, some chained:
bench_neardup's generator) are written as a Parquet of (image_id, value); the
job reads it, searches on Spark and writes the pairs as Parquet. Checks: every
planted pair within the radius is found, and for a sample of hashes the pairs
equal a NumPy brute force of each sampled hash against all the others.
Target: 10,000,000 hashes at radius 8 in local[2] within 15 minutes, 0 missed.

    python bench/bench_spark_neardup.py [--quick] [--hashes N] [--radius R] [--master local[2]] [--sample S]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_neardup import planted_hashes

from lookalike.db import Database
from lookalike.spark.neardup import neardup_job
from lookalike.spark.session import spark_session


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and all under it (the JVM, the Python workers), from /proc (Linux):
    what the job costs whatever else the machine runs."""
    below: dict[int, list[int]] = {}
    spent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue   # gone meanwhile
        pid = int(stat.parent.name)
        below.setdefault(int(fields[1]), []).append(pid)
        spent[pid] = sum(int(f) for f in fields[11:15])   # utime, stime, and of reaped children
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += spent.get(pid, 0)
        todo += below.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def brute_pairs(hashes: np.ndarray, rows: np.ndarray, radius: int) -> set[tuple[int, int, int]]:
    """(i, j, distance), i < j, for every pair holding one of ``rows``: each compared with all hashes."""
    found = set()
    for i in rows.tolist():   # one row at a time: a block of rows against 10M hashes would take GBs
        dist = np.bitwise_count(hashes ^ hashes[i])
        for j in np.flatnonzero(dist <= radius).tolist():
            if i != j:
                found.add((min(i, j), max(i, j), int(dist[j])))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 hashes, a 300-hash sample")
    parser.add_argument("--hashes", type=int, default=10_000_000)
    parser.add_argument("--radius", type=int, default=8)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--sample", type=int, default=2000, help="hashes checked by brute force")
    args = parser.parse_args()
    n, sample = (200_000, 300) if args.quick else (args.hashes, args.sample)

    hashes, planted = planted_hashes(n, seed=12)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "hashes.parquet", Path(tmp) / "pairs"
        # image ids 1..n: row k is image k + 1
        pq.write_table(pa.table({"image_id": np.arange(1, n + 1, dtype=np.int64),
                                 "value": hashes.view(np.int64)}), source)
        started = time.monotonic()
        # The driver collects the hashes and broadcasts them: 1 GB of JVM heap (the default) is too
        # little at 10 million (an OutOfMemoryError in one run of three); a job is given more the same way.
        os.environ.setdefault("PYSPARK_SUBMIT_ARGS", "--driver-memory 3g pyspark-shell")
        spark_session(args.master, "bench_spark_neardup")
        session_s = time.monotonic() - started
        started, cpu = time.monotonic(), tree_cpu_seconds()
        with Database(f"sqlite:///{tmp}/bench.db", Path(tmp) / "store") as db:   # the job's --db; unused here
            summary = neardup_job(db, master=args.master, out=out, hashes=str(source), hash_kind="dhash", size=8,
                                  max_distance=args.radius)
        job_s, cpu = time.monotonic() - started, tree_cpu_seconds() - cpu
        pairs = pq.read_table(out).to_pandas()
    a = pairs["image_id_a"].to_numpy() - 1
    b = pairs["image_id_b"].to_numpy() - 1
    keys = np.sort(a * n + b)

    close = np.bitwise_count(hashes[planted[0]] ^ hashes[planted[1]]) <= args.radius
    planted_keys = np.unique(planted[0][close] * n + planted[1][close])
    planted_missed = int((~np.isin(planted_keys, keys)).sum())

    rows = np.random.default_rng(5).choice(n, sample, replace=False)
    expected = brute_pairs(hashes, rows, args.radius)
    mine = np.isin(a, rows) | np.isin(b, rows)
    got = set(zip(a[mine].tolist(), b[mine].tolist(), pairs["distance"].to_numpy()[mine].tolist()))
    sample_missed, sample_extra = len(expected - got), len(got - expected)

    print(f"{n:,} hashes, radius {args.radius}, {args.master}: {summary.pairs:,} pairs, {summary.tasks} search "
          f"tasks, job {job_s:.1f} s (+ {session_s:.1f} s Spark start)")
    print(f"CPU of the job in all its processes (driver, JVM, Python workers): {cpu:.0f} s; "
          f"on {os.cpu_count()} idle cores about {cpu / os.cpu_count():.0f} s")
    print(f"planted pairs within the radius: {len(planted_keys):,}, missed {planted_missed}")
    print(f"brute-force sample of {sample:,} hashes against all: {len(expected):,} pairs, missed {sample_missed}, "
          f"extra {sample_extra}")
    print(f"goal: 10,000,000 within 900 s: {'met' if job_s <= 900 or n < 10_000_000 else 'NOT met'}")
    return 1 if planted_missed or sample_missed or sample_extra or len(np.unique(keys)) != len(keys) else 0


if __name__ == "__main__":
    raise SystemExit(main())
