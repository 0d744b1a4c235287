"""The export step: the unique images of the split, to a real folder and to Azurite (Azure Blob emulator)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from azure.storage.blob import BlobServiceClient, ContainerClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lookalike.db import Database, dedupe_runs, duplicate_groups, images, runs, splits
from lookalike.dedupe import dedupe_images
from lookalike.export import (CSV_MANIFEST, TRANSFER_MANIFEST, ExportError, export_images, label_segment,
                              plan_export)
from lookalike.hashing import hash_images
from lookalike.images import EXTENSIONS, open_image, probe
from lookalike.ingest import load_images
from lookalike.phash import compute_hashes
from lookalike.samples import render_samples
from lookalike.split import split_images
from support.azurite import ACCOUNT_KEY, Azurite, find_azurite

ENV = "AZURE_STORAGE_CONNECTION_STRING"
Image.init()  # fills Image.MIME, the independent source of expected content types


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def azurite():
    """Connection string of one Azurite blob service for the session.

    Skipped when Azurite is not installed, except under CI (env ``CI`` set), where it fails.
    """
    if find_azurite() is None:
        message = "Azurite is not installed (run scripts/install-azurite.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with Azurite() as server:
        yield server.connection_string


def new_container(conn_str: str) -> str:
    name = f"export-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(conn_str).create_container(name)
    return name


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The rendered sample set (3 labels, planted near-copies) loaded, hashed, deduped and split."""
    root = tmp_path_factory.mktemp("export_collection")
    render_samples(root / "samples", per_label=6, seed=2)
    # One copy every rule finds, whatever copies the renderer plants: the same pixels saved as PNG.
    original = sorted((root / "samples" / "dotted").glob("*.jpg"))[0]
    Image.open(original).save(original.with_name("dotted_png_copy.png"))
    with Database(f"sqlite:///{root}/t.db", root / "store") as db:
        load_images(db, root / "samples", progress=False)
        hash_images(db, progress=False)
        assert dedupe_images(db, rule="near").duplicates >= 1  # the planted copies are there to be left out
        split_images(db, seed=2)
        yield db


def non_keeper_shas(db: Database) -> set[str]:
    with db.engine.connect() as conn:
        latest = conn.execute(sa.select(sa.func.max(dedupe_runs.c.id))).scalar()
        return set(conn.execute(
            sa.select(images.c.sha256).join(duplicate_groups, duplicate_groups.c.image_id == images.c.id)
            .where(duplicate_groups.c.run_id == latest, ~duplicate_groups.c.is_keeper)).scalars())


def expected_objects(db: Database, name_by: str = "sha256") -> dict[str, tuple[bytes, str]]:
    """What the export must hold, worked out from the tables and stored bytes: key -> (bytes, content type)."""
    left_out = non_keeper_shas(db)
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.sha256, images.c.label, splits.c.split)
                            .join(splits, splits.c.image_id == images.c.id)).all()
    out = {}
    for image_id, sha, label, split in rows:
        if sha in left_out:
            continue
        data = db.store.get(sha)
        fmt = probe(data).format
        name = sha
        if name_by == "dhash":
            name = next(h.hex for h in compute_hashes(open_image(data)) if (h.kind, h.size) == ("dhash_rowcol", 8))
        out[f"{split.capitalize()}/{label}/{name}.{EXTENSIONS[fmt]}"] = (data, Image.MIME[fmt])
    return out


