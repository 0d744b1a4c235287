"""The whole workflow end to end on the rendered sample set: SQLite and PostgreSQL, CLI, notebook."""

from __future__ import annotations

import csv
import json
from collections import Counter
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import sqlalchemy as sa
from nbclient import NotebookClient
from PIL import Image

from lookalike.config import DEFAULT_BACKBONE
from lookalike.db import Database, embeddings, images, models, runs, splits
from lookalike.db.queries import latest_feature_model
from lookalike.pipeline import run_pipeline
from lookalike.samples import render_samples
from lookalike.search import similar_images
from lookalike.spaces import resolve_space
from support.cli import lookalike

LOOKALIKE = [sys.executable, "-m", "lookalike.cli"]
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "query_similar_images.ipynb"
PER_LABEL = 16


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return render_samples(tmp_path_factory.mktemp("samples"), per_label=PER_LABEL, seed=7)


@pytest.fixture(scope="module")
def many_samples(tmp_path_factory):
    """About 200 images: featurize runs for several seconds and commits many batches (shared, read only)."""
    return render_samples(tmp_path_factory.mktemp("many"), per_label=60, seed=11)


def outcome(db: Database) -> dict:
    """What a run decided, keyed by content (sha256) so two databases can be compared."""
    with db.engine.connect() as conn:
        sha = dict(conn.execute(sa.select(images.c.id, images.c.sha256)).all())
        split = {sha[i]: s for i, s in conn.execute(sa.select(splits.c.image_id, splits.c.split))}
        test_accuracy = conn.execute(sa.select(models.c.test_accuracy).order_by(models.c.id.desc())).scalars().first()
        top = {}
        for query_image, rank, image_id in conn.execute(sa.text(
                "SELECT q.image_id, r.rank, r.image_id FROM ranking_results r "
                "JOIN query_images q ON q.id = r.query_id ORDER BY q.image_id, r.rank")):
            top.setdefault(sha[query_image], []).append(sha[image_id])
    return {"split": split, "test_accuracy": test_accuracy, "top": top}


