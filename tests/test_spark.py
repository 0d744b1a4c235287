"""The Spark jobs on local[2] (one file: one JVM start and one first-job warm-up per test run).

- `lookalike spark hash`, `spark featurize` and `lookalike import` on SQLite and PostgreSQL: the same rows
  as the single-machine steps, none doubled by re-runs, re-imports or a lost executor.
- `lookalike spark neardup` and `spark index`: the pairs equal the single-machine search, a task that dies
  is retried to the same pairs, dedupe groups them alike, and the index built on Spark answers as the one
  built on one machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from lookalike.db import (Database, duplicate_groups, embeddings, feature_models, hashed_images, image_hashes, images,
                          now, vector_bytes)
from lookalike.dedupe import dedupe_images, hash_matrix
from lookalike.errors import BadInput
from lookalike.features import featurize_images
from lookalike.hashing import hash_images
from lookalike.importing import import_output, part_files
from lookalike.index import index_status, open_index, rebuild_index, refresh_index
from lookalike.ingest import load_images
from lookalike.neardup import Search, pairs_within
from lookalike.samples import render_samples
from lookalike.spark.featurize import spark_featurize
from lookalike.spark.hash import spark_hash
from lookalike.spark.index_build import index_job
from lookalike.spark.io import FAIL_ONCE
from lookalike.spark.neardup import _tasks as spark_tasks, neardup_job, spark_pairs
from support.cli import lookalike

pytestmark = pytest.mark.timeout(300)   # a JVM start on a loaded machine, then seconds per job


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


# ---- spark neardup and spark index
def planted(n: int, seed: int, words: int = 1) -> np.ndarray:
    """Random hashes with many equal ones (a flat-image pile and small sets) and near copies."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, (n, words), dtype=np.uint64, endpoint=False)
    hashes[n // 30:n // 8] = hashes[0]                  # a pile of equal hashes (276 at n = 3000)
    hashes[n // 8:n // 4:3] = hashes[1]
    copies = rng.choice(np.arange(n // 4, n), n // 3, replace=False)
    sources = rng.integers(0, n, copies.size)
    for copy, source in zip(copies, sources):           # 0..10 bits flipped
        hashes[copy] = hashes[source]
        for bit in rng.choice(64 * words, int(rng.integers(0, 11)), replace=False):
            hashes[copy, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return hashes[:, 0] if words == 1 else hashes


def assert_same_pairs(found, ids: np.ndarray, hashes: np.ndarray, radius: int) -> int:
    a, b, distance = found
    i, j, expected = pairs_within(hashes, radius)
    assert np.array_equal(a, ids[i]) and np.array_equal(b, ids[j]) and np.array_equal(distance, expected)
    return len(a)


@pytest.mark.parametrize("n, words, radius", [(3000, 1, 8), (800, 2, 10)])
def test_pairs_equal_the_single_machine_search(spark, tmp_path, n, words, radius):
    hashes = planted(n, seed=n + radius, words=words)
    ids = np.sort(np.random.default_rng(1).choice(10**12, n, replace=False)).astype(np.int64)  # not 0..n-1
    found = spark_pairs(spark, ids, hashes, radius, str(tmp_path / "pairs"))
    assert assert_same_pairs(found, ids, hashes, radius) > n // 4
    assert Search(hashes, radius).plan is not None   # the chunked search (the sample set's takes the brute force)
    written = pq.read_table(tmp_path / "pairs").to_pandas()
    assert len(written) == len(found[0]) and (written.image_id_a < written.image_id_b).all()


@pytest.mark.parametrize("n, words, radius, parts", [(3000, 1, 8, 5), (800, 2, 10, 3), (300, 1, 30, 1)])
def test_tasks_cut_into_row_ranges_give_the_same_pairs(n, words, radius, parts):
    # What a large cluster gets: each chunk task cut into row ranges; every pair still comes once.
    hashes = planted(n, seed=n, words=words)
    search = Search(hashes, radius)
    tasks = search.tasks(parts)
    assert len(tasks) == len(search.tasks()) * (parts if search.plan else 1)
    found = search.pairs([search.run(task) for task in reversed(tasks)])
    assert all(np.array_equal(x, y) for x, y in zip(found, pairs_within(hashes, radius)))
    assert sum(search.cost(task) for task in tasks) == pytest.approx(sum(map(search.cost, search.tasks())))
    if search.plan:   # the job cuts them only where the cluster has more cores than tasks of a fair size
        assert len(spark_tasks(search, 64)) > len(spark_tasks(search, 1)) == len(search.tasks())


def test_a_task_whose_worker_dies_is_retried_to_the_same_pairs(spark, tmp_path):
    hashes = planted(2000, seed=3)
    ids = np.arange(1, 2001, dtype=np.int64)
    marker = tmp_path / "fail-once"
    marker.touch()
    spark.sparkContext.setLocalProperty(FAIL_ONCE, str(marker))
    try:
        found = spark_pairs(spark, ids, hashes, 8, str(tmp_path / "pairs"))
    finally:
        spark.sparkContext.setLocalProperty(FAIL_ONCE, None)
    assert not marker.exists()   # a task took it and killed its Python worker
    assert assert_same_pairs(found, ids, hashes, 8) > 500


def test_one_hash_gives_no_pairs_and_an_empty_parquet(spark, tmp_path):
    a, b, _ = spark_pairs(spark, np.ones(1, np.int64), np.zeros(1, np.uint64), 8, str(tmp_path / "p"))
    assert len(a) == len(b) == 0 and pq.read_table(tmp_path / "p").num_rows == 0


@pytest.fixture(scope="module")
def dedupe_samples(tmp_path_factory):
    return render_samples(tmp_path_factory.mktemp("dedupe-samples"), per_label=10, seed=3, copy_share=0.4)


def groups(db, run_id: int) -> dict[int, tuple[int, bool, int]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(duplicate_groups.c.image_id, duplicate_groups.c.group_id,
                                      duplicate_groups.c.is_keeper, duplicate_groups.c.distance)
                            .where(duplicate_groups.c.run_id == run_id)).all()
    return {image_id: (group_id, bool(keeper), distance) for image_id, group_id, keeper, distance in rows}


def stored_hashes(db, kind: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT image_id, hex, value, bits FROM image_hashes WHERE kind = :k "
                                    "AND size = :s ORDER BY image_id"), {"k": kind, "s": size}).all()
    ids = np.array([r.image_id for r in rows], dtype=np.int64)
    return ids, hash_matrix(kind, size, rows[0].bits, [r.hex for r in rows], [r.value for r in rows])


def test_dedupe_on_spark_pairs_gives_the_dedupe_groups(db, spark, dedupe_samples, tmp_path):
    load_images(db, dedupe_samples.manifest, progress=False)
    hash_images(db, progress=False)
    for kind, size, per_label in [("dhash_rowcol", 8, False), ("phash", 8, True)]:   # 128 and 64 bits
        options = dict(hash_kind=kind, size=size, max_distance=12, per_label=per_label, include_low_detail=True)
        alone = dedupe_images(db, rule="near", progress=False, **options)
        expected = groups(db, alone.run_id)
        assert alone.duplicates > 0

        if per_label:   # through the CLI, in this process: it takes the running session
            ran = lookalike("--db", db.url.render_as_string(hide_password=False), "--store", db.store.root, "-q",
                            "spark", "neardup", "--out", tmp_path / kind, "--hash", kind, "--size", size,
                            "--max-distance", 12, "--per-label", "--include-low-detail")
            assert ran.code == 0, ran.err
            assert f"dedupe run {alone.run_id} (redone)" in ran.out and "pairs within 12 bits" in ran.out
        else:
            summary = neardup_job(db, out=tmp_path / kind, session=spark, **options)
            assert summary.dedupe.run_id == alone.run_id and summary.dedupe.replaced   # the same run, redone
            assert summary.hashes == dedupe_samples.images and summary.pairs >= alone.duplicates
        assert groups(db, alone.run_id) == expected
        ids, hashes = stored_hashes(db, kind, size)
        written = pq.read_table(tmp_path / kind).to_pandas().sort_values(["image_id_a", "image_id_b"])
        assert assert_same_pairs((written.image_id_a.to_numpy(), written.image_id_b.to_numpy(),
                                  written.distance.to_numpy()), ids, hashes, 12) > 0


@pytest.fixture
def sqlite_db(sqlite_url, tmp_path):
    with Database(sqlite_url, tmp_path / "store") as database:
        yield database


def test_hashes_from_parquet_with_other_kinds_left_out(spark, sqlite_db, tmp_path):
    hashes = planted(1500, seed=9)
    ids = np.arange(10, 1510, dtype=np.int64)
    source = tmp_path / "hashes.parquet"
    pq.write_table(pa.table({
        "image_id": np.r_[ids[::-1], ids], "kind": ["phash"] * 1500 + ["ahash"] * 1500, "size": [8] * 3000,
        "hex": [f"{int(h):016x}" for h in hashes[::-1]] + ["0" * 16] * 1500}), source)
    summary = neardup_job(sqlite_db, out=tmp_path / "pairs", hashes=str(source), hash_kind="phash", size=8,
                          max_distance=6, session=spark)
    assert summary.dedupe is None and summary.hashes == 1500
    written = pq.read_table(tmp_path / "pairs").to_pandas().sort_values(["image_id_a", "image_id_b"])
    assert assert_same_pairs((written.image_id_a.to_numpy(), written.image_id_b.to_numpy(),
                              written.distance.to_numpy()), ids, hashes, 6) == summary.pairs > 0


@pytest.mark.parametrize("table, expected", [
    # a null row would turn the long column into floats: -1 and -2 (64 and 63 bits set) must stay exact
    (pa.table({"image_id": pa.array([1, 2, 3, None, 5], pa.int64()),
               "value": pa.array([-1, -2, None, 7, -1], pa.int64())}), [(1, 2, 1), (1, 5, 0), (2, 5, 1)]),
    (pa.table({"image_id": [1, 2, 3, 4], "hex": ["ff", "zz", "fe", "1" * 17]}), [(1, 3, 1)]),
])
def test_rows_without_a_readable_hash_are_left_out_and_counted(spark, sqlite_db, tmp_path, table, expected):
    pq.write_table(table, tmp_path / "hashes.parquet")
    summary = neardup_job(sqlite_db, out=tmp_path / "pairs", hashes=str(tmp_path / "hashes.parquet"),
                          hash_kind="dhash", size=8, max_distance=8, session=spark)
    written = pq.read_table(tmp_path / "pairs").to_pandas().sort_values(["image_id_a", "image_id_b"])
    assert list(written.itertuples(index=False, name=None)) == expected
    assert summary.left_out == 2 and "left out: 2 rows" in summary.lines()[1]


@pytest.mark.parametrize("table, message", [
    ({"image_id": [1, 2, 2], "value": [5, 6, 7]}, "image 2 has more than one"),
    ({"id": [1, 2], "value": [5, 6]}, "needs an image_id column and a value or hex column"),
])
def test_a_bad_parquet_of_hashes_is_refused_in_one_line(spark, sqlite_db, tmp_path, table, message):
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    with pytest.raises(BadInput, match=message) as refused:
        neardup_job(sqlite_db, out=tmp_path / "pairs", hashes=str(tmp_path / "bad.parquet"), hash_kind="dhash",
                    size=8, session=spark)
    assert "\n" not in str(refused.value)


def test_spark_index_answers_as_the_single_machine_index(spark, sqlite_db, tmp_path):
    with sqlite_db.begin() as conn:
        model = conn.execute(sa.insert(feature_models).values(
            name="test-model", weights_sha256="0" * 64, dim=300, input_size=1, preprocessing="none",
            created_at=now()).returning(feature_models.c.id)).scalar_one()
        vectors = np.random.default_rng(4).normal(size=(3000, 300)).astype(np.float32)
        conn.execute(sa.insert(images), [dict(id=i, sha256=f"{i:064x}", source=f"{i}.jpg", byte_size=1, status="ok",
                                              loaded_at=now()) for i in range(1, 3001)])
        conn.execute(sa.insert(embeddings), [dict(image_id=i, model_id=model, vector=vector_bytes(v))
                                             for i, v in zip(range(1, 3001), vectors)])
    queries = vectors[::150] + np.random.default_rng(5).normal(scale=0.3, size=(20, 300)).astype(np.float32)

    def answers():
        index = open_index(sqlite_db, model, "ivf")
        assert index.kind == "ivf" and index.header.ivf_rows == 3000
        return [index.search(q, 10)[0].tolist() for q in queries]

    marker = tmp_path / "fail-once"
    marker.touch()
    spark.sparkContext.setLocalProperty(FAIL_ONCE, str(marker))
    try:
        status = index_job(sqlite_db, backbone="test-model", index="ivf", session=spark)
    finally:
        spark.sparkContext.setLocalProperty(FAIL_ONCE, None)
    assert not marker.exists()   # a task's worker died and the task ran again
    assert status.kind == "ivf" and status.vectors == 3000 and status.fresh
    on_spark = answers()
    rebuild_index(sqlite_db, backbone="test-model", index="ivf")
    assert on_spark == answers()