def folder_objects(root: Path) -> dict[str, bytes]:
    """Every visible file under Train/ and Test/ in ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.relative_to(root).parts[0] in ("Train", "Test")}


def blob_objects(conn_str: str, container: str, prefix: str = "") -> dict[str, tuple[bytes, str]]:
    """Every blob under ``prefix``: key (without prefix) -> (downloaded bytes, content type)."""
    client = ContainerClient.from_connection_string(conn_str, container)
    return {blob.name[len(prefix):]: (client.download_blob(blob.name).readall(), blob.content_settings.content_type)
            for blob in client.list_blobs(name_starts_with=prefix or None)}


def check_manifests(transfer: str, table: str, expected: dict, url_of) -> None:
    """The lab's url<TAB>folder<TAB>filename list and the CSV, one line per expected image."""
    lines = transfer.splitlines()
    assert len(lines) == len(expected)
    assert sorted(lines) == sorted(f"{url_of(key)}\t{key.rsplit('/', 1)[0]}/\t{key.rsplit('/', 1)[1]}"
                                   for key in expected)
    rows = [line.split(",") for line in table.splitlines()]
    assert rows[0] == ["image_id", "label", "split", "path", "sha256", "byte_size", "source"]
    assert len(rows) == len(expected) + 1
    for image_id, label, split, path, sha, size, _source in rows[1:]:
        data, _ = expected[path]
        assert path.split("/")[:2] == [split.capitalize(), label]
        assert int(size) == len(data) and sha == hashlib.sha256(data).hexdigest()
        assert int(image_id) > 0


# ---------------------------------------------------------------- to a folder

def test_export_to_folder_holds_every_unique_image_once(collection, tmp_path):
    dest = tmp_path / "out"
    expected = expected_objects(collection)
    summary = export_images(collection, str(dest), progress=False)

    assert folder_objects(dest) == {key: data for key, (data, _) in expected.items()}
    # Each unique image exactly once, the near-copies nowhere.
    shas = [hashlib.sha256(data).hexdigest() for data in folder_objects(dest).values()]
    assert len(shas) == len(set(shas)) == summary.images == len(expected)
    assert not set(shas) & non_keeper_shas(collection)
    assert {key.split("/")[0] for key in expected} == {"Train", "Test"}
    assert {key.split(".")[-1] for key in expected} >= {"jpg"}
    assert (summary.uploaded, summary.already_there, summary.failed) == (len(expected), 0, {})
    assert summary.bytes_uploaded == sum(len(data) for data, _ in expected.values())
    check_manifests((dest / TRANSFER_MANIFEST).read_text(), (dest / CSV_MANIFEST).read_text(), expected,
                    lambda key: (dest / key).as_uri())
    assert not list(dest.rglob(".*"))  # no temporary files left behind
    assert "written" in "\n".join(summary.lines())

    with collection.engine.connect() as conn:
        run = conn.execute(sa.select(runs).where(runs.c.step == "export").order_by(runs.c.id.desc())).mappings().first()
    assert run["outcome"] == "ok" and f'"uploaded": {len(expected)}' in run["counts"]

    again = export_images(collection, dest.as_uri(), progress=False)  # file:// URL form
    assert (again.uploaded, again.already_there, again.manifests_written) == (0, len(expected), 0)
    assert folder_objects(dest) == {key: data for key, (data, _) in expected.items()}


def test_rerun_replaces_missing_and_changed_files_only(collection, tmp_path):
    dest = tmp_path / "out"
    expected = expected_objects(collection)
    export_images(collection, str(dest), progress=False)
    keys = sorted(expected)
    (dest / keys[0]).unlink()
    (dest / keys[1]).unlink()
    changed = dest / keys[2]
    changed.write_bytes(bytes(len(changed.read_bytes())))  # same size, other content
    (dest / CSV_MANIFEST).unlink()

    dry = export_images(collection, str(dest), dry_run=True, progress=False)
    assert dry.would_write == [keys[0], keys[1], keys[2], CSV_MANIFEST]  # images by key, then manifests
    assert not (dest / keys[0]).exists() and not (dest / CSV_MANIFEST).exists()
    assert all(f"would write {key}" in "\n".join(dry.lines()) for key in keys[:3])

    summary = export_images(collection, str(dest), progress=False)
    assert (summary.uploaded, summary.already_there, summary.manifests_written) == (3, len(keys) - 3, 1)
    assert folder_objects(dest) == {key: data for key, (data, _) in expected.items()}


