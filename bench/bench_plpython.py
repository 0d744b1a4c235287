"""The pipeline as PL/Python procedures against the same steps from the CLI on SQLite, in one run.

- ``CALL lookalike.run_once('<samples>')`` through psql (a fresh session: it imports
  lookalike, torch and the rest inside the server) against ``lookalike run <samples>``
  on a SQLite file (a fresh process: the same imports).
- ``similar_images`` for a stored image: p50 of repeated calls in one warm session
  against the same function called in-process on SQLite, and a fresh session per call
  (connect, import, load the model and the collection) against a fresh
  ``lookalike similar`` process.
- ``lookalike db install``: the first time (copying, hard links where possible) and again
  (the folder already holds the same packages).

The server is a throwaway PostgreSQL 15 (tests/support/pg.py), run as OS user postgres.

    python bench/bench_plpython.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from lookalike.db import Database
from lookalike.plpython import install
from lookalike.samples import render_samples
from lookalike.search import similar_images

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for support.pg
from support.pg import PostgresCluster  # noqa: E402

CLI = str(REPO / ".venv" / "bin" / "lookalike")


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {result.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 images per label, fewer repetitions")
    args = parser.parse_args()
    per_label, calls, fresh = (8, 20, 3) if args.quick else (30, 100, 5)

    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lkbench-plpy-"))  # the server must be able to enter it
    try:
        root.chmod(0o755)
        samples = root / "samples"
        render_samples(samples, per_label=per_label, seed=3)
        store = root / "store"
        store.mkdir()
        user = pwd.getpwnam("postgres")
        os.chown(store, user.pw_uid, user.pw_gid)
        with PostgresCluster() as cluster:
            bench(cluster, root, samples, store, calls, fresh)
    finally:
        shutil.rmtree(root)


def bench(cluster: PostgresCluster, root: Path, samples: Path, store: Path, calls: int, fresh: int) -> None:
    psql = [str(cluster.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(cluster.socket_dir),
            "-p", str(cluster.port), "-U", "postgres", "-d", "lookalike_test"]
    first, summary = timed(lambda: install(cluster.url, root / "python", store_dir=store))
    again, _ = timed(lambda: install(cluster.url, root / "python", store_dir=store))
    print(f"db install: {first:.1f} s the first time ({summary.linked} files hard-linked, {summary.copied} copied, "
          f"{summary.megabytes:.0f} MB), {again:.1f} s again (same packages; most of it is the server's import check)")

    sqlite_url = f"sqlite:///{root}/cli.db"
    pg_run, _ = timed(lambda: run(psql + ["-c", f"CALL lookalike.run_once('{samples}')"]))
    cli_run, _ = timed(lambda: run([CLI, "--db", sqlite_url, "-q", "run", str(samples)]))
    with Database(sqlite_url) as db, db.engine.connect() as conn:
        images = conn.exec_driver_sql("SELECT count(*) FROM images WHERE status = 'ok'").scalar()
        ids = [r[0] for r in conn.exec_driver_sql("SELECT image_id FROM embeddings ORDER BY image_id")]
    print(f"\nrun_once on {images} images (load, hash, dedupe, featurize, split, train, evaluate, rank):")
    print(f"  psql CALL lookalike.run_once   {pg_run:7.1f} s")
    print(f"  lookalike run (SQLite)         {cli_run:7.1f} s")
    print(f"  ratio psql / CLI               {pg_run / cli_run:7.2f}")

    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        pg_ids = [r[0] for r in conn.execute("SELECT image_id FROM lookalike.embeddings ORDER BY image_id")]
        warmup, _ = timed(lambda: conn.execute("SELECT * FROM lookalike.similar_images(%s::bigint, 10)",
                                               [pg_ids[0]]).fetchall())
        in_session = [timed(lambda i=i: conn.execute("SELECT * FROM lookalike.similar_images(%s::bigint, 10)",
                                                     [pg_ids[i % len(pg_ids)]]).fetchall())[0]
                      for i in range(calls)]
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{backend}/status").read_text().splitlines()
                   if line.startswith("VmRSS:")) / 1024
    with Database(sqlite_url) as db:
        similar_images(db, ids[0], k=10)
        in_process = [timed(lambda i=i: similar_images(db, ids[i % len(ids)], k=10))[0] for i in range(calls)]
    pg_fresh = [timed(lambda i=i: run(psql + ["-c", f"SELECT * FROM lookalike.similar_images({pg_ids[i]}, 10)"]))[0]
                for i in range(fresh)]
    cli_fresh = [timed(lambda i=i: run([CLI, "--db", sqlite_url, "similar", str(ids[i]), "--top", "10"]))[0]
                 for i in range(fresh)]
    p50 = statistics.median
    print(f"\nsimilar_images, k=10, stored image ({calls} calls warm, {fresh} fresh):")
    print(f"  one psql session, p50          {p50(in_session) * 1000:7.1f} ms   (its first call: {warmup:.2f} s)")
    print(f"  in-process on SQLite, p50      {p50(in_process) * 1000:7.1f} ms")
    print(f"  fresh psql session, p50        {p50(pg_fresh):7.2f} s")
    print(f"  fresh `lookalike similar`, p50 {p50(cli_fresh):7.2f} s")
    print(f"  ratio warm psql / in-process   {p50(in_session) / p50(in_process):7.2f}")
    print(f"  ratio fresh psql / fresh CLI   {p50(pg_fresh) / p50(cli_fresh):7.2f}")
    print(f"  memory of that warm session's backend: {rss:.0f} MB resident (packages, model, collection)")


if __name__ == "__main__":
    main()
