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

``--vectors N`` measures the persistent vector index instead: N synthetic 1280-d embeddings
(bench/synthetic_embeddings.py) written by COPY, the index built by this process's OS user
(root) beside the image store, readable by the server's. Then ``similar_images`` by id in a
fresh psql session (wall, connect and imports included) and the memory of 8 concurrent
sessions against one, as PSS (proportional set size: a page shared by k processes counts
1/k in each, so the sum over backends counts the mapped index once); RSS is printed beside
it. The fallback (a server that cannot read the index: each backend indexes every vector
itself, today's path before the index) is measured in the same run, one session.
Goals (issue 11) at 100,000: fresh session <= 0.5 s; 8 sessions add <= 0.5 GB over one.
``--space`` fits the pca space first (`lookalike fit`, which builds its index folder), so
``similar_images`` answers there, as it does by default after a run.

    python bench/bench_plpython.py [--quick]
    python bench/bench_plpython.py --vectors 100000 [--space]
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
import threading
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
    parser.add_argument("--vectors", type=int, help="measure the vector index on this many synthetic embeddings")
    parser.add_argument("--space", action="store_true", help="with --vectors: search in a fitted pca space")
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
            if args.vectors:
                bench_index(cluster, root, store, args.vectors, args.space)
            else:
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


def memory_mb(pid: int) -> dict[str, float]:
    """Rss, Pss and Pss_Anon (private heap) of a process, MB, from /proc/PID/smaps_rollup."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return {name: int(fields[name].split()[0]) / 1024 for name in ("Rss", "Pss", "Pss_Anon")}


def write_vectors(conninfo: str, url: str, n: int) -> list[int]:
    """n synthetic embeddings of a feature model named like the default backbone, by COPY; their image ids."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic_embeddings import clustered_embeddings
    import sqlalchemy as sa
    from lookalike.db import feature_models, now
    with Database(url) as db, db.begin() as conn:
        model = conn.execute(sa.insert(feature_models).values(
            name="efficientnet-lite0", weights_sha256="b" * 64, dim=1280, input_size=224, preprocessing="bench",
            created_at=now()).returning(feature_models.c.id)).scalar_one()
    vectors = clustered_embeddings(n, seed=0)
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy("COPY lookalike.images (id, sha256, source, byte_size, status, loaded_at, label) "
                      "FROM STDIN") as copy:
            for i in range(1, n + 1):
                copy.write_row((i, f"{i:064x}", f"bench/{i}.jpg", 1, "ok", "2026-01-01T00:00:00Z", f"l{i % 10}"))
        with cur.copy("COPY lookalike.embeddings (image_id, model_id, vector) FROM STDIN") as copy:
            for i in range(1, n + 1):
                copy.write_row((i, model, vectors[i - 1].astype("<f4").tobytes()))
    return list(range(1, n + 1))


def bench_index(cluster: PostgresCluster, root: Path, store: Path, n: int, space: bool = False) -> None:
    from lookalike.index import index_dir, rebuild_index
    psql = [str(cluster.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
            str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres", "-d", "lookalike_test"]
    install(cluster.url, root / "python", store_dir=store)
    wrote, ids = timed(lambda: write_vectors(cluster.conninfo(), cluster.url, n))
    with Database(cluster.url) as db:
        if space:
            from lookalike.spaces import fit_spaces
            built, fitted = timed(lambda: fit_spaces(db))
            status = fitted.lines()[-1].strip()   # the pca space's index folder
        else:
            built, status = timed(lambda: rebuild_index(db))
            status = status.lines()[0]
        folder = index_dir(db)
    print(f"{n:,} embeddings written by COPY in {wrote:.0f} s; {'pca space fitted and its ' if space else ''}"
          f"index built by OS user {pwd.getpwuid(os.geteuid())[0]} in {built:.1f} s:\n  {status}")
    picks = [ids[(i * 7919) % n] for i in range(8)]
    search = "SELECT count(*) FROM lookalike.similar_images({}::bigint, 10)"
    timed(lambda: run(psql + ["-c", search.format(picks[0])]))   # the server's first imports: page cache warm
    baseline = [timed(lambda: run(psql + ["-c", "SELECT 1"]))[0] for _ in range(5)]
    fresh = [timed(lambda i=i: run(psql + ["-c", search.format(i)]))[0] for i in picks[:5]]
    # A first call's imports, timed inside a fresh backend: what PREAMBLE imports (lookalike.backend, which
    # answers by id from the folder), and what the long way through lookalike.plpython adds to them.
    imports = ("DO LANGUAGE plpython3u $$\nimport sys, time\nstarted = time.perf_counter()\nsys.path.insert(0, %r)\n"
               "import %s\nplpy.notice('imports %%.2f s' %% (time.perf_counter() - started))\n$$;")
    imported, long_way = (run(psql + ["-c", imports % (str(root / "python"), modules)]).stderr
                          .split("imports ")[1].split()[0]
                          for modules in ("lookalike.backend", "lookalike.backend, lookalike.plpython, lookalike.search"))

    def sessions(count: int) -> list[dict[str, float]]:
        """``count`` sessions each searching three times at once; their backends' memory, still connected."""
        conns = [psycopg.connect(cluster.conninfo(), autocommit=True) for _ in range(count)]
        try:
            def work(conn, k):
                for j in range(3):
                    conn.execute(search.format(picks[(k + j) % len(picks)])).fetchall()
            threads = [threading.Thread(target=work, args=(c, k)) for k, c in enumerate(conns)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [memory_mb(c.execute("SELECT pg_backend_pid()").fetchone()[0]) for c in conns]
        finally:
            for c in conns:
                c.close()

    one, eight = sessions(1), sessions(8)
    total = {key: sum(m[key] for m in eight) for key in one[0]}
    p50 = statistics.median
    print(f"\nsimilar_images by id, k=10, over {n:,} vectors through the index ({'pca space' if space else 'embeddings'}):")
    print(f"  fresh psql session, p50 of 5      {p50(fresh):6.2f} s   (goal <= 0.5 s; `SELECT 1` alone: "
          f"{p50(baseline):.2f} s; the backend's imports alone: {imported} s, {long_way} s with the long "
          f"way's through lookalike.plpython)")
    print(f"  one session:   PSS {one[0]['Pss']:7.0f} MB, of it private heap {one[0]['Pss_Anon']:5.0f} MB, "
          f"RSS {one[0]['Rss']:7.0f} MB")
    print(f"  8 sessions:    PSS {total['Pss']:7.0f} MB, of it private heap {total['Pss_Anon']:5.0f} MB, "
          f"RSS {total['Rss']:7.0f} MB (sums over the 8 backends)")
    print(f"  8 add over one: {(total['Pss'] - one[0]['Pss']) / 1024:.2f} GB PSS (goal <= 0.5 GB); "
          f"RSS would say {(total['Rss'] - one[0]['Rss']) / 1024:.2f} GB, counting the shared pages 8 times")

    folder.chmod(0o700)   # the server can no longer read it: the fallback, each backend indexing for itself
    try:
        fallback, _ = timed(lambda: run(psql + ["-c", search.format(picks[0])]))
        alone = sessions(1)[0]
    finally:
        folder.chmod(0o755)
    print(f"  fallback (index unreadable), fresh session {fallback:6.2f} s; one session PSS {alone['Pss']:.0f} MB, "
          f"private heap {alone['Pss_Anon']:.0f} MB")


if __name__ == "__main__":
    main()
