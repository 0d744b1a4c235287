"""Hostile input for the load step and the one fetch policy (issue 10, parts 2 and 5).

Every probe runs against the real components: real files, pipes and symlink
loops; a real SQLite file (two real processes on one file); the throwaway
PostgreSQL, also with a C-locale SQL_ASCII database; misbehaving HTTP servers on
127.0.0.1. Each bad entry must fail alone, recorded with its reason and manifest
line, with nothing lost or doubled; nothing may hang (each test has a timeout).
"""

from __future__ import annotations

import io
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.db import Database, image_sources, images
from lookalike.ingest import MAX_LINE_CHARS, LoadError, load_images
from lookalike.net import FetchError, FetchLimits, Refused, fetch, make_client, read_file, resolve
from lookalike.search import query_bytes
from lookalike.web.app import ApiError, fetch_url
from support.http import LocalHTTPServer
from support.pg import PostgresCluster

CLI = [sys.executable, "-m", "lookalike.cli"]
CLI_TIMEOUT_S = 120
MEMORY_BOUND = 2 * 1024**3  # address space for a CLI load given /dev/zero (it ran out at 3.4 GB before)


def jpeg(seed: int, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


def sources(db: Database) -> dict[str, tuple[str, str | None]]:
    """source -> (status, reason) of every image_sources row; asserts no source is listed twice."""
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(image_sources.c.source, image_sources.c.status,
                                       image_sources.c.reason)).all()
    assert len(found) == len({row.source for row in found}), "a source was recorded twice"
    return {row.source: (row.status, row.reason) for row in found}


def count(db: Database, table: sa.Table) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def cli(*args: str, env: dict | None = None, limit_memory: bool = False) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BOUND, MEMORY_BOUND))
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          env={**os.environ, **(env or {})}, preexec_fn=cap if limit_memory else None)


@pytest.fixture
def hostile_files(tmp_path: Path) -> Path:
    """Good images beside every kind of path that broke a whole load."""
    root = tmp_path / "h"
    (root / "imgs").mkdir(parents=True)
    for i in range(3):
        (root / "imgs" / f"{i}.jpg").write_bytes(jpeg(i))
    (root / "imgs" / os.fsdecode(b"bad\xff.jpg")).write_bytes(jpeg(10))   # invalid UTF-8 name
    os.symlink("loop", root / "loop")                                      # symlink loop
    os.mkfifo(root / "fifo")                                               # a reader would block forever
    (root / "adir").mkdir()
    return root


# ---------------------------------------------------------------- part 2: one bad entry fails alone

@pytest.mark.timeout(120)
def test_every_bad_manifest_entry_fails_alone_with_its_line_and_reason(db, hostile_files):
    root = hostile_files
    manifest = root / "m.tsv"
    lines = [
        b"dotted\timgs/0.jpg",                       # 1 good
        b"dotted\t" + b"n" * 300 + b".jpg",          # 2 a 300-character name
        b"dotted\tloop",                             # 3 symlink loop
        b"dotted\tfifo",                             # 4 named pipe
        b"dotted\t/dev/zero",                        # 5 endless device
        b"dotted\tadir",                             # 6 a folder
        b"dotted\timgs/bad\xff.jpg",                 # 7 invalid UTF-8, exists
        b'dotted\t"imgs/1.jpg',                      # 8 stray quote: no CSV quoting, so a literal name
        b"striped",                                  # 9 one field
        b"dotted\t" + b"x" * MAX_LINE_CHARS,         # 10 a line over the cap
        b"",                                         # 11 blank: not an entry
        b"striped\timgs/2.jpg",                      # 12 good, after all of the above
        b"striped\thttp://[::1",                     # 13 a URL httpx cannot parse
    ]
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    summary = load_images(db, manifest, progress=False)

    m = str(manifest)
    expected = {
        f"{root}/imgs/0.jpg": ("ok", None),
        f"{root}/{'n' * 300}.jpg": ("failed", "line 2: file name too long"),
        f"{root}/loop": ("failed", "line 3: symlink loop"),
        f"{root}/fifo": ("failed", "line 4: not a regular file (a device, pipe or socket)"),
        "/dev/zero": ("failed", "line 5: not a regular file (a device, pipe or socket)"),
        f"{root}/adir": ("failed", "line 6: is a directory"),
        f"{root}/imgs/bad\\xff.jpg": ("ok", None),   # stored backslash-escaped
        f'{root}/"imgs/1.jpg': ("failed", "line 8: file not found"),
        f"{m}:9": ("failed", "line 9: manifest line is not an entry: "
                             "expected 'label<TAB>url-or-path', got 1 field(s)"),
        f"{m}:10": ("failed", f"line 10: manifest line is not an entry: line too long "
                              f"(over {MAX_LINE_CHARS} characters)"),
        f"{root}/imgs/2.jpg": ("ok", None),
        "http://[::1": ("failed", "line 13: not a valid URL"),
    }
    assert sources(db) == expected
    assert (summary.loaded, summary.failed_total) == (3, 9)
    assert count(db, images) == 3

    # Re-run: the good ones (the escaped name too) are skipped, the bad ones tried again, nothing doubled.
    again = load_images(db, manifest, progress=False)
    assert (again.skipped, again.loaded, again.failed_total) == (3, 0, 9)
    assert sources(db) == expected and count(db, images) == 3


