"""Labels are optional end to end (issue 14, part 1): a flat folder of rendered garments and a CSV
without a label column are loaded, run, searched, deduplicated and exported; linked label folders load
once, without looping; the notebook runs on the unlabelled database."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import nbformat
import pytest
import sqlalchemy as sa

from lookalike.db import images, runs
from lookalike.export import CSV_MANIFEST, ExportError, export_images
from lookalike.ingest import load_images
from lookalike.samples import render_samples
from support.catalogue import flat_folder
from support.cli import lookalike

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "query_similar_images.ipynb"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """The rendered sample set (4 per label and planted near-copies), its files copied into one flat folder."""
    root = tmp_path_factory.mktemp("unlabelled")
    rendered = render_samples(root / "samples", per_label=4, seed=3, copy_share=0.5)
    folder = flat_folder(rendered.root, root / "flat", "photo{:03d}")
    return root, folder, rendered


@pytest.fixture(scope="module")
def ran(flat):
    root, folder, _ = flat
    db = ["--db", f"sqlite:///{root}/u.db"]
    return db, lookalike("run", folder, *db)


def test_run_on_a_flat_folder_does_the_label_free_steps_and_says_what_it_skipped(ran, flat):
    db, done = ran
    _, folder, rendered = flat
    assert done.code == 0, done.err
    ran_steps = [line.split("]")[0][1:] for line in done.out.splitlines() if line.startswith("[")]
    assert ran_steps == ["load", "hash", "featurize", "index", "dedupe", "fit", "split", "train", "evaluate", "rank"]
    assert "  fit (efficientnet-lite0): pca fitted," in done.out   # the label-free space, used by similar
    for step in ("split", "train", "evaluate"):
        assert f"[{step}] skipped: no image has a label ({step} needs labels)" in done.out
    assert "[rank] skipped: no query images" in done.out
    assert f"loaded {rendered.images} new images" in done.out
    with sa.create_engine(db[1]).connect() as conn:
        labels = conn.execute(sa.select(images.c.label).distinct()).scalars().all()
        recorded = dict(conn.execute(sa.select(runs.c.step, runs.c.outcome)).all())
    assert labels == [None]
    assert recorded["load"] == recorded["run"] == "ok" and "split" not in recorded


def test_similar_and_duplicates_need_no_labels(ran, flat):
    db, _ = ran
    _, folder, rendered = flat
    found = lookalike("similar", 1, "--top", 5, "--json", *db)
    assert found.code == 0, found.err
    matches = json.loads(found.out)
    assert len(matches) == 5 and all(m["label"] is None and m["image_id"] != 1 for m in matches)
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
    assert all(Path(m["source"]).parent == folder for m in matches)
    listed = lookalike("duplicates", *db)
    assert listed.code == 0 and listed.out.startswith("group "), listed.err
    assert rendered.copies > 0 and "keep" in listed.out


def test_export_defaults_to_flat_and_the_manifest_keeps_the_source(ran, flat, tmp_path):
    db, _ = ran
    _, folder, _ = flat
    dest = tmp_path / "out"
    done = lookalike("export", dest, "--name-by", "source", *db)
    assert done.code == 0 and "(flat layout)" in done.out, done.err
    with open(dest / CSV_MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["label"] == row["split"] == "" for row in rows)
    for row in rows:  # each file is its source's bytes, under the source's own name
        source = Path(row["source"])
        assert source.parent == folder and row["path"] == source.name
        assert (dest / row["path"]).read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted([row["path"] for row in rows] +
                                                          [CSV_MANIFEST, "transferimages.txt"])
    refused = lookalike("export", tmp_path / "split", "--layout", "train-test", *db)
    assert refused.code == 2 and "no split yet" in refused.err and "--layout by-label or flat" in refused.err


def test_a_csv_without_labels_exports_its_metadata_columns(db, flat, tmp_path):
    """On SQLite and PostgreSQL: the SKU and colour columns of the load manifest reach the export manifest."""
    _, folder, _ = flat
    files = sorted(folder.iterdir())[:4]
    manifest = tmp_path / "catalogue.csv"
    manifest.write_text("sku,path,colour\n" + "".join(f"SKU-{n},{path},c{n}\n" for n, path in enumerate(files)))
    assert load_images(db, manifest, progress=False).loaded == 4
    summary = export_images(db, str(tmp_path / "out"), progress=False)
    assert (summary.layout, summary.images, summary.failed) == ("flat", 4, {})
    with open(tmp_path / "out" / CSV_MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_id", "label", "split", "path", "sha256", "byte_size", "source", "colour", "sku"]
    assert sorted((row["sku"], row["colour"], row["source"]) for row in rows) == [
        (f"SKU-{n}", f"c{n}", str(path)) for n, path in enumerate(files)]
    by_label = export_images(db, str(tmp_path / "by-label"), layout="by-label", progress=False)
    assert by_label.images == 0 and by_label.unlabelled == 4
    assert "left out: 4 unique images without a label" in "\n".join(by_label.lines())
    with pytest.raises(ExportError, match="no split yet"):
        export_images(db, str(tmp_path / "tt"), layout="train-test", progress=False)
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(runs.c.outcome).where(runs.c.step == "load")).scalars().all() == ["ok"]


def test_linked_label_folders_are_followed_once_and_loops_end(flat, tmp_path):
    _, folder, _ = flat
    files = sorted(folder.iterdir())
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    (tree / "dotted").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copy(files[0], tree / "dotted" / "a.jpg")
    shutil.copy(files[1], elsewhere / "b.jpg")
    shutil.copy(files[2], tree / "loose.jpg")               # beside the label folders: no label
    (tree / "list.tsv").write_text("dotted\tdotted/a.jpg\n")  # a manifest beside them is not an image
    (tree / "striped").symlink_to(elsewhere, target_is_directory=True)
    (tree / "dotted" / "loop").symlink_to(tree, target_is_directory=True)   # a link back up: a loop
    (elsewhere / "again").symlink_to(elsewhere, target_is_directory=True)
    db = ["--db", f"sqlite:///{tmp_path}/links.db"]
    done = lookalike("load", tree, *db)
    assert done.code == 0 and done.out.startswith("loaded 3 new images, 0 already present"), (done.out, done.err)
    with sa.create_engine(db[1]).connect() as conn:
        found = sorted(conn.execute(sa.select(images.c.label, images.c.source)).all(), key=str)
    assert found == sorted([("dotted", str(tree / "dotted" / "a.jpg")), ("striped", str(elsewhere / "b.jpg")),
                            (None, str(tree / "loose.jpg"))], key=str)


def test_the_notebook_runs_on_unlabelled_data(ran, monkeypatch):
    """Its code cells, in order, in this process (no kernel to start; test_pipeline runs it in one)."""
    import matplotlib
    matplotlib.use("Agg")
    db, _ = ran
    monkeypatch.setenv("LOOKALIKE_DB", db[1])
    monkeypatch.chdir(NOTEBOOK.parent)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    printed, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        for cell in notebook.cells:
            if cell.cell_type == "code":
                exec(compile(cell.source, f"{NOTEBOOK.name} cell", "exec"), namespace)
    namespace["db"].close()
    assert printed.getvalue().count("similarity") == 10 and "photo" in printed.getvalue()  # names for labels
