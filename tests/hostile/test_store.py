"""Hostile days for the database file and the image store, through the real CLI in a subprocess.

Bad database files (text, JPEG, cut short, damaged pages, read-only) give one
line and touch nothing; a full disk (a real 1 MiB tmpfs) gives one line saying
what was kept; kill -9 mid-load leaves leftovers that `lookalike store check`
reports and `--fix` removes, and the load resumes with nothing lost or doubled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

CLI = [sys.executable, "-m", "lookalike.cli"]
CLI_TIMEOUT_S = 120
HOUR = 3600


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOOKALIKE_DB": "", "LOOKALIKE_STORE": ""}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)


def one_error_line(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """Assert exit 2 and exactly one `error: …` line on stderr containing every phrase."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash (what `nothing created or modified` compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def make_images(folder: Path, count: int, label: str = "noise", start: int = 0) -> list[Path]:
    """``count`` small PNGs with distinct bytes (for distinct ``start``) under folder/label/."""
    (folder / label).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        img = Image.new("RGB", (24, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        img.putpixel((i % 24, i // 24 % 24), (255 - i % 256, 0, 0))
        path = folder / label / f"img_{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


def rows(db_file: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def store_files(store: Path) -> dict[str, Path]:
    return {p.name: p for p in store.glob("??/*") if p.is_file() and not p.name.startswith(".")}


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (file or folder) read-only for the CLI: chmod, or as root a read-only bind mount."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    with mounted(["--bind", str(path), str(path)], path):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True, timeout=30)
        yield


@contextlib.contextmanager
def mounted(mount_args: list[str], target: Path):
    result = subprocess.run(["mount", *mount_args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()}); needs root with mount rights, as in CI")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


@pytest.fixture
def good_db(tmp_path: Path) -> Path:
    """A real lookalike SQLite file with three loaded images."""
    from lookalike.db import Database
    from lookalike.ingest import load_images
    make_images(tmp_path / "src", 3)
    with Database(f"sqlite:///{tmp_path}/good.db") as db:
        assert load_images(db, tmp_path / "src", progress=False).loaded == 3
    return tmp_path / "good.db"


def _damaged_pages(data: bytes) -> bytes:
    return data[:4096] + b"\xff" * (len(data) - 4096)


BAD_FILES = {
    "text": (lambda good: b"just some notes\n", "is not a SQLite database"),
    "jpeg": (lambda good: _jpeg(), "is not a SQLite database"),
    "half": (lambda good: good[:len(good) // 2], "damaged"),
    "header-only": (lambda good: good[:50], "damaged"),
    "damaged-pages": (_damaged_pages, "damaged"),
}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_database_file_is_one_line_and_untouched(kind, good_db, tmp_path):
    make_bytes, phrase = BAD_FILES[kind]
    bad = tmp_path / "bad" / "x.db"
    bad.parent.mkdir()
    bad.write_bytes(make_bytes(good_db.read_bytes()))
    before = snapshot(bad.parent)
    commands = [["status"]]
    if kind in ("text", "half"):   # every command goes through the same open; two more suffice
        commands += [["load", "src"], ["store", "check", "--fix"]]
    for command in commands:
        result = cli("--db", f"sqlite:///{bad}", "--store", str(tmp_path / "bad" / "store"), *command, cwd=tmp_path)
        one_error_line(result, "cannot open database", phrase)
        assert result.stdout == ""
        assert snapshot(bad.parent) == before, command


@pytest.mark.timeout(300)
def test_a_read_only_database_is_one_line_and_untouched(good_db, tmp_path):
    before = snapshot(tmp_path)
    with read_only(good_db):
        for command in (["status"], ["--store", str(tmp_path / "elsewhere"), "status"], ["load", "src"]):
            result = cli("--db", f"sqlite:///{good_db}", *command, cwd=tmp_path)
            one_error_line(result, "read-only")
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(300)
def test_a_read_only_database_folder_is_one_line_and_untouched(good_db, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "new.db").write_bytes(good_db.read_bytes())
    before = snapshot(tmp_path)
    with read_only(folder):
        for db in ("new.db", "missing.db", "sub/missing.db"):
            # db init: status refuses a missing file before it reaches the folder
            result = cli("--db", f"sqlite:///{folder / db}", "db", "init", cwd=tmp_path)
            one_error_line(result, "read-only")
    assert snapshot(tmp_path) == before


@pytest.mark.timeout(300)
def test_a_read_only_store_folder_is_one_line_and_keeps_nothing_half(tmp_path):
    make_images(tmp_path / "src", 5)
    store = tmp_path / "store"
    store.mkdir()
    with read_only(store):
        result = cli("--db", f"sqlite:///{tmp_path}/t.db", "--store", str(store), "load", "src", cwd=tmp_path)
        one_error_line(result, "image store", "read-only", "kept 0 new images")
    assert list(store.iterdir()) == []
    assert rows(tmp_path / "t.db", "SELECT count(*) FROM images") == [(0,)]
    result = cli("--db", f"sqlite:///{tmp_path}/t.db", "load", "src", cwd=tmp_path)   # writable again: all in
    assert result.returncode == 0, result.stderr
    assert rows(tmp_path / "t.db", "SELECT count(*) FROM images") == [(5,)]


@pytest.mark.timeout(300)
def test_disk_full_under_the_store_says_what_was_kept_and_leaves_no_partial_file(tmp_path):
    paths = make_images(tmp_path / "src", 40)
    disk = tmp_path / "disk"
    disk.mkdir()
    db_file = tmp_path / "t.db"
    with mounted(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], disk):
        result = cli("--db", f"sqlite:///{db_file}", "--store", str(disk / "store"), "load", "src", cwd=tmp_path)
        one_error_line(result, "the disk is full", "kept", "new images")
        on_disk = store_files(disk / "store")
        assert on_disk and len(on_disk) < len(paths)
        for sha, path in on_disk.items():   # nothing partial under a final name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert not list((disk / "store").rglob(".tmp-*"))
        for (sha,) in rows(db_file, "SELECT sha256 FROM images"):   # every committed row has its bytes
            assert sha in on_disk
    # Space again (the tmpfs is gone): the same command finishes, nothing doubled.
    result = cli("--db", f"sqlite:///{db_file}", "--store", str(tmp_path / "store"), "load", "src", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert rows(db_file, "SELECT count(*), count(DISTINCT sha256) FROM images") == [(40, 40)]
    assert rows(db_file, "SELECT count(*) FROM image_sources WHERE status = 'ok'") == [(40,)]


@pytest.mark.timeout(300)
def test_disk_full_under_the_database_is_one_line_and_keeps_what_committed(tmp_path):
    make_images(tmp_path / "first", 3)
    make_images(tmp_path / "second", 30, start=100)
    disk = tmp_path / "disk"
    disk.mkdir()
    db_file = disk / "t.db"
    url = f"sqlite:///{db_file}"
    with mounted(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], disk):
        assert cli("--db", url, "--store", str(tmp_path / "store"), "load", "first", cwd=tmp_path).returncode == 0
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        # Leave room to open (the 32 KiB -shm and a page or two of WAL), not to commit 30 rows.
        (disk / "filler").write_bytes(b"\0" * (free - 40 * 1024))
        result = cli("--db", url, "--store", str(tmp_path / "store"), "load", "second", cwd=tmp_path)
        one_error_line(result, "the disk is full")
        # The failed transaction left no trace but the load's audit row, when that row still fit.
        assert rows(db_file, "SELECT count(*) FROM image_sources") == [(3,)]
        assert rows(db_file, "SELECT step, outcome FROM runs ORDER BY id") in (
            [("load", "ok")], [("load", "ok"), ("load", "failed")])
        (disk / "filler").unlink()
        assert rows(db_file, "SELECT count(*) FROM images") == [(3,)]
        result = cli("--db", url, "--store", str(tmp_path / "store"), "load", "second", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert rows(db_file, "SELECT count(*), count(DISTINCT sha256) FROM images") == [(33, 33)]


# ---------------------------------------------------------------- kill -9 and `store check`

class _SlowImages(BaseHTTPRequestHandler):
    """Serves ``server.images[name]`` after ``DELAY_S``: a load that takes seconds, not milliseconds."""

    DELAY_S = 0.1
    timeout = 10

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.images.get(self.path.rsplit("/", 1)[-1])
        time.sleep(self.DELAY_S)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def slow_server(images: dict[str, bytes]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    server.daemon_threads = True
    server.images = images
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _committed(db_file: Path) -> int:
    try:
        return rows(db_file, "SELECT count(*) FROM images")[0][0]
    except sqlite3.Error:   # not created yet
        return 0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.timeout(300)
def test_kill_9_mid_load_then_store_check_fix_and_reload(tmp_path):
    count = 80
    images = {p.name: p.read_bytes() for p in make_images(tmp_path / "src", count)}
    db_file, store = tmp_path / "t.db", tmp_path / "store"
    args = ["--db", f"sqlite:///{db_file}", "--store", str(store)]
    with slow_server(images) as base:
        manifest = tmp_path / "urls.tsv"
        manifest.write_text("".join(f"noise\t{base}/img/{name}\n" for name in sorted(images)))
        proc = subprocess.Popen([*CLI, *args, "load", str(manifest), "--concurrency", "2"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Kill once a batch has committed and bytes of the next are stored but not yet recorded.
            deadline, committed = time.monotonic() + 60, 0
            while time.monotonic() < deadline and proc.poll() is None:
                committed = _committed(db_file)
                if committed and len(store_files(store)) > committed:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert 0 < committed < count, "the load finished before it could be killed mid-way"

        shas = {sha for (sha,) in rows(db_file, "SELECT sha256 FROM images")}
        orphans = set(store_files(store)) - shas
        assert orphans, "kill -9 left no bytes without a row"
        (store / ".tmp").mkdir(exist_ok=True)
        left_by_kill = len(list((store / ".tmp").iterdir()))   # a write the kill cut short leaves its temp file
        old_temp, young_temp = store / ".tmp" / ".tmp-old", store / ".tmp" / ".tmp-young"
        for temp in (old_temp, young_temp):   # what a kill during a write leaves
            temp.write_bytes(b"half an image")
        _age(old_temp, 2 * HOUR)

        result = cli(*args, "store", "check", cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"orphans:   {len(orphans):>6}" in result.stdout
        assert f"temporary: {left_by_kill + 2:>6}" in result.stdout, result.stdout
        assert f"missing:   {0:>6}" in result.stdout and f"damaged:   {0:>6}" in result.stdout

        # The default grace period spares what a running load may still record: only the old temp file goes.
        result = cli(*args, "store", "check", "--fix", cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "deleted 1 orphan and temporary files" in result.stdout
        assert not old_temp.exists() and young_temp.exists() and orphans <= set(store_files(store))

        result = cli(*args, "store", "check", "--fix", "--grace", "0", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert set(store_files(store)) == shas and not young_temp.exists()

        # The next writing run sweeps temp files older than the grace period, and finishes the load.
        old_temp.write_bytes(b"left by another kill")
        _age(old_temp, 2 * HOUR)
        result = cli(*args, "load", str(manifest), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert not old_temp.exists()
    assert rows(db_file, "SELECT count(*), count(DISTINCT sha256) FROM images") == [(count, count)]
    assert rows(db_file, "SELECT count(*), count(DISTINCT source) FROM image_sources "
                         "WHERE status = 'ok'") == [(count, count)]
    assert set(store_files(store)) == {hashlib.sha256(b).hexdigest() for b in images.values()}
    result = cli(*args, "store", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_store_check_marks_missing_and_damaged_rows_failed_and_never_follows_links(tmp_path):
    make_images(tmp_path / "src", 6)
    db_file, store = tmp_path / "t.db", tmp_path / "store"
    args = ["--db", f"sqlite:///{db_file}", "--store", str(store)]
    assert cli(*args, "load", "src", cwd=tmp_path).returncode == 0
    ids = dict(rows(db_file, "SELECT sha256, id FROM images"))
    (gone, gone_id), (changed, changed_id) = sorted(ids.items())[:2]
    store_files(store)[gone].unlink()
    store_files(store)[changed].write_bytes(b"not what was stored")
    # A link named like an image, pointing at an endless device: reported, never read or deleted.
    trap = store / "ab" / ("ab" + "0" * 62)
    trap.parent.mkdir(exist_ok=True)
    trap.symlink_to("/dev/zero")
    (store / "notes.txt").write_text("mine")

    result = cli(*args, "store", "check", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"missing:   {1:>6}" in out and f"image {gone_id}" in out
    assert f"damaged:   {1:>6}" in out and f"image {changed_id}" in out
    assert f"unknown:   {2:>6}" in out and str(trap) in out

    result = cli(*args, "store", "check", "--fix", "--grace", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "marked 2 images rows failed" in result.stdout
    assert rows(db_file, "SELECT id, status, reason FROM images WHERE status = 'failed' ORDER BY id") == sorted([
        (gone_id, "failed", "missing from the image store"),
        (changed_id, "failed", "damaged in the image store: its bytes do not hash to its sha256")])
    assert rows(db_file, "SELECT count(*) FROM images") == [(6,)]          # rows are never deleted
    assert trap.is_symlink() and (store / "notes.txt").exists()
    result = cli(*args, "store", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_check_store_on_both_databases(db, tmp_path):
    from lookalike.ingest import load_images
    from lookalike.store_check import check_store

    make_images(tmp_path / "src", 4)
    assert load_images(db, tmp_path / "src", progress=False).loaded == 4
    orphan = db.store.put(b"bytes whose row never committed")
    (gone,) = [sha for sha in store_files(db.store.root) if sha != orphan][:1]
    db.store.path(gone).unlink()

    check = check_store(db)
    assert [p.name for p in check.orphans] == [orphan] and len(check.missing) == 1 and not check.clean
    check = check_store(db, fix=True, grace=0)
    assert check.deleted == 1 and check.marked_failed == 1 and check.clean
    assert not db.store.has(orphan)
    check = check_store(db)
    assert check.clean and check.files == 3