@pytest.mark.timeout(60)
def test_a_stray_quote_never_merges_lines(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(100):
        (tmp_path / "imgs" / f"{i:03d}.jpg").write_bytes(jpeg(i))
    tsv = [f"dotted\timgs/{i:03d}.jpg" for i in range(100)]
    tsv[10] = 'dotted\t"imgs/010.jpg'
    (tmp_path / "q.tsv").write_text("\n".join(tsv) + "\n")
    csv_lines = ["label,url,note"] + [f"striped,imgs/{i:03d}.jpg,n{i}" for i in range(100)]
    csv_lines[21] = 'striped,imgs/020.jpg,"unclosed'  # a headered CSV: quoting on, but only within a line
    (tmp_path / "q.csv").write_text("\n".join(csv_lines) + "\n")

    with Database(f"sqlite:///{tmp_path}/q.db", tmp_path / "store") as db:
        tsv_summary = load_images(db, tmp_path / "q.tsv", progress=False)
        assert (tsv_summary.loaded, tsv_summary.failed_total) == (99, 1)  # was: 63 lines lost, exit 0
        assert sources(db)[f'{tmp_path}/"imgs/010.jpg'] == ("failed", "line 11: file not found")

        # The CSV names the same files: only 010 (whose TSV line was broken) is new; its line 22 is broken.
        csv_summary = load_images(db, tmp_path / "q.csv", progress=False)
        assert (csv_summary.skipped, csv_summary.loaded, csv_summary.failed_total) == (98, 1, 1)
        assert sources(db)[f"{tmp_path}/q.csv:22"] == (
            "failed", "line 22: manifest line is not an entry: unbalanced quote (a quoted field cannot span lines)")
        assert count(db, images) == 100 and count(db, image_sources) == 102


@pytest.mark.timeout(60)
def test_a_folder_tree_with_an_invalid_utf8_name_and_a_pipe(tmp_path):
    folder = tmp_path / "tree" / "dotted"
    folder.mkdir(parents=True)
    (folder / os.fsdecode(b"bad\xff.jpg")).write_bytes(jpeg(1))
    (folder / "ok.jpg").write_bytes(jpeg(2))
    os.mkfifo(folder / "pipe.jpg")
    with Database(f"sqlite:///{tmp_path}/t.db", tmp_path / "store") as db:
        summary = load_images(db, tmp_path / "tree", progress=False)
        assert (summary.loaded, summary.failed_total) == (2, 1)
        assert sources(db) == {
            f"{folder}/bad\\xff.jpg": ("ok", None), f"{folder}/ok.jpg": ("ok", None),
            f"{folder}/pipe.jpg": ("failed", "not a regular file (a device, pipe or socket)")}
        assert load_images(db, tmp_path / "tree", progress=False).skipped == 2


@pytest.mark.timeout(120)
def test_dev_zero_in_a_manifest_stays_within_the_memory_bound(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "z.tsv").write_text(f"dotted\t/dev/zero\ndotted\t{tmp_path}/a.jpg\n")
    db_url = f"sqlite:///{tmp_path}/z.db"
    # A CLI load with 2 GB of address space: before, reading /dev/zero hit MemoryError at 3.4 GB.
    done = cli("--db", db_url, "load", str(tmp_path / "z.tsv"), "--store", str(tmp_path / "st"), limit_memory=True)
    assert done.returncode == 0, done.stderr
    assert "loaded 1 new images, 0 already present, 0 sources loaded before, 1 failed" in done.stdout
    with Database(db_url) as db:
        assert sources(db)["/dev/zero"] == ("failed", "line 1: not a regular file (a device, pipe or socket)")


def test_the_size_cap_holds_while_reading_not_only_from_st_size(tmp_path):
    # /proc files say st_size 0 and have content: only a cap enforced while reading stops them.
    maps = Path(f"/proc/{os.getpid()}/maps")
    assert maps.stat().st_size == 0
    with pytest.raises(FetchError, match=r"^too large: over 100 bytes$"):
        read_file(str(maps), 100)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * 1000)
    with pytest.raises(FetchError, match=r"^too large: 1000 bytes, limit 999$"):
        read_file(str(big), 999)
    assert read_file(str(big), 1000) == b"\0" * 1000


