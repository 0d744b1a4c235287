"""The test support itself: the throwaway PostgreSQL server and the local HTTP server really work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from lookalike.images import ImageError, open_image
from support.http import HUGE_SIZE, TRICKLE_SIZE, LocalHTTPServer
from support.pg import PostgresCluster, find_pg_bin

TIMEOUT = httpx.Timeout(5.0)


# -- PostgreSQL -----------------------------------------------------------------------

def test_psql_reaches_postgres_15(pg_cluster: PostgresCluster) -> None:
    assert pg_cluster.psql("select version()").startswith("PostgreSQL 15.")
    assert pg_cluster.psql("select current_user, current_database()").strip() == "postgres|lookalike_test"


def test_sqlalchemy_psycopg_reaches_postgres_15(pg_cluster: PostgresCluster) -> None:
    engine = sa.create_engine(pg_cluster.url)
    try:
        with engine.connect() as connection:
            version = connection.execute(sa.text("select version()")).scalar_one()
            number = int(connection.execute(sa.text("show server_version_num")).scalar_one())
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL 15.") and number // 10000 == 15


def test_plain_psycopg_and_tcp_reach_the_server(pg_cluster: PostgresCluster) -> None:
    with psycopg.connect(pg_cluster.conninfo()) as connection:
        assert connection.execute("select 1 + 1").fetchone() == (2,)
    with psycopg.connect(host="127.0.0.1", port=pg_cluster.port, user="postgres", dbname="postgres") as connection:
        assert connection.execute("select inet_server_addr()::text").fetchone() == ("127.0.0.1/32",)


def test_pg_url_gives_each_test_its_own_empty_database(pg_cluster: PostgresCluster, pg_url: str) -> None:
    name = sa.make_url(pg_url).database
    assert name != "lookalike_test"
    pg_cluster.psql("create table marker (id int)", db=name)
    other = sa.make_url(pg_cluster.create_database(f"{name}_other")).database
    assert pg_cluster.psql("select count(*) from pg_tables where tablename = 'marker'", db=name).strip() == "1"
    assert pg_cluster.psql("select count(*) from pg_tables where tablename = 'marker'", db=other).strip() == "0"


def test_psql_raises_with_the_server_error(pg_cluster: PostgresCluster) -> None:
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg_cluster.psql("select 1; select * from no_such_table; select 2")
    with pytest.raises(ValueError):
        pg_cluster.create_database('x"; drop database postgres; --')


def test_plpython_is_installed(pg_cluster: PostgresCluster) -> None:
    if not (pg_cluster.bin_dir.parent / "lib" / "plpython3.so").exists() and not os.environ.get("CI"):
        pytest.skip("postgresql-plpython3-15 is not installed")
    db = sa.make_url(pg_cluster.create_database("plpython_check")).database
    pg_cluster.psql("create extension plpython3u", db=db)
    out = pg_cluster.psql("do $$ import sys; plpy.info('python %d' % sys.version_info[0]) $$ language plpython3u;"
                          "select 'ok'", db=db)
    assert out.strip() == "ok"


@pytest.mark.postgres
@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL 15 is not installed")
def test_stop_kills_the_server_and_removes_its_files() -> None:
    with PostgresCluster() as cluster:
        root = cluster.dir
        pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
        assert cluster.psql("select 1").strip() == "1"
    assert not root.exists()
    assert not _running(pid)


@pytest.mark.postgres
@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL 15 is not installed")
def test_killed_test_process_leaves_no_server_behind(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from support.pg import PostgresCluster\n"
        "cluster = PostgresCluster()\n"
        "cluster.start()\n"
        "pid = (cluster.data_dir / 'postmaster.pid').read_text().split()[0]\n"
        "print(cluster.dir, pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no atexit\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    root, pid = result.stdout.split()
    deadline = time.monotonic() + 60
    while (Path(root).exists() or _running(int(pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(root).exists() and not _running(int(pid))


def _running(pid: int) -> bool:
    # A zombie counts as stopped: where PID 1 does not reap, the dead postmaster lingers as one.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- HTTP -----------------------------------------------------------------------------

def test_images_are_served_with_their_content_type(http_server: LocalHTTPServer,
                                                   sample_images: dict[str, bytes]) -> None:
    assert http_server.base_url.startswith("http://127.0.0.1:")
    with httpx.Client(timeout=TIMEOUT) as client:
        for name, content_type in [("a.jpg", "image/jpeg"), ("b.png", "image/png"), ("c.jpg", "image/jpeg")]:
            response = client.get(http_server.url(f"/img/{name}"))
            assert response.status_code == 200
            assert response.headers["content-type"] == content_type
            assert response.content == sample_images[name]
        assert open_image(client.get(http_server.url("/img/c.jpg")).content).size == (60, 80)
        assert client.get(http_server.url("/img/missing.jpg")).status_code == 404
        assert client.get(http_server.url("/404")).status_code == 404
    assert http_server.hits["/img/a.jpg"] == 1 and http_server.hits["/img/c.jpg"] == 2


def test_flaky_route_fails_once_per_name(http_server: LocalHTTPServer, sample_images: dict[str, bytes]) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        codes = [client.get(http_server.url(f"/flaky500/{name}")).status_code
                 for name in ["a.jpg", "a.jpg", "b.png", "a.jpg", "b.png"]]
        assert client.get(http_server.url("/flaky500/b.png")).content == sample_images["b.png"]
    assert codes == [500, 200, 500, 200, 200]
    assert http_server.hits["/flaky500/a.jpg"] == 3


def test_redirect_chain_ends_at_the_image(http_server: LocalHTTPServer, sample_images: dict[str, bytes]) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        first = client.get(http_server.url("/redirect/3/a.jpg"))
        followed = client.get(http_server.url("/redirect/3/a.jpg"), follow_redirects=True)
    assert first.status_code == 302 and first.headers["location"] == "/redirect/2/a.jpg"
    assert followed.status_code == 200 and followed.content == sample_images["a.jpg"]
    assert [r.url.path for r in followed.history] == ["/redirect/3/a.jpg", "/redirect/2/a.jpg", "/redirect/1/a.jpg"]
    assert http_server.hits["/redirect/1/a.jpg"] == 1 and http_server.hits["/img/a.jpg"] == 1


def test_lying_server_sends_html_as_jpeg(http_server: LocalHTTPServer) -> None:
    response = httpx.get(http_server.url("/html"), timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with pytest.raises(ImageError, match="HTML page"):
        open_image(response.content)


def test_endless_streams_without_length_until_the_client_leaves(http_server: LocalHTTPServer) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("GET", http_server.url("/endless")) as response:
            assert response.status_code == 200 and "content-length" not in response.headers
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > 4 * 1024 * 1024:
                    break
        assert client.get(http_server.url("/img/a.jpg")).status_code == 200  # server still answers
    assert received > 4 * 1024 * 1024


def test_huge_declares_100_mib_of_zeros(http_server: LocalHTTPServer) -> None:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", http_server.url("/huge")) as response:
        assert response.headers["content-length"] == str(HUGE_SIZE)
        head = next(response.iter_raw())
    assert head and head.count(0) == len(head)


def test_huge_nolength_sends_100_mib_of_zeros_then_closes(http_server: LocalHTTPServer) -> None:
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", http_server.url("/huge-nolength")) as response:
        assert "content-length" not in response.headers
        received, nonzero = 0, 0
        for chunk in response.iter_raw():
            received += len(chunk)
            nonzero += len(chunk) - chunk.count(0)
    assert received == HUGE_SIZE and nonzero == 0


def test_trickle_sends_a_byte_at_a_time(http_server: LocalHTTPServer) -> None:
    started = time.monotonic()
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", http_server.url("/trickle")) as response:
        assert response.headers["content-length"] == str(TRICKLE_SIZE)
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if len(received) >= 3:
                break
    # Three bytes, two pauses of 0.5 s between them: a lower bound, so load cannot break it.
    assert received == b"xxx" and time.monotonic() - started >= 0.9


def test_hang_never_answers(http_server: LocalHTTPServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(http_server.url("/hang"), timeout=httpx.Timeout(5.0, read=0.3))
    assert http_server.hits["/hang"] == 1


def test_close_cuts_hanging_and_endless_connections(sample_images: dict[str, bytes]) -> None:
    server = LocalHTTPServer(sample_images)
    outcomes: list[str] = []

    def fetch(path: str) -> None:
        try:
            with httpx.stream("GET", server.url(path), timeout=httpx.Timeout(60.0)) as response:
                for _ in response.iter_raw():
                    time.sleep(0.01)  # a slow reader
            outcomes.append(f"{path} ended")
        except httpx.HTTPError:
            outcomes.append(f"{path} cut")

    clients = [threading.Thread(target=fetch, args=(path,)) for path in ["/hang", "/endless", "/trickle"]]
    for client in clients:
        client.start()
    while sum(server.hits.values()) < 3:
        time.sleep(0.01)
    server.close()
    for client in clients:
        client.join(timeout=30)
    assert not any(client.is_alive() for client in clients)
    assert len(outcomes) == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/img/a.jpg"), timeout=TIMEOUT)