def test_dry_run_writes_nothing(collection, tmp_path, azurite, monkeypatch):
    dest = tmp_path / "never"
    summary = export_images(collection, str(dest), dry_run=True, progress=False)
    assert not dest.exists()
    assert summary.would_write == [*sorted(expected_objects(collection)), TRANSFER_MANIFEST, CSV_MANIFEST]
    assert summary.uploaded == summary.images and summary.already_there == 0

    monkeypatch.setenv(ENV, azurite)
    container = new_container(azurite)
    blob_summary = export_images(collection, f"az://{container}/p", dry_run=True, progress=False)
    assert blob_summary.would_write == summary.would_write
    assert blob_objects(azurite, container) == {}
    with collection.engine.connect() as conn:  # a dry run leaves no trace in the database either
        assert conn.execute(sa.select(sa.func.count()).select_from(runs).where(
            runs.c.step == "export", runs.c.params.contains("never"))).scalar_one() == 0


# ---------------------------------------------------------------- to Azure Blob Storage (Azurite)

def test_export_to_azurite(collection, azurite, monkeypatch):
    monkeypatch.setenv(ENV, azurite)
    container = new_container(azurite)
    expected = expected_objects(collection)
    summary = export_images(collection, f"az://{container}/exports/v1", progress=False)

    stored = blob_objects(azurite, container, "exports/v1/")
    transfer, table = stored.pop(TRANSFER_MANIFEST), stored.pop(CSV_MANIFEST)
    assert stored == expected  # keys, bytes and content types
    assert transfer[1] == "text/plain; charset=utf-8" and table[1] == "text/csv; charset=utf-8"
    endpoint = azurite.split("BlobEndpoint=")[1].rstrip(";")
    check_manifests(transfer[0].decode(), table[0].decode(), expected,
                    lambda key: f"{endpoint}/{container}/exports/v1/{key}")
    assert (summary.uploaded, summary.already_there, summary.failed) == (len(expected), 0, {})
    client = ContainerClient.from_connection_string(azurite, container)
    for blob in client.list_blobs(name_starts_with="exports/v1/T", include=["metadata"]):
        data = stored[blob.name[len("exports/v1/"):]][0]
        assert blob.metadata["sha256"] == hashlib.sha256(data).hexdigest()
        assert bytes(blob.content_settings.content_md5) == hashlib.md5(data).digest()

    again = export_images(collection, f"az://{container}/exports/v1/", progress=False)
    assert (again.uploaded, again.already_there, again.manifests_written, again.bytes_uploaded) == (
        0, len(expected), 0, 0)


def test_blobs_written_by_other_tools_are_compared_by_md5(collection, azurite, monkeypatch):
    # A blob without our sha256 metadata counts as there when its size, type and MD5 match.
    monkeypatch.setenv(ENV, azurite)
    container = new_container(azurite)
    expected = expected_objects(collection)
    first, second = sorted(expected)[:2]
    client = ContainerClient.from_connection_string(azurite, container)
    from azure.storage.blob import ContentSettings
    client.upload_blob(first, expected[first][0], content_settings=ContentSettings(content_type=expected[first][1]))
    client.upload_blob(second, expected[second][0], content_settings=ContentSettings(content_type="image/x-wrong"))

    summary = export_images(collection, f"az://{container}", progress=False)
    assert (summary.uploaded, summary.already_there) == (len(expected) - 1, 1)
    assert blob_objects(azurite, container)[second][1] == expected[second][1]


# ---------------------------------------------------------------- killed half-way, then resumed

SLOW_EXPORT = """
import sys, time
from lookalike.db import Database
from lookalike.export import export_images
from lookalike.store import ImageStore

read = ImageStore.get
def slow_read(self, sha):  # 0.1 s per image, so the export can be killed half-way
    time.sleep(0.1)
    return read(self, sha)
ImageStore.get = slow_read
with Database(sys.argv[1], sys.argv[2]) as db:
    export_images(db, sys.argv[3], concurrency=1, progress=False)
"""


