"""`lookalike spark hash`, `spark featurize` and `lookalike import` on Spark local[2], SQLite and PostgreSQL:
the same rows as the single-machine steps, none doubled by re-runs, re-imports or a lost executor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from lookalike.db import Database, embeddings, hashed_images, image_hashes, images
from lookalike.features import featurize_images
from lookalike.hashing import hash_images
from lookalike.importing import import_output, part_files
from lookalike.index import index_status, refresh_index
from lookalike.ingest import load_images
from lookalike.samples import render_samples
from lookalike.spark.featurize import spark_featurize
from lookalike.spark.hash import spark_hash
from lookalike.spark.io import FAIL_ONCE
from support.cli import lookalike

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return render_samples(tmp_path_factory.mktemp("samples"), per_label=5, seed=12, copy_share=0.2)


def damage(db: Database) -> dict[str, str]:
    """Two bad images, as `lookalike store check` would find them: one missing, one undecodable."""
    with db.engine.connect() as conn:
        first, second = conn.execute(sa.select(images.c.sha256).order_by(images.c.sha256).limit(2)).scalars()
    db.store.path(first).unlink()
    db.store.path(second).write_bytes(b"\xff\xd8\xff not a jpeg")
    return {first: "missing", second: "corrupt"}


@pytest.fixture(scope="module")
def reference(sample_set, tmp_path_factory):
    """`lookalike hash` and `lookalike featurize` on SQLite, the same images damaged the same way."""
    folder = tmp_path_factory.mktemp("reference")
    with Database(f"sqlite:///{folder}/ref.db", folder / "store") as db:
        load_images(db, sample_set.manifest, progress=False)
        damage(db)
        hashed = hash_images(db, progress=False)
        featurized = featurize_images(db, progress=False)
        return {"hashes": hash_rows(db), "done": done_rows(db), "vectors": vectors(db),
                "hash_failed": hashed.failed, "featurize_failed": featurized.failed}


def hash_rows(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(
            sa.select(images.c.sha256, image_hashes.c.kind, image_hashes.c.size, image_hashes.c.hex,
                      image_hashes.c.value, image_hashes.c.bits, image_hashes.c.hasher)
            .join(images, images.c.id == image_hashes.c.image_id)))


def done_rows(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(
            sa.select(images.c.sha256, hashed_images.c.low_detail, hashed_images.c.hasher)
            .join(images, images.c.id == hashed_images.c.image_id)))


def vectors(db: Database) -> dict[str, np.ndarray]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.sha256, embeddings.c.vector)
                            .join(images, images.c.id == embeddings.c.image_id)).all()
    return {sha: np.frombuffer(vector, dtype="<f4") for sha, vector in rows}


def test_spark_hash_gives_the_hash_steps_rows_once_through_reruns_reimports_and_a_lost_worker(
        spark, db, sample_set, reference, tmp_path):
    load_images(db, sample_set.manifest, progress=False)
    damage(db)
    # On PostgreSQL (where the executors also write) a task's Python worker dies mid-job, once: Spark runs
    # the task again. Once is enough: a new worker costs seconds.
    marker = tmp_path / "fail-once"
    if db.dialect == "postgresql":
        marker.touch()
        spark.sparkContext.setLocalProperty(FAIL_ONCE, str(marker))
    try:
        first = spark_hash(db, out=tmp_path / "hash", session=spark)
    finally:
        spark.sparkContext.setLocalProperty(FAIL_ONCE, None)
    assert not marker.exists()
    assert hash_rows(db) == reference["hashes"]          # bit-identical, hasher version included
    assert done_rows(db) == reference["done"]
    assert first.step.failed == reference["hash_failed"] and sum(first.step.failed.values()) == 2
    assert first.step.hashed == sample_set.images - 2

    # A re-run does only the two that failed; importing the output again (an import killed half-way, run
    # again), or with a part file written twice, stores nothing twice.
    again = spark_hash(db, out=tmp_path / "hash", session=spark)
    assert (again.step.hashed, again.step.already, sum(again.step.failed.values())) == (0, sample_set.images - 2, 2)
    first_part = part_files(tmp_path / "hash")[0]
    shutil.copy(first_part, first_part.with_name("part-99999-copy.snappy.parquet"))
    imported = import_output(db, tmp_path / "hash")
    assert imported.counts.written == 0 and sum(imported.counts.failed.values()) >= 2
    assert hash_rows(db) == reference["hashes"] and done_rows(db) == reference["done"]


def test_spark_featurize_matches_the_step_and_the_index_catches_up(spark, db, sample_set, reference, tmp_path):
    load_images(db, sample_set.manifest, progress=False)
    damage(db)
    # An index that exists before the job (built on one image's embedding) must catch up after it.
    with db.engine.connect() as conn:
        last = conn.execute(sa.select(images.c.id).order_by(images.c.sha256.desc()).limit(1)).scalar_one()
    featurize_images(db, progress=False)
    with db.begin() as conn:
        conn.execute(embeddings.delete().where(embeddings.c.image_id != last))
    refresh_index(db)

    summary = spark_featurize(db, out=tmp_path / "emb", session=spark)
    assert summary.step.embedded == sample_set.images - 3 and summary.step.already == 1
    assert summary.step.failed == reference["featurize_failed"]
    found, expected = vectors(db), reference["vectors"]
    assert found.keys() == expected.keys()
    assert max(float(np.abs(found[sha] - expected[sha]).max()) for sha in expected) < 1e-5

    status = index_status(db)
    assert status.fresh and status.vectors == sample_set.images - 2

    # Imported again into the same database: nothing doubled, the index still fresh.
    assert lookalike("--db", db.url.render_as_string(hide_password=False), "--store", db.store.root,
                     "import", tmp_path / "emb").code == 0
    assert vectors(db).keys() == expected.keys()
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(embeddings)).scalar() == len(expected)
    assert index_status(db).fresh


def test_cli_spark_hash_runs_the_job_on_a_master(spark, sample_set, tmp_path):
    url = f"sqlite:///{tmp_path}/cli.db"
    with Database(url, tmp_path / "store") as db:
        load_images(db, sample_set.manifest, progress=False)
    # Spark's overwrite deletes the whole folder: one holding anything but a job's output is refused.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    refused = lookalike("--db", url, "--store", tmp_path / "store", "spark", "hash", "--out", tmp_path / "precious")
    assert refused.code == 2 and "refusing to replace" in refused.err
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"

    result = lookalike("--db", url, "--store", tmp_path / "store", "-q", "spark", "hash", "--master", "local[2]",
                       "--out", tmp_path / "out")
    assert result.code == 0, result.err
    assert f"hash: {sample_set.images} hashed" in result.out and str(tmp_path / "out") in result.out
    assert (Path(tmp_path / "out") / "_lookalike.json").exists()


def test_spark_reads_the_files_itself_and_matches_them_to_the_loaded_images(spark, sample_set, reference, tmp_path):
    with Database(f"sqlite:///{tmp_path}/files.db", tmp_path / "store") as db:
        load_images(db, sample_set.manifest, progress=False)
        shutil.rmtree(db.store.root)   # the executors read only the sample folder (its TSV and CSV match nothing)
        summary = spark_hash(db, out=tmp_path / "out", source=str(sample_set.root), session=spark)
        assert summary.step.hashed == sample_set.images and not summary.step.failed
        assert set(reference["hashes"]) <= set(hash_rows(db)) and len(hash_rows(db)) == sample_set.images * 12


def test_a_job_that_fails_on_every_attempt_says_why_in_one_line(spark):
    from lookalike.spark.io import job_session
    from lookalike.spark.session import JobFailed

    def broken(batches):
        for _ in batches:
            raise ValueError("no such image store: /nowhere (password=hunter2)")
        yield from ()

    with pytest.raises(JobFailed) as failed, job_session("local[2]", spark):
        spark.range(2, numPartitions=1).mapInPandas(broken, "id long").collect()
    message = str(failed.value)
    assert message.startswith("the Spark job failed: ValueError: no such image store: /nowhere")
    assert "\n" not in message and "hunter2" not in message and failed.value.exit_code == 1
    assert spark.range(3).count() == 3   # the shared session stays usable
