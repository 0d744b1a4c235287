"""Hostile calls of the PL/Python routines, on a throwaway PostgreSQL 15 with them installed.

Each probe of issue 10 (parts 1, 4 and the settings bullet of 6) is replayed from a real
client: psql, or psycopg where a probe needs a second session. Every probe asserts a clear
error with its SQLSTATE, no hang (pytest-timeout, plus statement_timeout or a cancel from
another session), and that no rows were lost or doubled.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from lookalike.net import PRIVATE_URLS_ENV
from lookalike.plpython import install
from lookalike.samples import render_samples
from support.http import LocalHTTPServer
from support.pg import PostgresCluster
from test_plpython import psql, rows, server_owned, server_readable

pytestmark = pytest.mark.postgres
NAME = "hostile_procedures"
# What a probe must leave as it was: counts, and distinct keys where a doubled row would show.
SNAPSHOT = ("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM image_hashes), "
            "(SELECT count(*) FROM embeddings), (SELECT count(DISTINCT image_id) FROM embeddings), "
            "(SELECT count(*) FROM dedupe_runs), (SELECT count(*) FROM duplicate_groups), "
            "(SELECT count(*) FROM splits), (SELECT count(*) FROM ranking_results)")


@pytest.fixture(scope="module")
def procs(pg_cluster: PostgresCluster):
    """One database with the routines installed and images loaded, hashed and embedded from psql."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lkhostile-"))  # the server must enter it
    root.chmod(0o755)
    render_samples(root / "samples", per_label=4, seed=5)
    server_readable(root / "samples")
    url = pg_cluster.create_database(NAME)
    store = server_owned(root / "store", pg_cluster)
    install(url, root / "python", store_dir=store)
    ready = psql(pg_cluster, "CALL lookalike.load_images(:'samples'); CALL lookalike.hash_images(); "
                             "CALL lookalike.featurize_images()", NAME, samples=str(root / "samples"))
    assert ready.returncode == 0, ready.stderr
    query = rows(url, "SELECT min(image_id) FROM embeddings")[0][0]
    yield SimpleNamespace(url=url, root=root, store=store, query=query)
    shutil.rmtree(root, ignore_errors=True)


def answers(cluster: PostgresCluster, statements: list[str], user: str = "postgres", **variables) -> list[str]:
    """Run each statement in one psql session that goes on after errors; the messages of each, in order."""
    script = "\\set ON_ERROR_STOP 0\n\\set VERBOSITY verbose\n" + "".join(
        f"\\warn ==> {number}\n{sql}\n" for number, sql in enumerate(statements))
    result = psql(cluster, script, NAME, user=user, **variables)
    found = re.split(r"==> \d+\n", result.stderr)[1:]
    assert len(found) == len(statements), result.stderr
    return found


def snapshot(url: str) -> list[tuple]:
    return rows(url, SNAPSHOT)


@pytest.mark.timeout(300)
def test_procedures_refuse_a_transaction_block_and_change_nothing(procs, pg_cluster):
    before = snapshot(procs.url)
    refused = answers(pg_cluster, [
        # Probe 1a: hung for ever (a lock wait across two sessions the deadlock detector cannot see).
        "BEGIN; DELETE FROM lookalike.images WHERE label = 'dotted'; CALL lookalike.dedupe(); ROLLBACK;",
        # Probe 1b: said "already had one" for every image and left 0 embeddings.
        "BEGIN; DELETE FROM lookalike.embeddings; CALL lookalike.featurize_images(); COMMIT;",
        # Nested in a DO block inside BEGIN: just as atomic.
        "BEGIN; DO $$ BEGIN CALL lookalike.hash_images(); END $$; ROLLBACK;",
    ])
    for answer, routine in zip(refused, ["dedupe", "featurize_images", "hash_images"]):
        assert (f"ERROR:  25001: lookalike.{routine}: CALL it as a statement of its own, outside BEGIN ... COMMIT: "
                f"each step commits its own work as it goes") in answer, answer
        assert 'File "' not in answer and "started" not in answer  # refused before anything ran
    assert snapshot(procs.url) == before

    # A client that opens a transaction for you (psycopg's default) gets the same error as an exception.
    with psycopg.connect(pg_cluster.conninfo(NAME)) as conn:
        with pytest.raises(psycopg.errors.ActiveSqlTransaction, match="lookalike.hash_images: CALL it as a statement of its own"):
            conn.execute("CALL lookalike.hash_images()")
    # On their own (and from a DO block at top level) they run as before.
    ran = answers(pg_cluster, ["CALL lookalike.hash_images();", "DO $$ BEGIN CALL lookalike.hash_images(); END $$;"])
    assert all("0 hashed" in answer and "ERROR" not in answer for answer in ran), ran
    assert snapshot(procs.url) == before