@pytest.mark.parametrize("kind", ["folder", "azurite"])
def test_killed_export_resumes_without_duplicates(kind, collection, tmp_path, request, monkeypatch):
    expected = expected_objects(collection)
    if kind == "folder":
        dest = tmp_path / "out"
        listing = lambda: folder_objects(dest)  # noqa: E731
        count = lambda: sum(1 for p in dest.rglob("*.*") if not p.name.startswith("."))  # noqa: E731
        url = str(dest)
    else:
        conn_str = request.getfixturevalue("azurite")
        monkeypatch.setenv(ENV, conn_str)
        container = new_container(conn_str)
        listing = lambda: {k: v[0] for k, v in blob_objects(conn_str, container).items()}  # noqa: E731
        client = ContainerClient.from_connection_string(conn_str, container)
        count = lambda: sum(1 for _ in client.list_blob_names())  # noqa: E731
        url = f"az://{container}"
    child = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(collection.url.render_as_string()),
                              str(collection.store.root), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while count() < 5:
        assert child.poll() is None, child.stdout.read().decode()
        assert time.monotonic() < deadline, "the export wrote nothing in 60 s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    partial = listing()
    assert 5 <= len(partial) < len(expected)
    assert TRANSFER_MANIFEST not in partial and CSV_MANIFEST not in partial  # manifests come last
    assert all(expected[key][0] == data for key, data in partial.items())  # every object written is whole

    summary = export_images(collection, url, progress=False)
    assert (summary.uploaded, summary.already_there) == (len(expected) - len(partial), len(partial))
    final = listing()
    assert {key: final[key] for key in expected} == {key: data for key, (data, _) in expected.items()}
    assert set(final) == set(expected) | ({TRANSFER_MANIFEST, CSV_MANIFEST} if kind == "azurite" else set())


# ---------------------------------------------------------------- errors: clear, and never the key

def test_missing_container_is_an_error_unless_asked_to_create(collection, azurite, monkeypatch):
    monkeypatch.setenv(ENV, azurite)
    name = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ExportError, match=f"container '{name}' .* does not exist.*--create-container"):
        export_images(collection, f"az://{name}/x", progress=False)
    assert not BlobServiceClient.from_connection_string(azurite).get_container_client(name).exists()

    summary = export_images(collection, f"az://{name}/x", create_container=True, progress=False)
    assert summary.uploaded == summary.images > 0
    assert len(blob_objects(azurite, name, "x/")) == summary.images + 2


def test_bad_connection_strings_give_clear_errors_without_the_key(collection, azurite, monkeypatch):
    container = new_container(azurite)
    wrong_key = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWstMDEyMzQ1Njc4OQ=="
    cases = [
        (azurite.replace(ACCOUNT_KEY, wrong_key),
         r"cannot use container .* AuthorizationFailure.*check the account name and key in \$" + ENV),
        (f"AccountKey={wrong_key};garbage", f"{ENV} is not a usable storage connection string"),
        ("", f"set \\${ENV}"),
    ]
    for value, message in cases:
        monkeypatch.setenv(ENV, value)
        with pytest.raises(ExportError, match=message) as caught:
            export_images(collection, f"az://{container}", progress=False)
        assert wrong_key not in str(caught.value) and wrong_key not in repr(caught.value)
    with collection.engine.connect() as conn:
        errors = conn.execute(sa.select(runs.c.error).where(runs.c.step == "export", runs.c.outcome == "failed"))
        assert all(wrong_key not in (error or "") for error in errors.scalars())
    monkeypatch.setenv("OTHER_ENV", azurite)
    summary = export_images(collection, f"az://{container}", connection_string_env="OTHER_ENV", progress=False)
    assert summary.uploaded == summary.images


@pytest.mark.parametrize("dest, message", [
    ("s3://bucket/x", "unsupported destination"),
    ("az://Bad_Name/x", "not a valid container name"),
    ("az://ok-name/a/../b", r"may not contain '\.' or '\.\.'"),
    ("file://otherhost/x", "must name a local path"),
])
def test_bad_destinations(collection, dest, message):
    with pytest.raises(ExportError, match=message):
        export_images(collection, dest, progress=False)


