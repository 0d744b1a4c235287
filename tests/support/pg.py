"""A throwaway PostgreSQL 15 server for tests.

``initdb`` and ``postgres`` refuse to run as root, so when the tests run as root
the server runs as the ``postgres`` OS user, in a temp dir that user owns. The
server listens on a unix socket in that dir and on 127.0.0.1 at a free port,
with trust auth for the ``postgres`` role, so any local client (root included)
can connect. Durability is switched off: the data lives only as long as the test
session.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

PG_MAJOR = 15
SUPERUSER = "postgres"
DEFAULT_DB = "lookalike_test"
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with its NUL).
MAX_SOCKET_PATH = 107
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Runs beside the test process and waits for its end of a pipe to close, which
# happens however that process ends (even SIGKILL, or `timeout` sending SIGTERM,
# which skips atexit). Then, if the cluster's dir is still there, it stops the
# server and deletes the dir, so an aborted test run leaks no server.
_WATCHDOG = """
import os, shutil, subprocess, sys
sys.stdin.buffer.read()
root, stop_command = sys.argv[1], sys.argv[2:]
if os.path.isdir(root):
    subprocess.run(stop_command, cwd=root, capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)
"""


def find_pg_bin() -> Path | None:
    """The bin dir of a PostgreSQL 15 install (``$LOOKALIKE_PG_BIN`` wins), or None."""
    candidates = [os.environ.get("LOOKALIKE_PG_BIN"), f"/usr/lib/postgresql/{PG_MAJOR}/bin"]
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(result.stdout.strip())
    for candidate in candidates:
        if not candidate:
            continue
        bin_dir = Path(candidate)
        postgres = bin_dir / "postgres"
        if not (postgres.is_file() and (bin_dir / "initdb").is_file() and (bin_dir / "psql").is_file()):
            continue
        version = subprocess.run([str(postgres), "--version"], capture_output=True, text=True).stdout
        # e.g. "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
        match = re.search(r"\) (\d+)", version)
        if match and int(match.group(1)) == PG_MAJOR:
            return bin_dir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A PostgreSQL server in a temp dir; ``start()``/``stop()`` or use as a context manager.

    ``url`` is the SQLAlchemy URL of the ``lookalike_test`` database, created on start.
    """

    def __init__(self, base_dir: Path | None = None, env: dict[str, str] | None = None):
        """``env``: extra environment variables for the server process."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(f"PostgreSQL {PG_MAJOR} is not installed (apt-get install postgresql-{PG_MAJOR})")
        self.bin_dir = bin_dir
        self.base_dir = Path(base_dir) if base_dir is not None else Path("/tmp")
        self.env = dict(env or {})
        self.dir: Path | None = None  # created by start(): holds the socket, data/ and server.log
        self.port = 0
        self.url = ""
        self._watchdog: subprocess.Popen | None = None
        self._watchdog_pipe: int | None = None  # our end; closing it wakes the watchdog

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Create a fresh cluster, start the server and create the default database."""
        if self.dir is not None:
            raise RuntimeError("cluster already started")
        self.dir = Path(tempfile.mkdtemp(prefix="lkpg-", dir=self.base_dir))
        self.port = _free_port()
        if len(str(self.socket_path)) > MAX_SOCKET_PATH:
            self._remove_dir()
            raise RuntimeError(f"socket path too long for a unix socket: {self.socket_path}")
        try:
            self._give_dir_to_server_user()
            self._start_watchdog()
            self._server_cmd(["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
                              "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.dir}'",
                # Throwaway data: skip durability, it only costs time.
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "200",  # tests that never dispose their engines keep connections
                "log_min_messages": "warning",
            }
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
            self._server_cmd(["pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                              "-l", str(self.dir / "server.log")])
            self.url = self.create_database(DEFAULT_DB)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server at once and delete everything it wrote; safe to call twice."""
        if self.dir is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._server_cmd(["pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data_dir)])
            except RuntimeError:
                self._kill_postmaster()
        self._remove_dir()
        self._stop_watchdog()

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- use ---------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._started_dir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._started_dir()

    @property
    def socket_path(self) -> Path:
        return self._started_dir() / f".s.PGSQL.{self.port}"

    def url_for(self, db: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver, over the unix socket) of database ``db``."""
        return f"postgresql+psycopg://{SUPERUSER}@/{db}?host={self.socket_dir}&port={self.port}"

    def conninfo(self, db: str = DEFAULT_DB) -> str:
        """libpq connection string for plain ``psycopg.connect``."""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={db}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain lower-case identifier) and return its URL."""
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain identifier: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"', db="postgres")
        return self.url_for(name)

    def psql(self, sql: str, db: str = DEFAULT_DB) -> str:
        """Run ``sql`` through the real psql client; return its unaligned, tuples-only stdout.

        Stops at the first error and raises RuntimeError carrying psql's stderr.
        """
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", db, "-f", "-"],
            input=sql, capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    # -- internals ---------------------------------------------------------

    def _started_dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("cluster not started")
        return self.dir

    def _as_owner(self) -> list[str]:
        # The server binaries refuse root; drop to the postgres user when we are root.
        return ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []

    def _give_dir_to_server_user(self) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(self._started_dir(), owner.pw_uid, owner.pw_gid)

    def _start_watchdog(self) -> None:
        read_end, self._watchdog_pipe = os.pipe()  # not inherited by other children
        stop = self._as_owner() + [str(self.bin_dir / "pg_ctl"), "stop", "-w", "-m", "immediate",
                                   "-D", str(self.data_dir)]
        # Own session: a Ctrl-C or SIGTERM sent to the test's process group must not reach it.
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.dir), *stop],
                                          stdin=read_end, start_new_session=True)
        os.close(read_end)

    def _stop_watchdog(self) -> None:
        # Our cleanup is done; end the watchdog directly, as forked children of
        # this process may hold copies of the pipe and keep it from seeing EOF.
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)
            self._watchdog_pipe = None

    def _server_cmd(self, args: list[str]) -> None:
        command = self._as_owner() + [str(self.bin_dir / args[0]), *args[1:]]
        # cwd: the postgres user may not be allowed into the caller's working dir.
        result = subprocess.run(command, capture_output=True, text=True, cwd=self._started_dir(), timeout=120,
                                env={**os.environ, **self.env})
        if result.returncode != 0:
            log = self.dir / "server.log" if self.dir else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 9)
        except (OSError, ValueError, IndexError):
            pass

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
