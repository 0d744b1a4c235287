"""The load step on real files, a real HTTP server, SQLite and PostgreSQL."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.db import Database, image_sources, images
from lookalike.ingest import FetchLimits, LoadError, load_images
from lookalike.store import sha256_hex

from support.corpus import CORPUS

LOOKALIKE = [sys.executable, "-m", "lookalike.cli"]


def jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def rows(db, table, *columns, where=None):
    query = sa.select(*[table.c[c] for c in columns])
    if where is not None:
        query = query.where(where)
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query.order_by(*[table.c[c] for c in columns]))]


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"dotted/a.jpg": jpeg(1), "dotted/deep/nested/b.jpg": jpeg(2, (80, 30)),
             "striped/c.jpg": jpeg(3), "striped/same-as-a.jpg": jpeg(1)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "README.txt").write_text("not in a label folder: ignored")
    (root / "striped" / ".hidden.jpg").write_bytes(jpeg(9))
    return files


def test_folder_tree_labels_sizes_store_and_shared_bytes(db, tmp_path):
    files = make_tree(tmp_path / "tree")
    summary = load_images(db, tmp_path / "tree")
    assert (summary.loaded, summary.already_present, summary.failed_total) == (3, 1, 0)

    stored = rows(db, images, "label", "width", "height", "format", "byte_size", "sha256", "status")
    assert sorted(stored) == sorted([
        ("dotted", 64, 48, "JPEG", len(files["dotted/a.jpg"]), sha256_hex(files["dotted/a.jpg"]), "ok"),
        ("dotted", 80, 30, "JPEG", len(files["dotted/deep/nested/b.jpg"]),
         sha256_hex(files["dotted/deep/nested/b.jpg"]), "ok"),
        ("striped", 64, 48, "JPEG", len(files["striped/c.jpg"]), sha256_hex(files["striped/c.jpg"]), "ok"),
    ])
    # The same bytes under two names: one image, both sources recorded and pointing at it.
    shared = sha256_hex(files["dotted/a.jpg"])
    (image_id,) = rows(db, images, "id", where=images.c.sha256 == shared)[0]
    sources = rows(db, image_sources, "source", where=image_sources.c.image_id == image_id)
    assert sorted(Path(s).name for (s,) in sources) == ["a.jpg", "same-as-a.jpg"]
    for rel, data in files.items():
        assert db.store.get(sha256_hex(data)) == data

    again = load_images(db, tmp_path / "tree")
    assert (again.loaded, again.skipped) == (0, 4)
    assert len(rows(db, images, "id")) == 3


def test_headerless_manifest_in_the_original_format(db, tmp_path):
    make_tree(tmp_path / "tree")
    manifest = tmp_path / "fashion_texture_urls.tsv"
    manifest.write_text("dotted\ttree/dotted/a.jpg\n\nstriped\ttree/striped/c.jpg\n")
    summary = load_images(db, manifest)
    assert summary.loaded == 2
    assert rows(db, images, "label") == [("dotted",), ("striped",)]


def test_csv_manifest_with_header_label_column_and_metadata(db, tmp_path):
    make_tree(tmp_path / "tree")
    manifest = tmp_path / "paintings.csv"
    manifest.write_text("Artist,Name,URL,EncodingFormat\n"
                        "Monet,Water Lilies,tree/dotted/a.jpg,jpeg\n"
                        "Klimt,The Kiss,tree/striped/c.jpg,jpeg\n")
    with pytest.raises(LoadError, match="no 'Painter' column"):
        load_images(db, manifest, label_column="Painter")
    load_images(db, manifest, label_column="Artist")
    assert rows(db, images, "label", "metadata") == [
        ("Klimt", '{"EncodingFormat": "jpeg", "Name": "The Kiss"}'),
        ("Monet", '{"EncodingFormat": "jpeg", "Name": "Water Lilies"}'),
    ]


def test_manifests_with_no_entry_are_refused_before_anything_is_written(db, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("dotted\nstriped\n\nsecret-looking text\n")
    with pytest.raises(LoadError, match=r"no line is an entry \(line 1: expected 'label<TAB>url-or-path'") as info:
        load_images(db, bad)
    assert "secret" not in str(info.value)  # never the line's text
    with pytest.raises(LoadError, match="no such folder"):
        load_images(db, tmp_path / "missing")
    assert rows(db, image_sources, "id") == []


def test_a_bad_manifest_line_fails_alone_with_its_line_number(db, tmp_path):
    make_tree(tmp_path / "tree")
    manifest = tmp_path / "m.tsv"
    manifest.write_text("dotted\ttree/dotted/a.jpg\n\nstriped\n" "striped\ttree/striped/c.jpg\n")
    summary = load_images(db, manifest)
    assert summary.loaded == 2 and summary.failed_total == 1
    assert rows(db, image_sources, "source", "status", "reason", where=image_sources.c.status == "failed") == [
        (f"{manifest}:3", "failed", "line 3: manifest line is not an entry: "
                                    "expected 'label<TAB>url-or-path', got 1 field(s)")]


def test_url_downloads_good_and_bad(db, tmp_path, http_server):
    u = http_server.url
    manifest = tmp_path / "urls.tsv"
    lines = {
        "ok-jpg": u("/img/a.jpg"), "ok-png": u("/img/b.png"), "flaky": u("/flaky500/c.jpg"),
        "redirected": u("/redirect/3/a.jpg"), "loop": u("/redirect/20/b.png"), "missing": u("/404"),
        "html": u("/html"), "endless": u("/endless"), "huge": u("/huge"), "huge-nolength": u("/huge-nolength"),
        "trickle": u("/trickle"), "hang": u("/hang"), "ftp": "ftp://127.0.0.1/x.jpg",
        "refused": "http://127.0.0.1:9/x.jpg",
    }
    manifest.write_text("".join(f"{label}\t{url}\n" for label, url in lines.items()))
    limits = FetchLimits(max_bytes=2 * 1024 * 1024, timeout=1.5, deadline=3.0, retries=2, backoff=0.05)
    started = time.monotonic()
    summary = load_images(db, manifest, limits=limits)
    assert time.monotonic() - started < 60  # nothing hangs: every slow route hit a limit

    by_label = {label: (status, reason) for label, status, reason in
                rows(db, image_sources, "label", "status", "reason")}
    ok = {label for label, (status, _) in by_label.items() if status == "ok"}
    assert ok == {"ok-jpg", "ok-png", "flaky", "redirected", "html"}
    assert http_server.hits["/flaky500/c.jpg"] == 2  # retried after the 500
    # Each failure names its manifest line, then the reason.
    assert [by_label[label][1].split(": ", 1)[0] for label in ("missing", "ftp")] == ["line 6", "line 13"]
    reasons = {label: reason and reason.split(": ", 1)[1] for label, (_, reason) in by_label.items()}
    assert reasons["missing"] == "HTTP 404"
    assert "too many redirects" in reasons["loop"]
    assert reasons["endless"].startswith("too large") and reasons["huge-nolength"].startswith("too large")
    assert "declared" in reasons["huge"]  # refused from Content-Length, before downloading
    assert reasons["trickle"] == "too slow: not finished in 3 s"
    assert reasons["hang"] in ("timed out (after 2 attempts)", "too slow: not finished in 3 s")
    assert reasons["ftp"].startswith("unsupported URL scheme")
    assert reasons["refused"].startswith("unreachable")
    # A lying server's HTML page is fetched but is not an image.
    assert rows(db, images, "label", "status", "reason", where=images.c.label == "html") == [
        ("html", "failed", "not an image: HTML page")]
    assert (summary.loaded, summary.already_present) == (3, 1)  # the redirect ends at a.jpg
    assert summary.failed["HTTP 404"] == 1

    # Re-run: nothing stored is downloaded again; failures are tried again.
    before = dict(http_server.hits)
    again = load_images(db, manifest, limits=limits)
    assert again.skipped == 5 and again.loaded == 0
    assert http_server.hits["/img/a.jpg"] == before["/img/a.jpg"]
    assert http_server.hits["/404"] == before["/404"] + 1


def test_bad_file_corpus_records_each_reason(db, bad_corpus, tmp_path):
    expectations = {name: expectation for name, (_, expectation) in CORPUS.items()}
    manifest = tmp_path / "corpus.tsv"
    manifest.write_text("".join(f"bad\t{bad_corpus / name}\n" for name in expectations))
    summary = load_images(db, manifest)
    recorded = {Path(source).name: (status, reason)
                for source, status, reason in _source_image_status(db)}
    assert len(recorded) == len(expectations)
    for name, expected in expectations.items():
        status, reason = recorded[name]
        if expected.reason is None:
            assert status == "ok", (name, reason)
        else:
            assert status == "failed" and expected.reason in reason, (name, reason)
    assert summary.failed_total == sum(1 for e in expectations.values() if e.reason is not None)


def _source_image_status(db):
    with db.engine.connect() as conn:
        return conn.execute(sa.select(image_sources.c.source, images.c.status,
                                      sa.func.coalesce(images.c.reason, image_sources.c.reason))
                            .join(images, images.c.id == image_sources.c.image_id, isouter=True)).all()


def test_cli_status_masks_the_password(pg_url, tmp_path):
    make_tree(tmp_path / "tree")
    secret_url = pg_url.replace("postgres@", "postgres:s3cr3t-pw@")
    env = {**os.environ, "LOOKALIKE_DB": secret_url}
    load = subprocess.run(LOOKALIKE + ["load", str(tmp_path / "tree"), "--store", str(tmp_path / "st")],
                          env=env, capture_output=True, text=True, check=True)
    assert "loaded 3 new images, 1 already present" in load.stdout
    status = subprocess.run(LOOKALIKE + ["status"], env=env, capture_output=True, text=True, check=True)
    assert "s3cr3t-pw" not in status.stdout + status.stderr
    assert "***" in status.stdout and "dotted" in status.stdout and str(tmp_path / "st") in status.stdout


def test_cli_errors_are_clear_and_exit_2(tmp_path):
    done = subprocess.run(LOOKALIKE + ["--db", f"sqlite:///{tmp_path}/x.db", "load", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no such folder or manifest" in done.stderr
    done = subprocess.run(LOOKALIKE + ["--db", "mysql://u:hunter2@h/db", "status"], capture_output=True, text=True)
    assert done.returncode == 2 and "unsupported database" in done.stderr and "hunter2" not in done.stderr


@pytest.mark.slow
def test_killed_load_resumes_and_every_image_is_present_once(tmp_path):
    root = tmp_path / "many"
    count = 1500
    for i in range(count):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg(i, (32, 32)))
    db_path = tmp_path / "kill.db"
    url = f"sqlite:///{db_path}"
    proc = subprocess.Popen(LOOKALIKE + ["--db", url, "load", str(root), "--concurrency", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = sa.create_engine(url)
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with engine.connect() as conn:
                committed = conn.execute(sa.text("select count(*) from images")).scalar()
        except sa.exc.OperationalError:
            continue  # schema not created yet
        if committed >= 100:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    engine.dispose()
    assert 100 <= committed < count, "the load should have been killed half-way"

    with Database(url) as db:
        summary = load_images(db, root)
        assert summary.skipped >= committed and summary.loaded == count - summary.skipped
        with db.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(images)).scalar() == count
            assert conn.execute(sa.select(sa.func.count(sa.distinct(image_sources.c.source)))).scalar() == count
            assert conn.execute(sa.select(sa.func.count()).select_from(image_sources)).scalar() == count


def test_same_bytes_listed_twice_take_the_label_listed_first_whichever_arrives_first(db, tmp_path, http_server):
    # The first line's server fails once (retried after a backoff), so the second line's copy lands first.
    manifest = tmp_path / "twice.tsv"
    manifest.write_text(f"dotted\t{http_server.url('/flaky500/a.jpg')}\nstriped\t{http_server.url('/img/a.jpg')}\n")
    summary = load_images(db, manifest, limits=FetchLimits(backoff=0.3), progress=False)
    assert (summary.loaded, summary.already_present) == (1, 1)
    assert http_server.hits["/flaky500/a.jpg"] == 2
    ((label, source),) = rows(db, images, "label", "source")
    assert (label, source) == ("dotted", http_server.url("/flaky500/a.jpg"))


def test_ids_follow_the_manifest_whatever_finishes_first(db, tmp_path):
    from support.http import LocalHTTPServer
    served = {f"{i}.jpg": jpeg(100 + i) for i in range(6)} | {"dup.jpg": jpeg(100)}
    with LocalHTTPServer(served) as server:
        u = server.url
        listed = [("l0", u("/slow/900/0.jpg")), ("l1", u("/slow/400/1.jpg"))] + \
                 [(f"l{i}", u(f"/img/{i}.jpg")) for i in range(2, 6)] + [("late", u("/img/dup.jpg"))]
        manifest = tmp_path / "urls.tsv"
        manifest.write_text("".join(f"{label}\t{url}\n" for label, url in listed))
        summary = load_images(db, manifest, concurrency=4)
    assert (summary.loaded, summary.already_present) == (6, 1)
    with db.engine.connect() as conn:
        stored = {sha: (image_id, label, source) for image_id, sha, label, source in conn.execute(
            sa.select(images.c.id, images.c.sha256, images.c.label, images.c.source))}
    in_order = [stored[sha256_hex(served[f"{i}.jpg"])] for i in range(6)]
    # The slow first lines finished last, yet got the first ids; the fast late copy of 0.jpg's bytes did not
    # take its row: the label and source are the first listed's.
    assert [image_id for image_id, _, _ in in_order] == sorted(image_id for image_id, _, _ in in_order)
    assert in_order[0][1:] == ("l0", listed[0][1])