def test_destination_that_is_a_file(collection, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_images(collection, str(tmp_path / "f"), progress=False)


# ---------------------------------------------------------------- names and labels

def test_name_by_dhash(collection, tmp_path):
    summary = export_images(collection, str(tmp_path / "out"), name_by="dhash", progress=False)
    expected = expected_objects(collection, name_by="dhash")
    assert summary.sha256_fallbacks == 0
    assert folder_objects(tmp_path / "out") == {key: data for key, (data, _) in expected.items()}
    assert all(len(key.rsplit("/", 1)[1].split(".")[0]) == 32 for key in expected)  # 128-bit row+col hash


def encode(pixels: np.ndarray, note: str = "") -> bytes:
    """A PNG of ``pixels``; a text chunk ``note`` changes the bytes but not the picture."""
    info = PngInfo()
    info.add_text("note", note)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def small_collection(tmp_path: Path, per_label: dict[str, list[bytes]], *, hashed: bool = True) -> Database:
    """Real encoded files loaded from a manifest (labels may hold any character), hashed, split."""
    folder = tmp_path / "files"
    folder.mkdir()
    lines = []
    for n, (label, blobs) in enumerate(per_label.items()):
        for i, data in enumerate(blobs):
            path = folder / f"{n}_{i}.png"
            path.write_bytes(data)
            lines.append(f"{label}\t{path}\n")
    (tmp_path / "list.tsv").write_text("".join(lines))
    db = Database(f"sqlite:///{tmp_path}/small.db", tmp_path / "store")
    load_images(db, tmp_path / "list.tsv", progress=False)
    if hashed:
        hash_images(db, progress=False)
    return db


def test_dhash_name_taken_twice_falls_back_to_sha256_and_odd_labels_are_sanitised(tmp_path):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    # The same pixels with four different notes: four files, one dHash.
    same_look = [encode(pixels, note=f"copy {n}") for n in range(4)]
    assert len(set(same_look)) == 4
    other = [encode(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(2)]
    with small_collection(tmp_path, {"tops/shirts": same_look, "plain": other}) as db:
        split_images(db, test_ratio=0.25)   # tops/shirts: 3 train (one dHash, 3 times), 1 test
        summary = export_images(db, str(tmp_path / "out"), name_by="dhash", progress=False)
        files = folder_objects(tmp_path / "out")
        train = [key for key in files if key.startswith("Train/tops_shirts/")]
        assert len(train) == 3 and all(len(key.rsplit("/", 1)[1]) == 64 + 4 for key in train)  # sha256.png
        test = [key for key in files if key.startswith("Test/tops_shirts/")]
        assert len(test) == 1 and len(test[0].rsplit("/", 1)[1]) == 32 + 4                     # dhash.png
        assert summary.sha256_fallbacks == 3 and summary.renamed_labels == {"tops/shirts": "tops_shirts"}
        text = "\n".join(summary.lines())
        assert "3 images named by sha256" in text and "'tops/shirts' exported as folder 'tops_shirts'" in text
        csv_rows = (tmp_path / "out" / CSV_MANIFEST).read_text().splitlines()
        assert sum(",tops/shirts," in row for row in csv_rows) == 4  # the manifest keeps the real label

        # A dedupe after the split: its duplicates are left out, and the summary says why.
        dedupe_images(db, rule="exact", hash_kind="dhash_rowcol", size=8)
        later = export_images(db, str(tmp_path / "later"), progress=False)
        assert later.images == 3 and later.duplicates_left_out == 3
        assert "3 split images that the latest dedupe run marks as duplicates" in "\n".join(later.lines())
        assert len(folder_objects(tmp_path / "later")) == 3


@pytest.mark.parametrize("label, segment", [
    ("dotted", "dotted"), ("tops/shirts", "tops_shirts"), ("a\\b", "a_b"), ("x\x00y\ny", "x_y_y"),
    ("  padded  ", "padded"), ("ends.", "ends"), ("léopard", "léopard"), ("what?*", "what__"),
])
def test_label_segment(label, segment):
    assert label_segment(label) == segment


@pytest.mark.parametrize("label", ["", "   ", ".", "..", "...", "x" * 256, None])
def test_label_segment_refuses_unusable_labels(label):
    with pytest.raises(ExportError, match="cannot be a folder name"):
        label_segment(label)


def test_labels_that_sanitise_to_one_folder_are_skipped_unless_spelled_as_the_folder(tmp_path):
    rng = np.random.default_rng(1)
    blobs = [encode(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(8)]
    with small_collection(tmp_path, {"a/b": blobs[:2], "a:b": blobs[2:4], "a_b": blobs[4:6], "c/d": blobs[6:]},
                          hashed=False) as db:
        split_images(db)
        plan = plan_export(db)
        assert {o.label for o in plan.objects} == {"a_b", "c/d"}
        assert plan.renamed_labels == {"c/d": "c_d"}
        assert {label: n for label, (n, _) in plan.skipped_labels.items()} == {"a/b": 2, "a:b": 2}
        assert plan.skipped_labels["a/b"][1] == "label 'a/b' would share the folder 'a_b' with ['a:b', 'a_b']; rename one"


def test_unsplit_and_unhashed_collections_say_what_to_run(tmp_path):
    rng = np.random.default_rng(2)
    blobs = [encode(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(4)]
    with small_collection(tmp_path, {"dotted": blobs}, hashed=False) as db:
        with pytest.raises(ExportError, match=r"no split yet: run `lookalike split` first"):
            export_images(db, str(tmp_path / "out"), layout="train-test", progress=False)
        split_images(db)
        with pytest.raises(ExportError, match=r"4 images have no dhash_rowcol size 8 hash: run `lookalike hash`"):
            export_images(db, str(tmp_path / "out"), name_by="dhash", progress=False)
        assert not (tmp_path / "out").exists()
        # An image loaded after the split is not exported, and the summary says so.
        (tmp_path / "late.png").write_bytes(encode(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
        (tmp_path / "late.tsv").write_text(f"dotted\t{tmp_path / 'late.png'}\n")
        load_images(db, tmp_path / "late.tsv", progress=False)
        summary = export_images(db, str(tmp_path / "out"), progress=False)
        assert (summary.images, summary.unsplit) == (4, 1)
        assert "1 unique images without a split" in "\n".join(summary.lines())
        with pytest.raises(ExportError, match="name_by must be one of"):
            export_images(db, str(tmp_path / "out"), name_by="md5", progress=False)


def test_an_image_missing_from_the_store_fails_alone_and_holds_back_the_manifests(tmp_path):
    rng = np.random.default_rng(3)
    blobs = [encode(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(4)]
    with small_collection(tmp_path, {"dotted": blobs}, hashed=False) as db:
        split_images(db)
        lost = db.store.path(hashlib.sha256(blobs[0]).hexdigest())
        kept = lost.read_bytes()
        lost.unlink()
        summary = export_images(db, str(tmp_path / "out"), progress=False)
        assert (summary.uploaded, len(summary.failed)) == (3, 1)
        assert "missing from the store" in next(iter(summary.failed.values()))
        assert "manifests not written" in "\n".join(summary.lines())
        assert not (tmp_path / "out" / TRANSFER_MANIFEST).exists()

        lost.write_bytes(kept)
        again = export_images(db, str(tmp_path / "out"), progress=False)
        assert (again.uploaded, again.already_there, again.failed, again.manifests_written) == (1, 3, {}, 2)


def test_export_from_postgresql_via_the_cli(pg_url, tmp_path):
    """The same collection on the PostgreSQL server, exported by the command a user types."""
    samples = render_samples(tmp_path / "samples", per_label=6, seed=2)
    with Database(pg_url, tmp_path / "store") as db:
        load_images(db, samples.root, progress=False)
        hash_images(db, progress=False)
        dedupe_images(db, rule="near")
        split_images(db, seed=2)
        expected = expected_objects(db)
    dest = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "--db", pg_url, "--store", str(tmp_path / "store"),
                           "-q", "export", str(dest)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert folder_objects(dest) == {key: data for key, (data, _) in expected.items()}
    assert len((dest / "transferimages.txt").read_text().splitlines()) == len(expected)
