"""Hostile exports (issue 10, part 6): links out of DEST, DEST in the store, unsafe labels, the user's manifest.

Every case runs against real folders, a real database (SQLite and the throwaway
PostgreSQL), real encoded images and, for object names, Azurite.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings
from PIL import Image

from lookalike.db import Database, images, runs
from lookalike.export import CSV_MANIFEST, TRANSFER_MANIFEST, ExportError, export_images
from lookalike.ingest import load_images
from lookalike.split import split_images
from support.azurite import Azurite, find_azurite

pytestmark = pytest.mark.timeout(300)
ENV = "AZURE_STORAGE_CONNECTION_STRING"
# Labels that name no safe folder of their own ("/" and "\" both sanitise to "_"), and ones that do.
UNSAFE = {"..": "cannot be a folder name", ".": "cannot be a folder name",
          "/": "would share the folder '_'", "\\": "would share the folder '_'"}
SAFE = {"dotted": "dotted", "../../escape": ".._.._escape", "tops/shirts": "tops_shirts"}


@pytest.fixture(scope="module")
def azurite():
    if find_azurite() is None:
        if os.environ.get("CI"):
            pytest.fail("Azurite is not installed (run scripts/install-azurite.sh)")
        pytest.skip("Azurite is not installed (run scripts/install-azurite.sh)")
    with Azurite() as server:
        yield server.connection_string


def load_labelled(db: Database, tmp_path: Path, labels: list[str], per_label: int = 2) -> None:
    """Real PNGs loaded from a manifest, given ``labels`` as rows in the table hold them, then split."""
    rng = np.random.default_rng(len(labels))
    (tmp_path / "files").mkdir()
    lines = []
    for n in range(len(labels)):
        for i in range(per_label):
            path = tmp_path / "files" / f"{n}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
            lines.append(f"label{n}\t{path}\n")
    (tmp_path / "list.tsv").write_text("".join(lines))
    assert load_images(db, tmp_path / "list.tsv", progress=False).loaded == len(lines)
    with db.begin() as conn:
        for n, label in enumerate(labels):
            conn.execute(sa.update(images).where(images.c.label == f"label{n}").values(label=label))
    split_images(db, test_ratio=0.5)


@pytest.fixture
def small(tmp_path):
    """A SQLite collection: two labels, four images each, split."""
    with Database(f"sqlite:///{tmp_path}/t.db", tmp_path / "store") as db:
        load_labelled(db, tmp_path, ["dotted", "striped"], per_label=4)
        yield db


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their target, folders as "dir"), without following links."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            key = path.relative_to(root).as_posix()
            out[key] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                        else path.read_bytes())
    return out


# ---------------------------------------------------------------- unsafe labels fail alone

def test_unsafe_labels_are_skipped_alone_and_the_rest_export(db, tmp_path):
    load_labelled(db, tmp_path, [*UNSAFE, *SAFE])
    outside = lambda: {key: value for key, value in tree(tmp_path).items()  # noqa: E731
                       if not key.startswith(("out", "t.db"))}  # all but DEST and the SQLite file
    before = outside()
    dest = tmp_path / "out"
    summary = export_images(db, str(dest), progress=False)

    assert {label: n for label, (n, _) in summary.skipped_labels.items()} == {label: 2 for label in UNSAFE}
    for label, why in UNSAFE.items():
        assert why in summary.skipped_labels[label][1]
    text = "\n".join(summary.lines())
    assert "skipped 2 images: label '..' cannot be a folder name" in text
    assert summary.images == summary.uploaded == 2 * len(SAFE) and summary.failed == {}
    files = {key for key, value in tree(dest).items() if value != "dir"}
    assert len(files) == 2 * len(SAFE) + 2 and {TRANSFER_MANIFEST, CSV_MANIFEST} <= files
    assert {key.rsplit("/", 1)[0] for key in files - {TRANSFER_MANIFEST, CSV_MANIFEST}} == {
        f"{part}/{segment}" for part in ("Train", "Test") for segment in SAFE.values()}
    # Nothing appeared anywhere but under DEST.
    assert outside() == before
    table = list(csv.reader(io.StringIO((dest / CSV_MANIFEST).read_text())))
    assert sorted({row[1] for row in table[1:]}) == sorted(SAFE)  # the manifest keeps the real labels
    with db.engine.connect() as conn:
        counts = conn.execute(sa.select(runs.c.counts).where(runs.c.step == "export")).scalar_one()
    assert '"skipped": 8' in counts


def test_unsafe_labels_never_become_blob_names(tmp_path, azurite, monkeypatch):
    monkeypatch.setenv(ENV, azurite)
    container = f"hostile-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(azurite).create_container(container)
    with Database(f"sqlite:///{tmp_path}/t.db", tmp_path / "store") as db:
        load_labelled(db, tmp_path, [*UNSAFE, *SAFE])
        summary = export_images(db, f"az://{container}/p", progress=False)
    assert set(summary.skipped_labels) == set(UNSAFE) and summary.failed == {}
    names = list(ContainerClient.from_connection_string(azurite, container).list_blob_names())
    assert len(names) == 2 * len(SAFE) + 2
    for name in names:
        parts = name.split("/")
        assert parts[0] == "p" and not {".", ".."} & set(parts)
        assert name in (f"p/{TRANSFER_MANIFEST}", f"p/{CSV_MANIFEST}") or parts[2] in SAFE.values()


# ---------------------------------------------------------------- links inside DEST

def test_a_linked_train_folder_is_refused_and_nothing_leaves_dest(small, tmp_path):
    dest, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest.mkdir()
    (dest / "Train").symlink_to(elsewhere)
    summary = export_images(small, str(dest), progress=False)

    assert list(elsewhere.iterdir()) == []
    train = [key for key in summary.failed if key.startswith("Train/")]
    assert train and len(summary.failed) == len(train) == summary.images - summary.uploaded
    assert all(reason == "Train is a symbolic link: refusing to follow it out of the destination"
               for reason in summary.failed.values())
    assert summary.uploaded > 0 and not (dest / CSV_MANIFEST).exists()  # Test/ written, manifests held back
    assert "manifests not written" in "\n".join(summary.lines())
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "--db", str(small.url), "--store",
                           str(small.store.root), "-q", "export", str(dest)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and list(elsewhere.iterdir()) == []  # 1: some objects failed
    assert f"  failed: {train[0]}: Train is a symbolic link: refusing to follow it" in done.stdout

    (dest / "Train").unlink()
    again = export_images(small, str(dest), progress=False)
    assert (again.uploaded, again.failed, again.manifests_written) == (len(train), {}, 2)


def test_linked_label_folders_files_and_pipes_fail_alone(small, tmp_path):
    dest, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    first = export_images(small, str(dest), progress=False)
    keys = sorted(key for key in tree(dest) if key.count("/") == 2)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    elsewhere.mkdir()
    # A label folder linked out, one file linked to the victim, one file swapped for a named pipe.
    linked_folder = keys[0].rsplit("/", 1)[0]
    for key in keys:
        if key.startswith(linked_folder + "/"):
            (dest / key).unlink()
    (dest / linked_folder).rmdir()
    (dest / linked_folder).symlink_to(elsewhere)
    linked_file, pipe = [key for key in keys if not key.startswith(linked_folder + "/")][:2]
    (dest / linked_file).unlink()
    (dest / linked_file).symlink_to(victim)
    (dest / pipe).unlink()
    os.mkfifo(dest / pipe)

    summary = export_images(small, str(dest), progress=False)
    assert victim.read_bytes() == b"precious" and list(elsewhere.iterdir()) == []
    assert summary.failed[linked_file] == f"{linked_file} is a symbolic link: refusing to follow it out of the destination"
    assert summary.failed[pipe] == f"{pipe} is not a regular file: refusing to replace it"
    in_linked = {key: reason for key, reason in summary.failed.items() if key.startswith(linked_folder + "/")}
    assert in_linked and set(in_linked.values()) == {
        f"{linked_folder} is a symbolic link: refusing to follow it out of the destination"}
    assert len(summary.failed) == len(in_linked) + 2
    assert summary.already_there == first.images - len(summary.failed)


def test_a_linked_manifest_is_replaced_only_with_force_and_never_written_through(small, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    victim = tmp_path / "victim.csv"
    victim.write_text("image_id,label,split,path,sha256,byte_size\n")  # looks like ours: still refused
    (dest / CSV_MANIFEST).symlink_to(victim)
    with pytest.raises(ExportError, match=rf"{dest}/manifest.csv is a symbolic link or not a regular file: "
                                          r"move it away, or pass --force"):
        export_images(small, str(dest), progress=False)
    assert sorted(os.listdir(dest)) == [CSV_MANIFEST]  # nothing written

    summary = export_images(small, str(dest), force=True, progress=False)
    assert summary.manifests_written == 2 and summary.failed == {}
    assert not (dest / CSV_MANIFEST).is_symlink()
    assert (dest / CSV_MANIFEST).read_text().count("\n") == summary.images + 1
    assert victim.read_text() == "image_id,label,split,path,sha256,byte_size\n"


# ---------------------------------------------------------------- DEST and the image store

def test_dest_inside_or_around_the_store_is_refused(small, tmp_path):
    store = small.store.root
    before = tree(store)
    (tmp_path / "into-store").symlink_to(store)
    cases = [(store, "is inside"), (store / "exports", "is inside"), (tmp_path / "into-store" / "x", "is inside"),
             (tmp_path, "contains"), (store.parent, "contains")]
    for dest, where in cases:
        with pytest.raises(ExportError, match=f"{where} the image store {store}: export to a folder outside it"):
            export_images(small, str(dest), progress=False)
        with pytest.raises(ExportError, match=where):
            export_images(small, Path(dest).as_uri(), dry_run=True, progress=False)
    assert tree(store) == before


def test_the_cli_refuses_dest_in_the_store_in_one_line(small, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "--db", str(small.url), "--store",
                           str(small.store.root), "export", str(small.store.root / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {small.store.root / 'out'} is inside the image store "
                                        f"{small.store.root}: export to a folder outside it"]
    assert not (small.store.root / "out").exists()


# ---------------------------------------------------------------- the user's own manifest

def test_a_manifest_lookalike_did_not_write_needs_force(small, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    mine = "name,price\nshirt,10\n"
    (dest / CSV_MANIFEST).write_text(mine)
    command = [sys.executable, "-m", "lookalike.cli", "--db", str(small.url), "--store", str(small.store.root),
               "-q", "export", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {dest}/manifest.csv was not written by lookalike: move it away, "
                                        "or pass --force to overwrite it"]
    assert os.listdir(dest) == [CSV_MANIFEST] and (dest / CSV_MANIFEST).read_text() == mine

    done = subprocess.run(command + ["--force"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (dest / CSV_MANIFEST).read_text().startswith("image_id,label,split,path,sha256,byte_size,source\n")

    # Its own manifest lookalike rewrites without --force when the export changes.
    split_images(small, test_ratio=0.25, seed=9)
    summary = export_images(small, str(dest), progress=False)
    assert summary.manifests_written == 2 and summary.failed == {}

    (dest / TRANSFER_MANIFEST).write_text("my own notes\n")
    with pytest.raises(ExportError, match=f"{dest}/{TRANSFER_MANIFEST} was not written by lookalike"):
        export_images(small, str(dest), progress=False)


def test_a_blob_manifest_lookalike_did_not_write_needs_force(small, azurite, monkeypatch):
    monkeypatch.setenv(ENV, azurite)
    container = f"hostile-{uuid.uuid4().hex[:12]}"
    client = BlobServiceClient.from_connection_string(azurite).create_container(container)
    client.upload_blob(f"p/{CSV_MANIFEST}", b"image_id,label,split,path,sha256,byte_size\n",
                       content_settings=ContentSettings(content_type="text/csv; charset=utf-8"))
    with pytest.raises(ExportError, match=rf"az://{container}/p/manifest.csv was not written by lookalike: "
                                          r"move it away, or pass --force"):
        export_images(small, f"az://{container}/p", progress=False)
    assert list(client.list_blob_names()) == [f"p/{CSV_MANIFEST}"]

    summary = export_images(small, f"az://{container}/p", force=True, progress=False)
    assert summary.manifests_written == 2 and summary.failed == {}
    manifest = client.get_blob_client(f"p/{CSV_MANIFEST}")
    assert manifest.get_blob_properties().metadata.get("sha256")
    assert manifest.download_blob().readall().decode().count("\n") == summary.images + 1


# ---------------------------------------------------------------- leftovers of a killed export

def test_temporaries_a_killed_export_left_are_swept_once_old(small, tmp_path):
    dest = tmp_path / "out"
    export_images(small, str(dest), progress=False)
    label_folder = next((dest / "Train").iterdir())
    old = [label_folder / ".abc.png.0123456789ab.tmp", dest / f".{CSV_MANIFEST}.ba9876543210.tmp"]
    young = label_folder / ".def.png.aaaaaaaaaaaa.tmp"
    users = [label_folder / ".notes.tmp", dest / "draft.0123456789ab.tmp"]  # not names lookalike writes
    for path in [*old, young, *users]:
        path.write_bytes(b"half")
    linked = label_folder / ".ghi.png.bbbbbbbbbbbb.tmp"
    linked.symlink_to(tmp_path / "victim")
    (tmp_path / "victim").write_bytes(b"precious")
    day_ago = time.time() - 86400
    for path in [*old, *users]:
        os.utime(path, (day_ago, day_ago))
    os.utime(linked, (day_ago, day_ago), follow_symlinks=False)

    summary = export_images(small, str(dest), progress=False)
    assert summary.temporaries_removed == 2 and summary.uploaded == 0
    assert "removed 2 temporary files that an interrupted export left" in "\n".join(summary.lines())
    assert not any(path.exists() for path in old)
    assert young.exists() and all(path.exists() for path in users) and linked.is_symlink()
    assert (tmp_path / "victim").read_bytes() == b"precious"
