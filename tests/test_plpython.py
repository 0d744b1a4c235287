"""The pipeline as PL/Python procedures, driven through the real psql on a throwaway PostgreSQL 15.

The server runs as OS user ``postgres``, so everything it reads (the package
folder, the sample images) lives in folders under /tmp that it may enter, and
the image store belongs to it. One database runs every step from psql; the
same steps run in-process on SQLite, and the two must agree.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.config import ConfigError
from lookalike.db import Database
from lookalike.index import index_dir, rebuild_index
from lookalike.images import open_image
from lookalike.plpython import TARGET_MARKER, check_python_version, install, uninstall
from lookalike.samples import render_samples
from lookalike.search import similar_images
from support.pg import PostgresCluster, find_pg_bin

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[1]

# Every step from psql, in one session (the packages are imported once); \warn marks each in stderr.
STEPS = [
    ("load_images", "CALL lookalike.load_images(:'samples')"),
    ("hash_images", "CALL lookalike.hash_images()"),
    ("featurize_images", "CALL lookalike.featurize_images()"),
    ("dedupe", "CALL lookalike.dedupe()"),
    ("prepare_data", "CALL lookalike.prepare_data(0.25)"),
    ("train_classifier", "CALL lookalike.train_classifier()"),
    ("evaluate_model", "CALL lookalike.evaluate_model()"),
    ("rank_candidates", "CALL lookalike.rank_candidates(10)"),
]
# What each step's summary says, as its NOTICE shows it.
SUMMARY_WORDS = {
    "load_images": "loaded 27 new images",
    "hash_images": "27 hashed",
    "dedupe": "dedupe run 1: verified rule",
    "featurize_images": "27 embedded",
    "prepare_data": "split (seed 0, test ratio 0.25)",
    "train_classifier": "accuracy: train",
    "evaluate_model": "embeddings cosine",
    "rank_candidates": "rank: top 10 in embeddings space",
}


def psql(cluster: PostgresCluster, sql: str, db: str, user: str = "postgres",
         **variables: str) -> subprocess.CompletedProcess:
    """Run ``sql`` through the real psql; stdout has the rows, stderr the NOTICEs and errors."""
    args = [str(cluster.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", user, "-d", db]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    return subprocess.run(args + ["-f", "-"], input=sql, capture_output=True, text=True, timeout=300)


def server_readable(path: Path) -> Path:
    """Open ``path`` (a tree under a folder of ours in /tmp) to the server's OS user for reading."""
    path.chmod(0o755)
    for child in path.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)
    return path


def server_user(cluster: PostgresCluster) -> pwd.struct_passwd:
    """The server's OS user: postgres when the tests run as root, else the user running them."""
    return pwd.getpwuid(cluster.data_dir.stat().st_uid)