@pytest.fixture(scope="module")
def sqlite_run(sample_set, tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "lookalike.db"
    with Database(f"sqlite:///{path}") as db:
        summary = run_pipeline(db, sample_set.manifest, seed=0, queries_per_label=5)
        yield db, summary


def test_run_does_every_step_and_ranks_the_test_split(sqlite_run, sample_set):
    db, summary = sqlite_run
    assert [name for name, _, _ in summary.steps] == [
        "load", "hash", "featurize", "index", "dedupe", "split", "train", "fit", "evaluate", "rank"]
    # The index is built by the run, not by the first search after it.
    index_line = dict((name, lines) for name, _, lines in summary.steps)["index"][0]
    assert re.fullmatch(rf"index .*\.index/model-1 \(efficientnet-lite0\): exact, {sample_set.images} vectors in "
                        rf"{sample_set.images} rows, [\d.]+ MiB, generation \d+, fresh", index_line), index_line
    with db.engine.connect() as conn:
        ok = conn.execute(sa.select(sa.func.count()).where(images.c.status == "ok")).scalar()
        assert ok == sample_set.images
        assert conn.execute(sa.select(sa.func.count()).select_from(embeddings)).scalar() == ok
        step_rows = conn.execute(sa.select(runs.c.step, runs.c.outcome)).all()
        assert {s for s, _ in step_rows} >= {"featurize", "rank", "run"} and all(o == "ok" for _, o in step_rows)
        tests = conn.execute(sa.select(sa.func.count()).where(splits.c.split == "test")).scalar()
        per_query = conn.execute(sa.text("SELECT query_id, count(*), count(DISTINCT image_id) "
                                         "FROM ranking_results GROUP BY query_id")).all()
    assert len(per_query) == tests and all(n == distinct == 10 for _, n, distinct in per_query)
    # Planted copies must not leak between train and test: dedupe ran before the split.
    assert tests < sample_set.images * 0.3


def test_similar_finds_same_texture_and_never_the_query(sqlite_run, sample_set):
    db, _ = sqlite_run
    query = sample_set.root / "leopard" / "leopard_0002.jpg"
    matches = similar_images(db, query, k=10)
    assert len(matches) == 10 and len({m.image_id for m in matches}) == 10
    with db.engine.connect() as conn:
        query_id = conn.execute(sa.select(images.c.id).where(images.c.source == str(query.resolve()))).scalar()
    assert query_id not in {m.image_id for m in matches}
    assert [m.distance for m in matches] == sorted(m.distance for m in matches)
    # The whole-frame embedding also weighs colour and silhouette (see README, "Retrieval quality"):
    # same texture is the largest share of the top 10, not all of it.
    labels = Counter(m.label for m in matches)
    assert labels.most_common(1)[0][0] == "leopard" and labels["leopard"] >= 5
    by_id = similar_images(db, query_id, k=10)
    assert [m.image_id for m in by_id] == [m.image_id for m in matches]
    # A label filter still gives k rows, all of that label, nearest first, never the query.
    striped = similar_images(db, query_id, k=10, label="striped")
    assert len(striped) == 10 and {m.label for m in striped} == {"striped"}
    assert [m.distance for m in striped] == sorted(m.distance for m in striped)
    unfiltered = [m.image_id for m in matches if m.label == "striped"]
    assert [m.image_id for m in striped][:len(unfiltered)] == unfiltered
    with pytest.raises(LookupError, match="no searchable image has label 'tartan'"):
        similar_images(db, query_id, k=10, label="tartan")


def test_default_space_is_chosen_by_evaluate_and_keeps_copies_first(sqlite_run, sample_set):
    """The run fits pca and learned, evaluate records the best on the test split, and an auto search answers
    from it: same texture throughout, no ties, and a planted near-copy still first for its original."""
    db, summary = sqlite_run
    evaluate_lines = dict((name, lines) for name, _, lines in summary.steps)["evaluate"]
    assert "  default space: learned (best top1, cosine), used where --space is auto" in evaluate_lines
    with db.engine.connect() as conn:
        id_of = dict(conn.execute(sa.select(images.c.source, images.c.id)).all())
        spaces_ranked = set(conn.execute(sa.text("SELECT DISTINCT space FROM ranking_results")).scalars())
    assert spaces_ranked == {"learned"}
    with open(sample_set.ground_truth, newline="") as f:
        planted = [(id_of[str((sample_set.root / row["copy"]).resolve())],
                    id_of[str((sample_set.root / row["original"]).resolve())]) for row in csv.DictReader(f)]
    first_in_raw, same_label = 0, Counter()
    for copy_id, original_id in planted:
        matches = similar_images(db, original_id, k=10)
        assert {m.space for m in matches} == {"learned"}
        assert len({f"{m.similarity:.4f}" for m in matches}) == 10   # no ties in the top 10, as printed
        raw = similar_images(db, original_id, k=10, space="embeddings")
        assert {m.space for m in raw} == {"embeddings"}
        label = raw[0].label if raw[0].image_id == copy_id else matches[0].label
        same_label.update(learned=sum(m.label == label for m in matches), raw=sum(m.label == label for m in raw))
        if raw[0].image_id == copy_id:   # a copy the raw embeddings find first is still first
            first_in_raw += 1
            assert matches[0].image_id == copy_id
    assert first_in_raw >= 1 and same_label["learned"] > same_label["raw"]


def test_same_results_on_postgresql(sqlite_run, sample_set, pg_url):
    sqlite_db, _ = sqlite_run
    with Database(pg_url, Path(sqlite_db.store.root).parent / "pg-store") as pg:
        run_pipeline(pg, sample_set.manifest, seed=0, queries_per_label=5)
        assert outcome(pg) == outcome(sqlite_db)


def test_cli_similar_sheet_and_json(sqlite_run, sample_set, tmp_path):
    db, _ = sqlite_run
    url = str(db.url)
    sheet = tmp_path / "top10.png"
    query = sample_set.root / "striped" / "striped_0001.jpg"
    # In this process: three commands would otherwise load the model three times.
    done = lookalike("--db", url, "similar", query, "--sheet", sheet, "--json")
    assert done.code == 0, done.err
    rows = json.loads(done.out)
    assert [r["rank"] for r in rows] == list(range(1, 11))
    exact = lookalike("--db", url, "similar", query, "--json", "--index", "exact")
    assert exact.code == 0, exact.err
    assert [r["image_id"] for r in json.loads(exact.out)] == [r["image_id"] for r in rows]
    ivf = lookalike("--db", url, "similar", query, "--index", "ivf")
    assert ivf.code == 2 and "IVF index needs at least 1000 vectors" in ivf.err
    with Image.open(sheet) as img:
        assert img.width > 600 and img.height > 300


def test_notebook_runs(sqlite_run):
    db, _ = sqlite_run
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["LOOKALIKE_DB"] = str(db.url)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        del os.environ["LOOKALIKE_DB"]
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "similarity" in outputs and outputs.count("image ") >= 10
    with db.engine.connect() as conn:   # `auto`: the space evaluate recorded as the best answered
        recorded = resolve_space(conn, "auto", latest_feature_model(conn, DEFAULT_BACKBONE))
    assert f"space: {recorded}\n" in outputs


@pytest.mark.slow
def test_killed_featurize_resumes_with_one_embedding_per_image(many_samples, tmp_path):
    sample_set = many_samples
    url = f"sqlite:///{tmp_path}/kill.db"
    subprocess.run(LOOKALIKE + ["--db", url, "load", str(sample_set.manifest)], check=True, capture_output=True)
    proc = subprocess.Popen(LOOKALIKE + ["--db", url, "featurize", "--batch-size", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = sa.create_engine(url)
    written, deadline = 0, time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        with engine.connect() as conn:
            written = conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar()
        if written >= 8:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    engine.dispose()
    assert 8 <= written < sample_set.images, "featurize should have been killed half-way"
    done = subprocess.run(LOOKALIKE + ["--db", url, "featurize"], check=True, capture_output=True, text=True)
    already = int(done.stdout.split(" already had one")[0].split()[-1])
    embedded = int(done.stdout.split(" embedded")[0].split()[-1])
    assert already >= written and already + embedded == sample_set.images
    with Database(url) as db, db.engine.connect() as conn:
        counts = conn.execute(sa.text("SELECT image_id, count(*) FROM embeddings GROUP BY image_id")).all()
        assert len(counts) == sample_set.images and all(n == 1 for _, n in counts)


@pytest.mark.slow
def test_ctrl_c_during_run_keeps_finished_work_and_a_rerun_finishes(many_samples, tmp_path):
    sample_set = many_samples
    url = f"sqlite:///{tmp_path}/interrupt.db"
    # The near rule: what is tested is the interrupt and the resume, not dedupe (the verified
    # rule's geometry on these 200 images would be most of this test's time).
    proc = subprocess.Popen(LOOKALIKE + ["--db", url, "run", str(sample_set.manifest), "--rule", "near"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = sa.create_engine(url)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:   # wait until featurize has committed some
        time.sleep(0.2)
        try:
            with engine.connect() as conn:
                if conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar():
                    break
        except sa.exc.OperationalError:
            pass   # tables not there yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    engine.dispose()
    assert proc.returncode == 130, err
    assert "[hash]" in out and "[featurize]" in out and "[split]" not in out and "interrupted" in out

    rerun = subprocess.run(LOOKALIKE + ["--db", url, "run", "--rule", "near"], capture_output=True, text=True,
                           check=True)
    assert "hash: 0 hashed" in rerun.stdout and "[rank]" in rerun.stdout
    with Database(url) as db, db.engine.connect() as conn:
        counts = conn.execute(sa.text("SELECT image_id, count(*) FROM embeddings GROUP BY image_id")).all()
        assert len(counts) == sample_set.images and all(n == 1 for _, n in counts)
        outcomes = conn.execute(sa.select(runs.c.step, runs.c.outcome).where(runs.c.step.in_(["run", "featurize"]))
                                .order_by(runs.c.id)).all()
        assert [tuple(r) for r in outcomes] == [("featurize", "interrupted"), ("run", "interrupted"),
                                                ("featurize", "ok"), ("run", "ok")]


def test_status_shows_how_far_the_pipeline_got(sqlite_run, sample_set):
    db, _ = sqlite_run
    done = subprocess.run(LOOKALIKE + ["--db", str(db.url), "status"], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert f"hashed:   {sample_set.images} of {sample_set.images} ok images" in lines
    assert f"embedded: {sample_set.images} of {sample_set.images} ok images (efficientnet-lite0)" in lines
    with db.engine.connect() as conn:
        parts = dict(conn.execute(sa.select(splits.c.split, sa.func.count()).group_by(splits.c.split)).all())
    assert f"split:    {parts['train']} train, {parts['test']} test" in lines
    steps = [line.split()[0] for line in lines[lines.index("last run of each step:") + 1:]]
    assert steps == ["load", "hash", "featurize", "dedupe", "split", "train", "fit", "evaluate", "rank", "run"]