@pytest.mark.timeout(300)
def test_similar_images_refuses_a_transaction_that_wrote_or_locked(procs, pg_cluster):
    before = snapshot(procs.url)
    ask = f"SELECT image_id FROM lookalike.similar_images({procs.query}::bigint, 3);"
    found = answers(pg_cluster, [
        f"BEGIN; DELETE FROM lookalike.images WHERE label = 'dotted'; {ask} ROLLBACK;",
        f"BEGIN; LOCK TABLE lookalike.embeddings; {ask} ROLLBACK;",  # its own connection would wait for ever
    ])
    for answer in found:
        assert ("ERROR:  25001: lookalike.similar_images: this transaction has uncommitted changes or locks, "
                "which the search cannot see or would wait for") in answer, answer
    # Reading first is fine: nothing it holds is in the way.
    script = f"BEGIN; SELECT count(*) FROM lookalike.images; {ask} COMMIT;"
    result = psql(pg_cluster, script, NAME)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 1 + 3
    assert snapshot(procs.url) == before


def _loopbacks(conn) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lookalike procedure'"
                        ).fetchone()[0]


def _psql_args(cluster: PostgresCluster, *statements: str) -> list[str]:
    """psql running each statement on its own (one -c with two statements would be one transaction)."""
    return [str(cluster.bin_dir / "psql"), "-X", "-q", "-v", "VERBOSITY=verbose", "-h", str(cluster.socket_dir),
            "-p", str(cluster.port), "-U", "postgres", "-d", NAME] + [arg for sql in statements for arg in ("-c", sql)]