@pytest.mark.timeout(30)
def test_every_query_path_reads_through_the_same_policy():
    # `similar` by path (CLI, PL/Python similar_images(text)) goes through query_bytes -> fetch.
    for path, reason in [("/dev/zero", "not a regular file"), ("/etc", "is a directory")]:
        with pytest.raises(FetchError, match=f"cannot read query image: {reason}"):
            query_bytes(path, FetchLimits())


# ---------------------------------------------------------------- file content never in an error

@pytest.mark.timeout(60)
def test_a_manifest_line_is_never_echoed_in_an_error(db, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\napi-key s3cr3t\n")
    secret.chmod(0o600)
    with pytest.raises(LoadError) as info:
        load_images(db, secret, progress=False)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)
    assert str(info.value).startswith("secret.txt: no line is an entry (line 1: expected 'label,url-or-path'")
    header = tmp_path / "header.csv"
    header.write_text("hunter2,s3cr3t\nx,y\n")
    with pytest.raises(LoadError) as info:
        load_images(db, header, label_column="hunter2", progress=False)
    assert "s3cr3t" not in str(info.value) and "the header (line 1) has no url/path column" in str(info.value)
    assert count(db, image_sources) == 0

    # In a manifest that has entries, a bad line is recorded by its number alone.
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("dotted\ta.jpg\npassword=hunter2\n")
    load_images(db, mixed, progress=False)
    recorded = repr(sources(db))
    assert "hunter2" not in recorded and "line 2: manifest line is not an entry" in recorded


# ---------------------------------------------------------------- C-locale PostgreSQL

@pytest.mark.timeout(300)
def test_non_ascii_and_undecodable_names_on_a_c_locale_sql_ascii_database(pg_cluster: PostgresCluster, tmp_path):
    name = "c_locale_sql_ascii"
    pg_cluster.psql(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
                    "TEMPLATE template0", db="postgres")
    folder = tmp_path / "tree" / "dotted"
    folder.mkdir(parents=True)
    (folder / "café.jpg").write_bytes(jpeg(1))
    (folder / os.fsdecode(b"bad\xff.jpg")).write_bytes(jpeg(2))
    url = pg_cluster.url_for(name)
    done = cli("--db", url, "load", str(tmp_path / "tree"), "--store", str(tmp_path / "st"))
    assert done.returncode == 0, done.stderr
    assert "loaded 2 new images" in done.stdout
    with Database(url) as db:
        assert sources(db) == {f"{folder}/café.jpg": ("ok", None), f"{folder}/bad\\xff.jpg": ("ok", None)}