def server_owned(path: Path, cluster: PostgresCluster) -> Path:
    """A folder the server's OS user writes: the image store."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, server_user(cluster).pw_uid, server_user(cluster).pw_gid)
    return path


def rows(url: str, sql: str) -> list[tuple]:
    with Database(url) as db, db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


@pytest.fixture(scope="module")
def workspace():
    # pytest's tmp_path is under a 700 folder the server cannot enter.
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lkplpy-"))
    root.chmod(0o755)
    render_samples(root / "samples", per_label=8, seed=3)
    server_readable(root / "samples")
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def steps_db(pg_cluster: PostgresCluster, workspace: Path):
    """A database where every step ran once from psql; the shared package folder installed for it."""
    name = "plpython_steps"
    url = pg_cluster.create_database(name)
    summary = install(url, workspace / "python", store_dir=server_owned(workspace / "store_steps", pg_cluster))
    script = "".join(f"\\warn ==> {step}\n{sql};\n" for step, sql in STEPS)
    result = psql(pg_cluster, script, name, samples=str(workspace / "samples"))
    assert result.returncode == 0, result.stderr
    output = dict(re.findall(r"==> (\w+)\n(.*?)(?=\n==> |\Z)", result.stderr, re.S))
    runs = Counter(rows(url, "SELECT step, outcome FROM runs"))  # before other tests add their own
    return SimpleNamespace(name=name, url=url, install=summary, output=output, runs=runs)


@pytest.fixture(scope="module")
def reference(workspace: Path) -> str:
    """The same steps with the same parameters, called in-process on SQLite."""
    from lookalike.classify import train_classifier
    from lookalike.dedupe import dedupe_images
    from lookalike.evaluate import evaluate_model
    from lookalike.features import featurize_images
    from lookalike.hashing import hash_images
    from lookalike.ingest import load_images
    from lookalike.pipeline import default_queries
    from lookalike.search import rank_queries
    from lookalike.split import split_images
    url = f"sqlite:///{workspace}/reference.db"
    with Database(url) as db:
        load_images(db, workspace / "samples", progress=False)
        hash_images(db, progress=False)
        featurize_images(db, progress=False)
        dedupe_images(db, progress=False)
        split_images(db, test_ratio=0.25, seed=0)
        train_classifier(db, seed=0)
        evaluate_model(db, queries_per_label=20, negatives_per_query=100, seed=0)
        default_queries(db)  # what rank_candidates ranks when query_images is empty: the test split
        rank_queries(db, top=10)
    return url


def test_install_makes_a_server_readable_package_folder(steps_db, pg_cluster, workspace):
    target = workspace / "python"
    summary = steps_db.install
    assert summary.target == target and summary.server_user == server_user(pg_cluster).pw_name
    assert summary.server_python.startswith("3.11.") and not summary.warnings
    assert set(summary.routines) == {"load_images", "hash_images", "dedupe", "featurize_images", "prepare_data",
                                     "train_classifier", "evaluate_model", "rank_candidates", "run_once",
                                     "similar_images"}
    assert (target / TARGET_MARKER).is_file() and (target / "torch" / "__init__.py").is_file()
    assert (target / "lookalike" / "plpython.py").stat().st_mode & 0o777 == 0o644
    assert (target / "lookalike" / "web").stat().st_mode & 0o777 == 0o755
    assert rows(steps_db.url, "SELECT value FROM settings WHERE key = 'plpython_path'") == [(str(target),)]
    # Installing again reuses the folder while it holds the very same packages (the first call
    # copies again only if lookalike's own files changed since the fixture installed).
    url = pg_cluster.create_database("plpython_reuse")
    install(url, target, store_dir=workspace / "store_steps")
    again = install(url, target, store_dir=workspace / "store_steps")
    assert again.reused and again.linked == again.copied == 0


def test_each_step_reports_to_psql_and_records_a_run(steps_db):
    for step, _ in STEPS:
        notices = steps_db.output[step]
        assert f"NOTICE:  lookalike.{step}(" in notices and "): started" in notices
        assert SUMMARY_WORDS[step] in notices, notices
        assert f"NOTICE:  lookalike.{step}: done in" in notices
        assert "ERROR" not in notices and "Traceback" not in notices
    recorded = steps_db.runs
    for step in ("hash", "dedupe", "featurize", "split", "train", "evaluate", "rank"):
        assert recorded[(step, "ok")] == 1, recorded
    assert not [key for key in recorded if key[1] != "ok"]


def test_results_equal_the_python_pipeline_on_sqlite(steps_db, reference):
    def split_of(url):
        return dict(rows(url, "SELECT i.source, s.split FROM splits s JOIN images i ON i.id = s.image_id"))

    def accuracy(url):
        return rows(url, "SELECT test_accuracy FROM models ORDER BY id DESC LIMIT 1")

    def top_lists(url):
        ranked: dict[str, list[str]] = {}
        for query, _rank, found in rows(url, "SELECT qi.source, r.rank, i.source FROM ranking_results r "
                                             "JOIN query_images q ON q.id = r.query_id JOIN images qi "
                                             "ON qi.id = q.image_id JOIN images i ON i.id = r.image_id "
                                             "ORDER BY qi.source, r.rank"):
            ranked.setdefault(query, []).append(found)
        return ranked

    assert split_of(steps_db.url) == split_of(reference) and len(split_of(reference)) > 20
    assert accuracy(steps_db.url) == accuracy(reference)
    expected = top_lists(reference)
    assert top_lists(steps_db.url) == expected and all(len(found) == 10 for found in expected.values())


def test_similar_images_from_psql(steps_db, pg_cluster, workspace):
    query_id, query_source = rows(steps_db.url, "SELECT id, source FROM images WHERE status = 'ok' "
                                                "ORDER BY id LIMIT 1")[0]
    found = psql(pg_cluster, f"SELECT * FROM lookalike.similar_images({query_id}, 10)", steps_db.name)
    assert found.returncode == 0, found.stderr
    table = [line.split("|") for line in found.stdout.splitlines()]
    assert [int(r[0]) for r in table] == list(range(1, 11))
    assert query_id not in [int(r[1]) for r in table]
    distances = [float(r[3]) for r in table]
    assert distances == sorted(distances)
    assert all(abs(float(r[4]) - (1 - float(r[3]))) < 1e-9 for r in table)
    # The same function as the CLI's, on the same data.
    with Database(steps_db.url) as db:
        expected = [(m.image_id, m.label, m.source) for m in similar_images(db, query_id, k=10)]
    assert [(int(r[1]), r[2], r[5]) for r in table] == expected
    # By path, as the server sees the file: the stored image it is, left out, the same neighbours.
    by_path = psql(pg_cluster, "SELECT image_id FROM lookalike.similar_images(:'query', 10)", steps_db.name,
                   query=query_source)
    assert [int(i) for i in by_path.stdout.splitlines()] == [image_id for image_id, _, _ in expected]


@pytest.mark.timeout(300)
def test_similar_images_maps_the_cli_index_and_sees_rows_added_by_sql(steps_db, pg_cluster):
    # The CLI's OS user (root here) keeps the index beside the store; the server's may read it, not write it.
    query = rows(steps_db.url, "SELECT min(image_id) FROM embeddings")[0][0]
    with Database(steps_db.url) as db:
        cli = [(m.image_id, round(m.distance, 5)) for m in similar_images(db, query, k=10)]
        folder = index_dir(db)
    header = [p.read_bytes() for p in folder.glob("model-*/header.json")]
    search = "SELECT image_id, distance FROM lookalike.similar_images(%s::bigint, 10)"

    def answer(conn):
        return [(image_id, round(distance, 5)) for image_id, distance in conn.execute(search, [query])]

    def mapped(conn) -> bool:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return f"{folder}/model-" in Path(f"/proc/{backend}/maps").read_text()

    conn = psycopg.connect(pg_cluster.conninfo(steps_db.name), autocommit=True)
    try:
        assert answer(conn) == cli and mapped(conn)   # the CLI's file, mapped by the backend
        # Another writer adds a copy of the query by raw SQL: the procedure sees it; the files stay as they are.
        conn.execute("INSERT INTO lookalike.images (id, sha256, source, byte_size, status, loaded_at, label) "
                     "SELECT 100000, repeat('f', 64), 'raw.jpg', byte_size, status, loaded_at, label "
                     "FROM lookalike.images WHERE id = %s", [query])
        conn.execute("INSERT INTO lookalike.embeddings (image_id, model_id, vector) "
                     "SELECT 100000, model_id, vector FROM lookalike.embeddings WHERE image_id = %s", [query])
        found = answer(conn)
        assert found == [(100000, 0.0)] + cli[:9] and mapped(conn)
        assert [p.read_bytes() for p in folder.glob("model-*/header.json")] == header
        with Database(steps_db.url) as db:   # the CLI agrees (and catches the files up)
            assert [(m.image_id, round(m.distance, 5)) for m in similar_images(db, query, k=10)] == found
        # Files the server cannot read: it searches all the same, in a folder of its own, and says why.
        folder.chmod(0o700)
        with psycopg.connect(pg_cluster.conninfo(steps_db.name), autocommit=True) as fresh:
            notices = []
            fresh.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary))
            assert answer(fresh) == found and not mapped(fresh)
        assert any(f"nor read as OS user {server_user(pg_cluster).pw_name}" in n and "temporary folder" in n
                   for n in notices), notices
    finally:
        folder.chmod(0o755)
        conn.execute("DELETE FROM lookalike.images WHERE id = 100000")   # its embedding goes with it
        conn.close()
        with Database(steps_db.url) as db:   # the matrix as it was (later tests compare distances bit for bit)
            rebuild_index(db)


# Which of these modules the session's Python has imported, as a NOTICE.
IMPORTED = ("DO LANGUAGE plpython3u $$ import sys; plpy.notice('imported: ' + ','.join(m for m in ('sqlalchemy', 'psycopg', "
            "'lookalike.plpython') if m in sys.modules)) $$;")


@pytest.mark.timeout(300)
def test_a_query_by_id_is_answered_from_the_folder_without_a_database_driver(steps_db, pg_cluster):
    """A fresh session asks by id: the index folder answers through the server's SPI, as the CLI does, and
    SQLAlchemy and psycopg stay unimported (they took most of a fresh session's second). A folder behind the
    database sends the query the long way, which catches up and gives the new row."""
    query = rows(steps_db.url, "SELECT min(image_id) FROM embeddings")[0][0]
    with Database(steps_db.url) as db:   # the folder current, as after any CLI search
        cli = [(m.image_id, m.label, m.source, round(m.distance, 5)) for m in similar_images(db, query, k=10)]
    ask = f"SELECT image_id, label, source, distance FROM lookalike.similar_images({query}::bigint, 10);\n"

    def answer(result) -> list[tuple]:
        assert result.returncode == 0, result.stderr
        return [(int(i), label, source, round(float(d), 5))
                for i, label, source, d in (line.split("|") for line in result.stdout.splitlines())]

    fresh = psql(pg_cluster, ask + IMPORTED, steps_db.name)
    assert answer(fresh) == cli
    assert "NOTICE:  imported: \n" in fresh.stderr + "\n", fresh.stderr
    assert "lookalike.similar_images: 10 results in the" in fresh.stderr
    try:   # a raw SQL writer adds a copy of the query: the folder is behind until someone catches it up
        added = psql(pg_cluster, "INSERT INTO lookalike.images (id, sha256, source, byte_size, status, loaded_at, "
                                 "label) SELECT 100001, repeat('e', 64), 'raw2.jpg', byte_size, status, loaded_at, "
                                 f"label FROM lookalike.images WHERE id = {query}; INSERT INTO lookalike.embeddings "
                                 "(image_id, model_id, vector) SELECT 100001, model_id, vector FROM "
                                 f"lookalike.embeddings WHERE image_id = {query}", steps_db.name)
        assert added.returncode == 0, added.stderr
        behind = psql(pg_cluster, ask + IMPORTED, steps_db.name)
        assert answer(behind)[0][:2] == (100001, cli[0][1]) and answer(behind)[1:] == cli[:9]
        assert "NOTICE:  imported: sqlalchemy,psycopg,lookalike.plpython" in behind.stderr
    finally:
        psql(pg_cluster, "DELETE FROM lookalike.images WHERE id = 100001", steps_db.name)
        with Database(steps_db.url) as db:   # the matrix as it was (later tests compare distances bit for bit)
            rebuild_index(db)


def test_only_granted_roles_run_the_procedures(steps_db, pg_cluster):
    pg_cluster.psql("CREATE ROLE lk_analyst LOGIN", db="postgres")
    pg_cluster.psql("GRANT USAGE ON SCHEMA lookalike TO lk_analyst; "
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA lookalike TO lk_analyst; "
                    "GRANT USAGE ON ALL SEQUENCES IN SCHEMA lookalike TO lk_analyst", db=steps_db.name)
    # They read files as the server's OS user, so EXECUTE is not PUBLIC's: the data alone is not enough.
    denied = psql(pg_cluster, "CALL lookalike.rank_candidates()", steps_db.name, user="lk_analyst")
    assert "ERROR:  permission denied for procedure rank_candidates" in denied.stderr
    # Granted, a plain role runs them; the connection back is made as that role.
    # (CREATE on the database: Database() runs CREATE SCHEMA IF NOT EXISTS, which asks for it.)
    pg_cluster.psql("GRANT EXECUTE ON ALL ROUTINES IN SCHEMA lookalike TO lk_analyst; "
                    f"GRANT CREATE ON DATABASE {steps_db.name} TO lk_analyst", db=steps_db.name)
    ranked_before = rows(steps_db.url, "SELECT * FROM ranking_results ORDER BY 1, 2, 3")
    granted = psql(pg_cluster, "CALL lookalike.rank_candidates(10); SELECT count(*) FROM "
                               "lookalike.similar_images((SELECT min(image_id) FROM lookalike.embeddings), 3)",
                   steps_db.name, user="lk_analyst")
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.split() == ["3"] and "rank: top 10 in embeddings space" in granted.stderr
    assert rows(steps_db.url, "SELECT * FROM ranking_results ORDER BY 1, 2, 3") == ranked_before
    # The connection back is made as current_user: a role that may not log in gets told why.
    pg_cluster.psql("CREATE ROLE lk_group NOLOGIN; GRANT lk_group TO lk_analyst", db="postgres")
    pg_cluster.psql("GRANT USAGE ON SCHEMA lookalike TO lk_group; "
                    "GRANT EXECUTE ON ALL ROUTINES IN SCHEMA lookalike TO lk_group", db=steps_db.name)
    as_group = psql(pg_cluster, "SET ROLE lk_group; CALL lookalike.rank_candidates()", steps_db.name,
                    user="lk_analyst")
    assert ("ERROR:  lookalike.rank_candidates: the procedure cannot connect back to database plpython_steps as "
            "role lk_group (") in as_group.stderr
    assert 'role "lk_group" is not permitted to log in' in as_group.stderr
    assert "postgresql+psycopg" not in as_group.stderr


def test_bad_parameters_are_refused_and_change_nothing(steps_db, pg_cluster):
    snapshot_sql = ("SELECT (SELECT count(*) FROM splits), (SELECT count(*) FROM dedupe_runs), "
                    "(SELECT count(*) FROM ranking_results), (SELECT count(*) FROM embeddings), "
                    "(SELECT sum(random) FROM splits WHERE split = 'test'), (SELECT count(*) FROM runs)")
    before = rows(steps_db.url, snapshot_sql)
    refused = {
        "CALL lookalike.prepare_data(1.5)": "22023: lookalike.prepare_data: test_ratio must be between 0 and 1",
        "CALL lookalike.prepare_data(0.25, 0)": "22023: lookalike.prepare_data: queries_per_label must be "
                                                "between 1 and 10000, not 0",
        "CALL lookalike.dedupe('fuzzy')": "22023: lookalike.dedupe: unknown dedupe rule 'fuzzy'",
        "CALL lookalike.rank_candidates(0)": "22023: lookalike.rank_candidates: top_k must be between 1 and 1000",
        "CALL lookalike.load_images(NULL)": "22023: lookalike.load_images: source must not be NULL",
        "CALL lookalike.load_images('/nowhere/at/all')": "22023: lookalike.load_images: no such folder or manifest",
        "SELECT * FROM lookalike.similar_images(1, 0)": "22023: lookalike.similar_images: k must be between 1 and 1000",
        "SELECT * FROM lookalike.similar_images(999999)": "P0002: lookalike.similar_images: image 999999 has no stored",
    }
    # One session that goes on after each error; \warn marks where each statement's messages start.
    script = "\\set ON_ERROR_STOP 0\n\\set VERBOSITY verbose\n" + "".join(
        f"\\warn ==> {number}\n{sql};\n" for number, sql in enumerate(refused))
    result = psql(pg_cluster, script, steps_db.name)
    answers = re.split(r"==> \d+\n", result.stderr)[1:]
    assert len(answers) == len(refused)
    for answer, (sql, message) in zip(answers, refused.items()):
        assert f"ERROR:  {message}" in answer, (sql, answer)
        # No traceback from inside lookalike, no connection details.
        assert 'File "' not in answer and "host=" not in answer and str(pg_cluster.socket_dir) not in answer
    assert rows(steps_db.url, snapshot_sql) == before


def test_cancelled_or_terminated_featurize_stops_cleanly_and_keeps_its_work(pg_cluster, workspace):
    # Its own database, with enough images that featurize runs for a few seconds.
    name = "plpython_stopped"
    url = pg_cluster.create_database(name)
    install(url, workspace / "python", store_dir=server_owned(workspace / "store_stopped", pg_cluster))
    more = server_readable(_turned_copies(workspace / "samples", workspace / "turned"))
    loaded = psql(pg_cluster, "CALL lookalike.load_images(:'samples'); CALL lookalike.load_images(:'more')", name,
                  samples=str(workspace / "samples"), more=str(more))
    assert loaded.returncode == 0, loaded.stderr
    total = rows(url, "SELECT count(*) FROM images WHERE status = 'ok'")[0][0]
    other = psycopg.connect(pg_cluster.conninfo(name), autocommit=True)
    with pytest.raises(psycopg.errors.NoDataFound, match="no embeddings"):  # nothing to search yet, but
        other.execute("SELECT * FROM lookalike.similar_images(1::bigint)")  # its imports are done

    def value(sql: str, *params):
        return other.execute(sql, params or None).fetchone()[0]

    def loopbacks() -> int:
        return value("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lookalike procedure'")

    def featurize_then_stop(how: str, while_running=lambda: None) -> str:
        """Start featurize, let it embed a few batches, then cancel or terminate it; psql's stderr."""
        embedded = value("SELECT count(*) FROM lookalike.embeddings")
        with psycopg.connect(pg_cluster.conninfo(name)) as gate:
            # Featurize waits at its first look at the embeddings table, with the model loaded.
            gate.execute("LOCK TABLE lookalike.embeddings IN ACCESS EXCLUSIVE MODE")
            featurize = subprocess.Popen(
                [str(pg_cluster.bin_dir / "psql"), "-X", "-q", "-h", str(pg_cluster.socket_dir), "-p",
                 str(pg_cluster.port), "-U", "postgres", "-d", name, "-c",
                 "CALL lookalike.featurize_images(batch_size => 4)"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 120
            while not value("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                            "WHERE a.application_name = 'lookalike procedure' AND NOT l.granted") \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            gate.rollback()
        # Stopped once it has committed a batch more (a fixed sleep lands before the first on a busy machine).
        deadline = time.monotonic() + 120
        while value("SELECT count(*) FROM lookalike.embeddings") == embedded and time.monotonic() < deadline:
            time.sleep(0.05)
        while_running()
        value(f"SELECT count(pg_{how}_backend(pid)) FROM pg_stat_activity "
              "WHERE query LIKE 'CALL lookalike.featurize_images%'")
        return featurize.communicate(timeout=120)[1]

    seen = {}

    def ask_similar():  # a second session asks while featurize runs: it sees what is committed
        seen["query"] = value("SELECT min(image_id) FROM lookalike.embeddings")
        seen["answer"] = [r[0] for r in other.execute(
            "SELECT image_id FROM lookalike.similar_images(%s::bigint, 1000)", [seen["query"]])]
        seen["committed"] = {r[0] for r in other.execute("SELECT image_id FROM lookalike.embeddings")}

    with other:
        cancelled = featurize_then_stop("cancel")
        after_cancel = value("SELECT count(*) FROM lookalike.embeddings")
        terminated = featurize_then_stop("terminate", ask_similar)
        after_terminate = value("SELECT count(*) FROM lookalike.embeddings")
        # The stopped calls' own connections back to the server went with them; only this session's stays.
        deadline = time.monotonic() + 10
        while loopbacks() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        left = loopbacks()

    # Each stopped as on Ctrl-C: its summary says so, then psql gets the cancel or the termination.
    for stderr in (cancelled, terminated):
        assert "NOTICE:  interrupted: embeddings written so far are kept; run again to finish" in stderr, stderr
    assert "ERROR:  lookalike.featurize_images: canceling statement due to user request" in cancelled
    assert "FATAL:  terminating connection due to administrator command" in terminated
    assert 0 < after_cancel < after_terminate < total, "a stop did not land mid-featurize"
    assert "terminated by signal" not in (pg_cluster.dir / "server.log").read_text()  # no backend crashed
    assert left == 1
    assert seen["answer"] and set(seen["answer"]) <= seen["committed"] - {seen["query"]}
    rerun = psql(pg_cluster, "CALL lookalike.featurize_images()", name)
    assert f"{total - after_terminate} embedded" in rerun.stderr
    assert f"{after_terminate} already had one" in rerun.stderr
    assert rows(url, "SELECT count(*), count(DISTINCT image_id) FROM embeddings") == [(total, total)]


def _turned_copies(samples: Path, out: Path) -> Path:
    """Each sample image turned and flipped every other way, at full and at 90 % size: new images, same labels.

    Enough of them that featurize (about 50 images/s on ONNX Runtime here) is still running when a stop lands."""
    for path in samples.glob("*/*.jpg"):
        image = open_image(path)
        smaller = image.resize((round(image.width * 0.9), round(image.height * 0.9)))
        (out / path.parent.name).mkdir(parents=True, exist_ok=True)
        for turn in Image.Transpose:
            name = f"{path.stem}_{turn.name.lower()}"
            image.transpose(turn).save(out / path.parent.name / f"{name}.jpg", quality=90)
            smaller.transpose(turn).save(out / path.parent.name / f"{name}_90.jpg", quality=90)
    return out


def test_refuses_a_server_without_plpython():
    # A copy of this PostgreSQL 15 without PL/Python: its binaries copied, everything else linked,
    # in the same layout relative to each other, since the server finds its lib and share folders
    # relative to its own binary. plpython3u is then simply not available.
    bin_dir = find_pg_bin()
    folders = {name: Path(subprocess.run([str(bin_dir / "pg_config"), f"--{name}"], capture_output=True,
                                         text=True).stdout.strip()) for name in ("bindir", "pkglibdir", "sharedir")}
    common = Path(os.path.commonpath(list(folders.values())))
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lknopy-"))
    try:
        root.chmod(0o755)
        shutil.copytree(folders["bindir"], root / folders["bindir"].relative_to(common))
        _link_without_plpython(folders["pkglibdir"], root / folders["pkglibdir"].relative_to(common))
        _link_without_plpython(folders["sharedir"], root / folders["sharedir"].relative_to(common),
                               deeper={"extension"})
        cluster = PostgresCluster()
        cluster.bin_dir = root / folders["bindir"].relative_to(common)
        with cluster:
            assert psql(cluster, "SELECT count(*) FROM pg_available_extensions WHERE name = 'plpython3u'",
                        "lookalike_test").stdout.split() == ["0"]
            with pytest.raises(ConfigError, match="PL/Python is not available on this server"):
                install(cluster.url, root / "python", store_dir=root / "store")
            assert not (root / "python").exists() and not (root / "python.new").exists()
            assert psql(cluster, "SELECT to_regnamespace('lookalike') IS NULL",
                        "lookalike_test").stdout.split() == ["t"]
    finally:
        shutil.rmtree(root)


def _link_without_plpython(source: Path, copy: Path, deeper: frozenset[str] = frozenset()) -> None:
    copy.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name in deeper:
            _link_without_plpython(entry, copy / entry.name)
        elif "plpython" not in entry.name:
            (copy / entry.name).symlink_to(entry)


def test_refuses_a_role_that_is_not_superuser(pg_cluster, workspace):
    pg_cluster.create_database("plpython_plain")
    pg_cluster.psql("CREATE ROLE lk_plain LOGIN; GRANT ALL ON DATABASE plpython_plain TO lk_plain", db="postgres")
    url = pg_cluster.url_for("plpython_plain").replace("postgres@", "lk_plain@")
    with pytest.raises(ConfigError, match="role lk_plain is not a superuser: plpython3u is an untrusted language"):
        install(url, workspace / "python_plain")
    assert not (workspace / "python_plain").exists()
    assert pg_cluster.psql("SELECT to_regnamespace('lookalike') IS NULL", db="plpython_plain").split() == ["t"]


def test_refuses_another_python_version():
    with pytest.raises(ConfigError, match="the server's PL/Python runs Python 3.12, but lookalike is installed "
                                          "for Python 3.11 here"):
        check_python_version((3, 12), (3, 11))
    check_python_version((3, 11), (3, 11))


def test_uninstall_keeps_a_package_folder_another_database_uses(steps_db, pg_cluster, workspace):
    name = "plpython_second"
    url = pg_cluster.create_database(name)
    install(url, workspace / "python", store_dir=workspace / "store_steps")
    # The settings rows are anyone's to edit (the README's grants): uninstall goes by the routine bodies.
    decoy = workspace / "decoy"
    decoy.mkdir()
    (decoy / TARGET_MARKER).write_text("{}")
    for database in (url, steps_db.url):
        with Database(database) as db:
            db.set_setting("plpython_path", str(decoy))
    summary = uninstall(url)
    assert summary.routines == 11 and summary.removed_target is None and not summary.dropped_schema
    assert any("plpython_steps" in warning for warning in summary.warnings)
    assert (workspace / "python" / TARGET_MARKER).is_file() and (decoy / TARGET_MARKER).is_file()
    # No PL/Python routine is left; the data's own SQL functions (hamming, the embeddings trigger) stay.
    assert pg_cluster.psql("SELECT count(*) FROM pg_proc WHERE pronamespace = 'lookalike'::regnamespace "
                           "AND prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpython3u')",
                           db=name).split() == ["0"]
    assert pg_cluster.psql("SELECT count(*) FROM pg_proc WHERE pronamespace = 'lookalike'::regnamespace",
                           db=name).split() != ["0"]
    assert rows(url, "SELECT count(*) FROM settings WHERE key = 'plpython_path'") == [(0,)]


def test_setup_script_installs_and_runs_the_pipeline_then_uninstall_removes_it(pg_cluster, workspace):
    name = "plpython_setup"
    url = pg_cluster.create_database(name)
    target, store, samples = workspace / "setup_python", workspace / "setup_store", workspace / "setup_samples"
    env = {**os.environ, "PATH": f"{pg_cluster.bin_dir}:{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup-debian.sh"), "--db", url, "--target", str(target),
                             "--store", str(store), "--samples", str(samples), "--per-label", "4"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installed the PL/Python procedures" in result.stdout
    assert "NOTICE:  lookalike.run_once(source => NULL): started" in result.stderr
    assert "[featurize]" in result.stderr and "NOTICE:  lookalike.run_once: done in" in result.stderr
    assert len([line for line in result.stdout.splitlines() if "| " in line and "/setup_samples/" in line]) == 5
    assert Counter(step for step, in rows(url, "SELECT step FROM runs WHERE outcome = 'ok'"))["run"] == 1

    summary = uninstall(url, drop_data=True)
    assert summary.removed_target == target and summary.dropped_schema and not summary.warnings
    assert not target.exists()
    assert pg_cluster.psql("SELECT to_regnamespace('lookalike') IS NULL", db=name).split() == ["t"]
