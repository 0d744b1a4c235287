"""`lookalike serve` (a real server on 127.0.0.1: start, one request, stop) and `lookalike db`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from support.cli import lookalike

START_LIMIT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_serve_answers_one_request_then_stops_on_ctrl_c(tmp_path):
    assert lookalike("db", "init", "--db", f"sqlite:///{tmp_path}/s.db").code == 0  # a database to serve
    port = free_port()
    # A process of its own: uvicorn serves until a signal, and Ctrl-C is how a user stops it.
    server = subprocess.Popen([sys.executable, "-m", "lookalike.cli", "serve", "--db", f"sqlite:///{tmp_path}/s.db",
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, health = time.monotonic() + START_LIMIT_S, None
        while health is None and time.monotonic() < deadline and server.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None, server.stderr.read() if server.poll() is not None else "not up in time"
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["database"] == "sqlite"
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert f"serving sqlite database on http://127.0.0.1:{port}/" in out


def test_serve_refuses_a_database_it_cannot_open(tmp_path):
    (tmp_path / "not.db").write_bytes(b"this is not a database, it is a text file of some length" * 4)
    refused = lookalike("serve", "--db", f"sqlite:///{tmp_path}/not.db", "--port", free_port())
    assert refused.code == 2 and "the file is not a SQLite database" in refused.err


def test_db_install_is_for_postgresql_only(tmp_path):
    refused = lookalike("db", "install", "--db", f"sqlite:///{tmp_path}/x.db", "--target", tmp_path / "py")
    assert refused.code == 2 and refused.err.strip() == (
        "error: `db install` is for PostgreSQL; on SQLite every step already runs in-process")
    assert not (tmp_path / "py").exists()


def test_db_uninstall_on_a_database_without_procedures_keeps_its_data(pg_url):
    assert lookalike("status", "--db", pg_url).code == 0  # the schema and its tables
    done = lookalike("db", "uninstall", "--db", pg_url)
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        f"dropped 0 PL/Python routines from {done.out.split(' from ', 1)[1].splitlines()[0]}",
        "  no package folder removed", "  schema lookalike and its data are kept (--drop-data drops them)"]
    assert lookalike("status", "--db", pg_url).code == 0
    dropped = lookalike("db", "uninstall", "--drop-data", "--db", pg_url)
    assert dropped.code == 0 and "dropped schema lookalike and all its data" in dropped.out
