"""The evaluate step on synthetic embeddings, SQLite and PostgreSQL: the ranking protocol and mAP/recall@10."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.classify import train_classifier
from lookalike.db import (Database, embeddings, evaluation_pairs, evaluation_results, evaluations, feature_models,
                          images, now, runs, splits, vector_bytes)
from lookalike.evaluate import TOP_K, evaluate_model
from lookalike.split import split_images

FEATURE_MODEL = "efficientnet-lite0"


def add_collection(db: Database, labels: list[str], vectors: np.ndarray, *, reverse: bool = False) -> dict[str, int]:
    """A feature model, image rows with made-up hashes, their unit-normalised embeddings; returns sha256 -> id."""
    order = range(len(labels) - 1, -1, -1) if reverse else range(len(labels))
    ids = {}
    with db.begin() as conn:
        feature_model_id = conn.execute(sa.insert(feature_models).values(
            name=FEATURE_MODEL, weights_sha256="0" * 64, dim=vectors.shape[1], input_size=224,
            preprocessing="synthetic", created_at=now()).returning(feature_models.c.id)).scalar_one()
        for i in order:
            sha = hashlib.sha256(f"image {i}".encode()).hexdigest()
            ids[sha] = conn.execute(sa.insert(images).values(
                sha256=sha, label=labels[i], source=f"synthetic/{i}", byte_size=100, status="ok",
                loaded_at=now()).returning(images.c.id)).scalar_one()
            norm = np.linalg.norm(vectors[i])
            conn.execute(sa.insert(embeddings).values(image_id=ids[sha], model_id=feature_model_id,
                                                      vector=vector_bytes(vectors[i] / (norm if norm else 1))))
    return ids


def clusters(per_label: int, n_labels: int, dim: int, *, separation: float, noise: float = 1.0,
             seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Gaussian clusters, one per label: centre coordinates spread ``separation``, points spread ``noise``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, dim)) * separation
    labels = [f"label{k}" for k in range(n_labels) for _ in range(per_label)]
    return labels, np.repeat(centres, per_label, axis=0) + rng.normal(size=(per_label * n_labels, dim)) * noise


def pairs_by_sha(db: Database, evaluation_id: int) -> list[tuple[str, str, bool]]:
    query, candidate = images.alias("q"), images.alias("c")
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(query.c.sha256, candidate.c.sha256, evaluation_pairs.c.is_positive)
            .join(query, query.c.id == evaluation_pairs.c.query_id)
            .join(candidate, candidate.c.id == evaluation_pairs.c.candidate_id)
            .where(evaluation_pairs.c.evaluation_id == evaluation_id)).all()
    return sorted(tuple(r) for r in rows)


def stored_results(db: Database, evaluation_id: int) -> dict[tuple[str, str, str], float]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(evaluation_results.c.space, evaluation_results.c.metric,
                                      evaluation_results.c.measure, evaluation_results.c.value)
                            .where(evaluation_results.c.evaluation_id == evaluation_id)).all()
    return {(space, metric, measure): value for space, metric, measure, value in rows}


def test_separated_clusters_rank_every_positive_first(db, tmp_path):
    labels, vectors = clusters(60, 3, 32, separation=5.0, noise=0.2)
    add_collection(db, labels, vectors)
    split_images(db)  # 15 test images per label
    summary = evaluate_model(db, queries_per_label=5, negatives_per_query=10, plot=tmp_path / "plots" / "top-k.png")

    assert (summary.queries, summary.pairs, summary.test_images, summary.labels) == (15, 15 * 11, 45, 3)
    assert summary.model_id is None
    assert any("scores space skipped" in note for note in summary.notes)
    for metric in ("l2", "cosine"):
        for k in TOP_K:
            assert summary.value("embeddings", metric, f"top{k}") == 1.0
        assert summary.value("embeddings", metric, "mean_rank") == 1.0
        assert summary.value("embeddings", metric, "median_rank") == 1.0
        assert summary.value("embeddings", metric, "map@10") == 1.0
        # 14 relevant images per query, 10 retrieved: recall@10 is the fraction found, 10/14.
        assert summary.value("embeddings", metric, "recall@10") == pytest.approx(10 / 14)
    assert stored_results(db, summary.evaluation_id) == {row[:3]: row[3] for row in summary.results}
    text = "\n".join(summary.lines())
    assert "embeddings l2" in text and "15 queries over 3 labels, 165 pairs" in text

    with db.engine.connect() as conn:
        label_of = dict(conn.execute(sa.select(images.c.id, images.c.label)).all())
        split_of = dict(conn.execute(sa.select(splits.c.image_id, splits.c.split)).all())
        pairs = conn.execute(sa.select(evaluation_pairs)).all()
        params = json.loads(conn.execute(sa.select(evaluations.c.params)).scalar_one())
    assert params["inputs"]["queries_per_label"] == 5 and params["inputs"]["split"]["test_ratio"] == 0.25
    queries = {p.query_id for p in pairs}
    assert len(queries) == 15 and all(split_of[q] == "test" for q in queries)
    for query in queries:
        mine = [p for p in pairs if p.query_id == query]
        (positive,) = [p.candidate_id for p in mine if p.is_positive]
        assert label_of[positive] == label_of[query] and positive != query and split_of[positive] == "test"
        negatives = [p.candidate_id for p in mine if not p.is_positive]
        assert len(negatives) == 10 and all(label_of[n] != label_of[query] for n in negatives)

    png = tmp_path / "plots" / "top-k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == (700, 450)
        assert len(image.convert("RGB").getcolors(1_000_000)) > 10  # something was drawn


def test_random_embeddings_rank_the_positive_by_chance(db):
    rng = np.random.default_rng(11)
    labels = [f"label{k}" for k in range(3) for _ in range(200)]
    add_collection(db, labels, rng.normal(size=(600, 32)))
    split_images(db)  # 50 test images per label: 100 of other labels, no top-up
    summary = evaluate_model(db, queries_per_label=20, negatives_per_query=100)
    assert (summary.queries, summary.pairs) == (60, 60 * 101)
    assert [note for note in summary.notes if "scores space skipped" not in note
            and "no similarity space fitted" not in note] == []  # no top-up
    # The positive's rank is uniform on 1..101: P(top1) = 1/101, mean 51, sd of the mean of 60 ranks ≈ 3.8.
    for metric in ("l2", "cosine"):
        assert summary.value("embeddings", metric, "top1") <= 0.1
        assert summary.value("embeddings", metric, "top10") <= 0.3
        assert 36 <= summary.value("embeddings", metric, "mean_rank") <= 66
        assert summary.value("embeddings", metric, "map@10") < 0.6


def test_ties_count_against_the_positive(db):
    # Every embedding identical: every distance ties, so every positive ranks last.
    labels = [f"label{k}" for k in range(2) for _ in range(24)]
    add_collection(db, labels, np.ones((48, 8)))
    split_images(db)  # 6 test images per label
    summary = evaluate_model(db, queries_per_label=3, negatives_per_query=6)
    for metric in ("l2", "cosine"):
        assert summary.value("embeddings", metric, "mean_rank") == 7.0
        assert summary.value("embeddings", metric, "top5") == 0.0
        assert summary.value("embeddings", metric, "top8") == 1.0
        # Relevant images also lose ties in retrieval: the 6 others go first, 4 of 5 relevant follow.
        assert summary.value("embeddings", metric, "map@10") == pytest.approx(
            sum((j + 1) / (6 + j + 1) for j in range(4)) / 5)
        assert summary.value("embeddings", metric, "recall@10") == pytest.approx(4 / 5)


def test_hand_checked_ranks_and_average_precision(db):
    # Four test images on the unit circle (degrees): A1 0, A2 12, B1 5, B2 90; one train image per label.
    angles = {"A1": 0, "A2": 12, "B1": 5, "B2": 90, "A-train": 180, "B-train": 270}
    names = list(angles)
    vectors = np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in angles.values()])
    ids = add_collection(db, [name[0] for name in names], vectors)
    id_of = dict(zip(names, ids.values()))
    with db.begin() as conn:
        conn.execute(sa.insert(splits), [
            {"image_id": id_of[name], "random": 0.5, "seed": 0, "test_ratio": 0.5,
             "split": "train" if name.endswith("train") else "test"} for name in names])
    summary = evaluate_model(db, queries_per_label=5, negatives_per_query=2)
    # Positive ranks: A1 2 (B1 nearer), A2 2 (B1), B1 3 (A1, A2), B2 2 (A2).
    # Retrieval, relevant rank: A1 2, A2 2, B1 3, B2 2 -> AP 1/2, 1/2, 1/3, 1/2.
    for metric in ("l2", "cosine"):
        assert summary.value("embeddings", metric, "mean_rank") == 2.25
        assert summary.value("embeddings", metric, "median_rank") == 2.0
        assert (summary.value("embeddings", metric, "top1"), summary.value("embeddings", metric, "top2")) == (0, 0.75)
        assert summary.value("embeddings", metric, "map@10") == pytest.approx((0.5 + 0.5 + 1 / 3 + 0.5) / 4)
        assert summary.value("embeddings", metric, "recall@10") == 1.0

    # Three negatives asked, two test images of the other label: topped up with the train one.
    topped = evaluate_model(db, queries_per_label=5, negatives_per_query=3)
    assert topped.pairs == 4 * 4 and any("topped up from the train split" in n for n in topped.notes)
    short = evaluate_model(db, queries_per_label=5, negatives_per_query=4)
    assert short.pairs == 4 * 4 and any("fewer than 4 negatives" in n for n in short.notes)


def test_same_seed_same_pairs_and_results_in_any_database(db, tmp_path):
    labels, vectors = clusters(40, 3, 16, separation=0.5, seed=3)
    add_collection(db, labels, vectors)
    split_images(db)
    train_classifier(db, feature_model=FEATURE_MODEL)
    first = evaluate_model(db, queries_per_label=6, negatives_per_query=12, seed=4)
    first_pairs = pairs_by_sha(db, first.evaluation_id)
    assert first.model_id is not None and first.notes == (
        "no similarity space fitted on efficientnet-lite0 embeddings: run `lookalike fit`",)
    assert {space for space, *_ in first.results} == {"embeddings", "scores"}

    # Same inputs: the evaluation is replaced, not added; the same pairs and values come back.
    again = evaluate_model(db, queries_per_label=6, negatives_per_query=12, seed=4)
    assert again.results == first.results
    assert pairs_by_sha(db, again.evaluation_id) == first_pairs
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(evaluations)).scalar_one() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(evaluation_pairs)).scalar_one() == 18 * 13

    # Another database, images inserted in the opposite order (other ids): identical draws and values.
    with Database(f"sqlite:///{tmp_path}/other.db", tmp_path / "other-store") as other:
        add_collection(other, labels, vectors, reverse=True)
        split_images(other)
        train_classifier(other, feature_model=FEATURE_MODEL)
        mirrored = evaluate_model(other, queries_per_label=6, negatives_per_query=12, seed=4)
        assert pairs_by_sha(other, mirrored.evaluation_id) == first_pairs
    assert mirrored.results == first.results

    other_seed = evaluate_model(db, queries_per_label=6, negatives_per_query=12, seed=5)
    assert pairs_by_sha(db, other_seed.evaluation_id) != first_pairs
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(evaluations)).scalar_one() == 2


def test_clear_errors_and_a_failed_plot_keeps_earlier_results(db, tmp_path):
    with pytest.raises(LookupError, match="featurize"):
        evaluate_model(db)
    labels, vectors = clusters(8, 2, 8, separation=3.0)
    add_collection(db, labels, vectors)
    with pytest.raises(LookupError, match="lookalike split"):
        evaluate_model(db)
    split_images(db)
    kept = evaluate_model(db, queries_per_label=2, negatives_per_query=2)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError):
        evaluate_model(db, queries_per_label=2, negatives_per_query=2, seed=9, plot=tmp_path / "a-file" / "x.png")
    with db.engine.connect() as conn:
        assert list(conn.execute(sa.select(evaluations.c.id)).scalars()) == [kept.evaluation_id]
        outcomes = conn.execute(sa.select(runs.c.outcome).where(runs.c.step == "evaluate").order_by(runs.c.id))
        assert list(outcomes.scalars()) == ["failed", "failed", "ok", "failed"]
    with pytest.raises(ValueError):
        evaluate_model(db, queries_per_label=0)
