"""`lookalike import` on folders that are not a clean Spark output: a clear one-line error for what cannot be
an output at all, and for the rest every good row imported once, every bad row or part file counted, none
written under another image's id."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from lookalike.db import Database, embeddings, hashed_images, image_hashes, images
from lookalike.importing import FORMAT, MANIFEST, import_output
from lookalike.ingest import load_images
from support.cli import lookalike

pytestmark = pytest.mark.timeout(60)

HASHES = pa.list_(pa.struct([("kind", pa.string()), ("size", pa.int32()), ("hex", pa.string()),
                             ("value", pa.int64()), ("bits", pa.int32())]))
HASH_SCHEMA = pa.schema([("image_id", pa.int64()), ("sha256", pa.string()), ("reason", pa.string()),
                         ("hasher", pa.string()), ("low_detail", pa.bool_()), ("hashes", HASHES)])


@pytest.fixture
def loaded(tmp_path, sample_images):
    folder = tmp_path / "in" / "label"
    folder.mkdir(parents=True)
    for name, data in sample_images.items():
        (folder / name).write_bytes(data)
    url = f"sqlite:///{tmp_path}/t.db"
    with Database(url, tmp_path / "store") as db:
        load_images(db, str(tmp_path / "in"), progress=False)
        with db.engine.connect() as conn:
            ids = conn.execute(sa.select(images.c.id, images.c.sha256).order_by(images.c.id)).all()
        yield db, url, ids


def output(folder, job: str, tables: dict[str, pa.Table], **manifest) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, folder / name)
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "job": job, **manifest}))


def hash_row(image_id, sha, reason=None, hashes="ok"):
    if hashes == "ok":
        hashes = [{"kind": "dhash_rowcol", "size": 1, "hex": "0", "value": 0, "bits": 4}]
    return {"image_id": image_id, "sha256": sha, "reason": reason, "hasher": "h", "low_detail": False,
            "hashes": None if reason else hashes}


def count(db, table) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


@pytest.mark.parametrize("make, message", [
    (lambda f: None, "no such folder"),
    (lambda f: f.mkdir(), "has no _lookalike.json"),
    (lambda f: (f.mkdir(), (f / MANIFEST).write_bytes(b"\xff{not json")), "cannot read"),
    (lambda f: (f.mkdir(), (f / MANIFEST).write_text('{"format": "other", "job": "hash"}')), "does not describe"),
    (lambda f: (f.mkdir(), (f / MANIFEST).write_text('[1, 2]')), "does not describe"),
])
def test_what_is_not_an_output_is_refused_in_one_line(loaded, tmp_path, make, message):
    db, url, _ids = loaded
    make(tmp_path / "out")
    result = lookalike("--db", url, "--store", tmp_path / "store", "import", tmp_path / "out")
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert count(db, hashed_images) == 0


def test_bad_rows_and_part_files_are_counted_and_the_good_rows_imported_once(loaded, tmp_path):
    db, url, ids = loaded
    (a, sha_a), (b, sha_b), (c, sha_c) = ids
    rows = [hash_row(a, sha_a), hash_row(b, sha_c),                   # b's id with c's sha256: another database's
            hash_row(999_999, "0" * 64), hash_row(c, sha_c, hashes=None),   # no such image; no hashes
            hash_row(c, sha_c, hashes=[{"kind": "k" * 300, "size": 1, "hex": "0", "value": 0, "bits": 4}]),
            hash_row(None, None), hash_row(c, sha_c, reason="x" * 10_000)]   # no id; failed, a huge reason cut short
    output(tmp_path / "out", "hash", {"part-0.parquet": pa.Table.from_pylist(rows, schema=HASH_SCHEMA),
                                      "part-1.parquet": pa.table({"image_id": [b]})})   # columns missing
    (tmp_path / "out" / "part-2.parquet").write_bytes(b"PAR1 torn")
    for _ in range(2):   # twice: nothing doubled
        summary = import_output(db, tmp_path / "out")
        assert (summary.counts.written, summary.counts.rejected) == (1, 5)
        assert [len(reason) for reason in summary.counts.failed] == [500]
        assert sorted(bad.split(":")[0] for bad in summary.bad_files) == ["part-1.parquet", "part-2.parquet"]
        assert (count(db, hashed_images), count(db, image_hashes)) == (1, 1)


def test_a_featurize_output_for_a_model_the_database_lacks_is_refused(loaded, tmp_path):
    db, url, ids = loaded
    output(tmp_path / "out", "featurize", {}, model={"name": "efficientnet-lite0", "weights_sha256": "f" * 64})
    result = lookalike("--db", url, "--store", tmp_path / "store", "import", tmp_path / "out")
    assert result.code != 0 and "no feature model 'efficientnet-lite0'" in result.err
    assert count(db, embeddings) == 0