@pytest.mark.timeout(300)
def test_a_procedure_waiting_on_a_lock_stops_on_timeout_cancel_and_terminate(procs, pg_cluster):
    before = snapshot(procs.url)
    watcher = psycopg.connect(pg_cluster.conninfo(NAME), autocommit=True)
    gate = psycopg.connect(pg_cluster.conninfo(NAME))
    # The step's connection back waits on this lock, where no progress is ever written.
    gate.execute("LOCK TABLE lookalike.dedupe_runs IN ACCESS EXCLUSIVE MODE")

    def waiting() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if watcher.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                               "WHERE a.application_name = 'lookalike procedure' AND NOT l.granted").fetchone()[0]:
                return
            time.sleep(0.05)
        raise AssertionError("the procedure never reached the lock")

    def stopped_by(how: str) -> tuple[str, float]:
        call = subprocess.Popen(_psql_args(pg_cluster, "CALL lookalike.dedupe(rule => 'exact')"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            waiting()
            asked = time.monotonic()
            watcher.execute(f"SELECT count(pg_{how}_backend(pid)) FROM pg_stat_activity "
                            "WHERE query LIKE 'CALL lookalike.dedupe%'")
            stderr = call.communicate(timeout=60)[1]
            return stderr, time.monotonic() - asked
        finally:
            if call.poll() is None:
                call.kill()
                call.wait()

    try:
        timed_out = subprocess.run(_psql_args(pg_cluster, "SET statement_timeout = '2s'",
                                              "CALL lookalike.dedupe(rule => 'exact')"),
                                   capture_output=True, text=True, timeout=60)
        cancelled, _ = stopped_by("cancel")
        terminated, _ = stopped_by("terminate")
        assert gate.execute("SELECT 1").fetchone() == (1,)  # the gate's transaction is untouched
    finally:
        gate.rollback()
        gate.close()
    assert "ERROR:  57014: lookalike.dedupe: canceling statement due to statement timeout" in timed_out.stderr
    assert "ERROR:  57014: lookalike.dedupe: canceling statement due to user request" in cancelled
    assert "FATAL:  57P01: terminating connection due to administrator command" in terminated
    # Their connections back went with them; nothing was written, nothing crashed.
    deadline = time.monotonic() + 30
    while _loopbacks(watcher) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _loopbacks(watcher) == 0
    watcher.close()
    assert snapshot(procs.url) == before
    assert "terminated by signal" not in (pg_cluster.dir / "server.log").read_text()


@pytest.mark.timeout(300)
def test_a_step_that_computes_without_progress_stops_on_statement_timeout(procs, pg_cluster):
    # A step that neither writes progress nor waits on its connections back: a long pure-Python loop,
    # run as the routines run their steps. Bounded itself (60 s), so a failure cannot spin for ever.
    spin = f"""
CREATE FUNCTION pg_temp.spin() RETURNS text LANGUAGE plpython3u AS $body$
import sys, time
sys.path.insert(0, {json.dumps(str(procs.root / "python"))})
import lookalike.plpython as procedures
def step():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass
    return "not stopped"
interrupts = procedures._Interrupts()
try:
    answer = procedures._watched(interrupts, step)
except KeyboardInterrupt:
    answer = "interrupted"
with interrupts.held():
    plpy.notice("the step: " + answer)
failure = procedures._outcome(plpy, "spin", interrupts, None)
if failure:
    raise failure
return answer
$body$;
SET statement_timeout = '1s';
SELECT pg_temp.spin();
"""
    result = psql(pg_cluster, "\\set VERBOSITY verbose\n" + spin, NAME)
    assert "NOTICE:  00000: the step: interrupted" in result.stderr, result.stderr
    assert "ERROR:  57014: lookalike.spin: canceling statement due to statement timeout" in result.stderr


@pytest.mark.timeout(300)
def test_every_parameter_is_bounded_before_anything_runs(procs, pg_cluster):
    before = snapshot(procs.url)
    limit = "SET statement_timeout = '30s'; "  # a bound that was not checked still ends
    refused = {
        # Probe 4a: burned a CPU for ever and ignored cancel; only kill -9 (and a cluster restart) stopped it.
        "CALL lookalike.dedupe(rule => 'near', max_distance => 2147483647);":
            "22023: lookalike.dedupe: the maximum distance must be between 0 and ",
        "CALL lookalike.dedupe(rule => 'near', size => 2147483647);":
            "22023: lookalike.dedupe: size must be between 1 and 64, not 2147483647",
        "CALL lookalike.featurize_images(batch_size => 2147483647);":
            "22023: lookalike.featurize_images: batch_size must be between 1 and 1024, not 2147483647",
        "CALL lookalike.featurize_images(batch_size => -1);":
            "22023: lookalike.featurize_images: batch_size must be between 1 and 1024, not -1",
        "CALL lookalike.prepare_data(0.25, 2147483647);":
            "22023: lookalike.prepare_data: queries_per_label must be between 1 and 10000, not 2147483647",
        "CALL lookalike.prepare_data(0.25, 20, 2147483647);":
            "22023: lookalike.prepare_data: negatives_per_query must be between 1 and 10000, not 2147483647",
        "CALL lookalike.prepare_data('NaN');":
            "22023: lookalike.prepare_data: test_ratio must be between 0 and 1 (exclusive), not nan",
        "CALL lookalike.rank_candidates(2147483647);":
            "22023: lookalike.rank_candidates: top_k must be between 1 and 1000, not 2147483647",
        "SELECT * FROM lookalike.similar_images(1::bigint, 2147483647);":
            "22023: lookalike.similar_images: k must be between 1 and 1000, not 2147483647",
        "SELECT * FROM lookalike.similar_images(repeat('a', 5000), 2);":
            "22023: lookalike.similar_images: query must be at most 4096 characters, not 5000",
        "CALL lookalike.load_images(repeat('x', 100000));":
            "22023: lookalike.load_images: source must be at most 4096 characters, not 100000",
    }
    found = answers(pg_cluster, [limit + sql for sql in refused])
    for answer, (sql, message) in zip(found, refused.items()):
        assert f"ERROR:  {message}" in answer, (sql, answer)
        assert 'File "' not in answer and "xxxxxxxxxx" * 30 not in answer  # a long text is not echoed whole
    assert "not 2147483647" in found[0], found[0]

    # What prepare_data remembers is read back from a table other roles may edit: bounded there too.
    tampered = answers(pg_cluster, [
        "INSERT INTO lookalike.settings VALUES ('prepared_data', '{\"negatives_per_query\": 2147483647}') "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
        limit + "CALL lookalike.evaluate_model();",
        "UPDATE lookalike.settings SET value = '[1, 2]' WHERE key = 'prepared_data';",
        limit + "CALL lookalike.evaluate_model();",
        "DELETE FROM lookalike.settings WHERE key = 'prepared_data';",
    ])
    assert ("ERROR:  22023: lookalike.evaluate_model: negatives_per_query must be between 1 and 10000, "
            "not 2147483647") in tampered[1], tampered[1]
    assert ("ERROR:  22023: lookalike.evaluate_model: settings key prepared_data is not a JSON object: "
            "run prepare_data again") in tampered[3], tampered[3]
    assert snapshot(procs.url) == before


@pytest.mark.timeout(300)
def test_similar_images_of_dev_zero_is_refused_within_a_memory_bound(procs, pg_cluster):
    # Probe 4b: one backend grew to 22 GB until the kernel killed it.
    with psycopg.connect(pg_cluster.conninfo(NAME), autocommit=True) as conn:
        assert len(conn.execute(f"SELECT * FROM lookalike.similar_images({procs.query}::bigint, 2)").fetchall()) == 2
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # This backend (everything imported now) may grow by 1 GiB at most: past that, MemoryError, not the OOM killer.
        size = int(re.search(r"VmSize:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024
        _cap_address_space(pid, size + 2**30)
        conn.execute("SET statement_timeout = '60s'")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            conn.execute("SELECT * FROM lookalike.similar_images('/dev/zero', 2)")
        assert str(refused.value).startswith("lookalike.similar_images: cannot read query image: "), refused.value
        assert "regular file" in str(refused.value), refused.value
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on


def _cap_address_space(pid: int, limit: int) -> None:
    """Lower another process's RLIMIT_AS, as its own OS user (no capability needed to lower one's own)."""
    owner = pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name
    as_owner = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 else []
    subprocess.run(as_owner + ["prlimit", f"--pid={pid}", f"--as={limit}:{limit}"], check=True, timeout=30)
    assert f"{limit}" in Path(f"/proc/{pid}/limits").read_text()


@pytest.mark.timeout(300)
def test_settings_a_granted_role_edits_do_not_move_where_the_server_writes(procs, pg_cluster):
    role = "lk_hostile_analyst"
    pg_cluster.psql(f"CREATE ROLE {role} LOGIN", db="postgres")
    # Exactly the README's grants.
    pg_cluster.psql(f"GRANT USAGE ON SCHEMA lookalike TO {role}; "
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA lookalike TO {role}; "
                    f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA lookalike TO {role}; "
                    f"GRANT EXECUTE ON ALL ROUTINES IN SCHEMA lookalike TO {role}", db=NAME)
    inside = pg_cluster.data_dir / "lookalike-store"
    more = procs.root / "more"
    render_samples(more, per_label=1, seed=11)
    server_readable(more)
    stored_before = {p.name for p in procs.store.rglob("*") if p.is_file()}
    # Read with plain psycopg: a lookalike Database here would itself follow the edited settings.
    with psycopg.connect(pg_cluster.conninfo(NAME)) as conn:
        known = {sha for sha, in conn.execute("SELECT sha256 FROM lookalike.images")}
    done = answers(pg_cluster, [
        f"UPDATE lookalike.settings SET value = '{inside}' WHERE key = 'store_path';",
        f"UPDATE lookalike.settings SET value = '{inside}' WHERE key = 'plpython_path';",
        "CALL lookalike.load_images(:'more');",
    ], user=role, more=str(more))
    assert all("ERROR" not in answer for answer in done), done
    # The new images' bytes went to the store install wrote into the routines, not into PGDATA.
    with psycopg.connect(pg_cluster.conninfo(NAME)) as conn:
        new = {sha for sha, in conn.execute("SELECT sha256 FROM lookalike.images")} - known
    assert new and f"loaded {len(new)} new images" in done[2], done[2]
    assert new <= {p.name for p in procs.store.rglob("*") if p.is_file()} - stored_before
    assert not inside.exists()


@pytest.mark.timeout(300)
def test_similar_images_by_url_goes_through_the_ssrf_guard(procs, pg_cluster):
    image = next((procs.root / "samples").rglob("*.jpg")).read_bytes()
    with LocalHTTPServer({"a.jpg": image}) as server:
        url = server.url("/img/a.jpg")
        query = "SELECT count(*) FROM lookalike.similar_images(:'url', 3);"
        # Probe: similar_images(text) fetched any URL, loopback and the server's own network included.
        refused, = answers(pg_cluster, [query], url=url)
        assert ("22023: lookalike.similar_images: cannot read query image: refused: 127.0.0.1 is a loopback "
                "address") in refused, refused
        assert sum(server.hits.values()) == 0  # refused before any request


@pytest.mark.timeout(600)
def test_only_the_servers_environment_lets_similar_images_reach_private_addresses(tmp_path):
    # The way the CLI's tests reach their local server (allow_private), for a database server: whoever
    # starts it decides, in its environment; no session, role or database setting can.
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lkprivate-"))
    root.chmod(0o755)
    try:
        with PostgresCluster(env={PRIVATE_URLS_ENV: "1"}) as cluster, LocalHTTPServer({"a.jpg": b"x"}) as server:
            url = cluster.create_database("private_urls")
            install(url, root / "python", store_dir=server_owned(root / "store", cluster))
            found = psql(cluster, "SELECT * FROM lookalike.similar_images(:'url', 3)", "private_urls",
                         url=server.url("/img/a.jpg"))
            # Fetched (the server saw the request); then nothing is featurized in this empty database.
            assert server.hits["/img/a.jpg"] == 1, found.stderr
            assert "lookalike.similar_images: no embeddings for model" in found.stderr, found.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