@pytest.mark.timeout(600)
def test_call_load_images_on_a_non_ascii_name_in_a_c_locale_server(pg_cluster: PostgresCluster, pg_url):
    # The test cluster is initdb --locale=C: the server's Python has an ASCII filesystem encoding.
    from lookalike.plpython import install
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="lkload-"))  # a folder the server's OS user may enter
    try:
        tree = root / "tree" / "dotted"
        tree.mkdir(parents=True)
        (tree / "café.jpg").write_bytes(jpeg(1))
        (tree / "plain.jpg").write_bytes(jpeg(2))
        store = root / "store"
        store.mkdir()
        owner = pg_cluster.data_dir.stat()
        for path in [root, root / "tree", tree, *tree.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.chown(store, owner.st_uid, owner.st_gid)
        install(pg_url, root / "python", store_dir=store)
        pg_cluster.psql(f"CALL lookalike.load_images('{root / 'tree'}')", db=sa.engine.make_url(pg_url).database)
        with Database(pg_url) as db:
            assert sources(db) == {f"{tree}/café.jpg": ("ok", None), f"{tree}/plain.jpg": ("ok", None)}
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


# ---------------------------------------------------------------- two loads on one SQLite file

@pytest.mark.timeout(300)
def test_two_loads_at_once_on_one_sqlite_file_lose_and_double_nothing(tmp_path):
    tree = tmp_path / "tree"
    for i in range(300):
        folder = tree / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(jpeg(i % 250))  # 50 files share their bytes with another
    db_url = f"sqlite:///{tmp_path}/both.db"
    Database(db_url, tmp_path / "st").close()  # the schema first, so both processes race on rows only
    args = [*CLI, "--db", db_url, "load", str(tree), "--store", str(tmp_path / "st"), "--concurrency", "2"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=CLI_TIMEOUT_S) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err  # before: one crashed on UNIQUE images.sha256 and lost its batch
    with Database(db_url) as db:
        assert count(db, images) == 250
        recorded = sources(db)
        assert len(recorded) == 300 and {status for status, _ in recorded.values()} == {"ok"}


# ---------------------------------------------------------------- part 3: one deadline for the whole request

@pytest.mark.timeout(60)
def test_slow_headers_are_stopped_by_the_deadline(tmp_path):
    with LocalHTTPServer() as server:
        limits = FetchLimits(timeout=1.5, deadline=2.0, retries=3, backoff=0.05)
        with make_client(limits, 1) as client:
            started = time.monotonic()
            with pytest.raises(FetchError, match=r"^too slow: not finished in 2 s$"):
                fetch(server.url("/slow-headers"), client, limits)  # a byte every 0.5 s: no read times out
            assert time.monotonic() - started < 2.0 + 5  # a hang bound: the headers alone take a minute

        # The CLI probe: slow headers took 48 s with --deadline 10 (retries each got their own).
        (tmp_path / "s.tsv").write_text(f"dotted\t{server.url('/slow-headers')}\n")
        started = time.monotonic()
        done = cli("--db", f"sqlite:///{tmp_path}/s.db", "load", str(tmp_path / "s.tsv"),
                   "--store", str(tmp_path / "st"), "--deadline", "3", "--timeout", "2")
        assert time.monotonic() - started < 50  # a hang bound, CLI start-up included: the headers take 60 s
        assert "too slow: not finished in 3 s" in done.stdout, done.stdout + done.stderr
        assert server.hits["/slow-headers"] == 2  # one from fetch(), one from the CLI: never retried past it


# ---------------------------------------------------------------- part 5: the SSRF guard connects where it checked

LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "127.255.255.254", "localhost",
                      "LocalHost", "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
                      "0.0.0.0", "0", "[::]"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_every_spelling_is_refused(host):
    with LocalHTTPServer({"a.jpg": jpeg(1)}) as server:
        port = server.base_url.rsplit(":", 1)[1]
        limits = FetchLimits(retries=0)
        with make_client(limits, 1, allow_private=False) as client, pytest.raises(Refused, match="^refused: "):
            fetch(f"http://{host}:{port}/img/a.jpg", client, limits)
        with pytest.raises(ApiError) as info:
            fetch_url(f"http://{host}:{port}/img/a.jpg", limits)  # the web's path: private refused by default
        assert info.value.status == 400 and info.value.message.startswith("refused: ")
        assert sum(server.hits.values()) == 0  # refused before any request


def test_a_url_that_cannot_be_parsed_is_a_clear_400():
    with pytest.raises(ApiError) as info:
        fetch_url("http://[::1/a.jpg", FetchLimits())  # was: a ValueError, so a 500
    assert (info.value.status, info.value.message) == (400, "not a valid URL")


@pytest.mark.timeout(60)
def test_the_address_checked_is_the_address_connected_to(monkeypatch):
    lookups: list[tuple[str, list[str]]] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host, *args, **kwargs):  # the real resolver (from /etc/hosts), recorded
        infos = real_getaddrinfo(host, *args, **kwargs)
        lookups.append((host, [info[4][0] for info in infos]))
        return infos

    with LocalHTTPServer() as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        assert resolve("localhost", port, allow_private=True)  # /etc/hosts knows localhost
        monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
        limits = FetchLimits(retries=0)
        with make_client(limits, 1) as client, client.stream("GET", f"http://localhost:{port}/echo-host") as response:
            connected = response.extensions["network_stream"].get_extra_info("server_addr")[0]
            body = response.read()
        # The name is looked up once, for the check; after it only the checked address itself (numeric,
        # no name lookup) reaches getaddrinfo, and that is where the connection went.
        (name, checked), *after = lookups
        assert name == "localhost" and connected in checked
        assert after and all(host in checked for host, _ in after)
        assert body == f"localhost:{port}".encode()  # the Host header is still the URL's name
