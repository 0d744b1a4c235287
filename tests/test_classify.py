"""The train step on synthetic embeddings, SQLite and PostgreSQL: model choice, safe storage, scores."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import skops.io
import sqlalchemy as sa
from skops.io.exceptions import UntrustedTypesFoundException

from lookalike.classify import load_classifier, train_classifier
from lookalike.db import (Database, embeddings, feature_models, images, models, now, scores, vector_bytes,
                          vector_from_bytes)
from lookalike.split import split_images

FEATURE_MODEL = "efficientnet-lite0"


def add_feature_model(db: Database, dim: int) -> int:
    with db.begin() as conn:
        return conn.execute(sa.insert(feature_models).values(
            name=FEATURE_MODEL, weights_sha256="0" * 64, dim=dim, input_size=224, preprocessing="synthetic",
            created_at=now()).returning(feature_models.c.id)).scalar_one()


def add_images(db: Database, feature_model_id: int, labels: list[str | None], vectors: np.ndarray,
               tag: str = "") -> list[int]:
    """Image rows with made-up hashes and the given (unit-normalised) embeddings; returns their ids."""
    ids = []
    with db.begin() as conn:
        for i, (label, vector) in enumerate(zip(labels, vectors)):
            sha = hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()
            image_id = conn.execute(sa.insert(images).values(
                sha256=sha, label=label, source=f"synthetic/{tag}/{i}", byte_size=100, status="ok",
                loaded_at=now()).returning(images.c.id)).scalar_one()
            conn.execute(sa.insert(embeddings).values(
                image_id=image_id, model_id=feature_model_id, vector=vector_bytes(vector / np.linalg.norm(vector))))
            ids.append(image_id)
    return ids


def clusters(per_label: int, n_labels: int, dim: int, separation: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Gaussian clusters of unit spread, one per label; the centres' coordinates have spread ``separation``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, dim)) * separation
    labels = [f"label{k}" for k in range(n_labels) for _ in range(per_label)]
    vectors = np.repeat(centres, per_label, axis=0) + rng.normal(size=(per_label * n_labels, dim))
    return labels, vectors


def stored_scores(db: Database, model_id: int) -> dict[int, tuple[str, np.ndarray]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(scores.c.image_id, scores.c.predicted, scores.c.vector)
                            .where(scores.c.model_id == model_id)).all()
    return {image_id: (predicted, vector_from_bytes(vector)) for image_id, predicted, vector in rows}


def test_separable_clusters_train_store_and_score_every_embedded_image(db):
    feature_model_id = add_feature_model(db, 32)
    labels, vectors = clusters(30, 3, 32, separation=8.0, seed=0)
    labelled = add_images(db, feature_model_id, labels, vectors, tag="a")
    # Embedded but outside the split: no label. They still get scores.
    unlabelled = add_images(db, feature_model_id, [None] * 4, np.random.default_rng(1).normal(size=(4, 32)), tag="b")
    split_images(db)

    summary = train_classifier(db, feature_model=FEATURE_MODEL)
    assert summary.classes == ("label0", "label1", "label2")
    assert (summary.train_images, summary.test_images) == (66, 24)
    assert summary.test_accuracy == 1.0 and summary.train_accuracy == 1.0
    # Both candidates are perfect here: the tie goes to the simpler logistic regression.
    assert summary.cv_accuracy == {"logreg": 1.0, "mlp": 1.0} and summary.kind == "logreg"
    assert summary.confusion == ((8, 0, 0), (0, 8, 0), (0, 0, 8))
    assert summary.scored == 94 and not summary.reused
    text = "\n".join(summary.lines())
    assert "logreg" in text and "test 1.000 on 24 test images" in text

    estimator, classes, row = load_classifier(db)
    assert row.id == summary.model_id and classes == list(summary.classes)
    assert row.kind == "logreg" and row.test_accuracy == 1.0
    assert json.loads(row.confusion) == [[8, 0, 0], [0, 8, 0], [0, 0, 8]]
    assert json.loads(row.params)["cv_folds"] == 5

    written = stored_scores(db, summary.model_id)
    assert set(written) == set(labelled) | set(unlabelled)
    with db.engine.connect() as conn:
        matrix = {i: vector_from_bytes(v) for i, v in conn.execute(
            sa.select(embeddings.c.image_id, embeddings.c.vector)).all()}
    for image_id, (predicted, probabilities) in written.items():
        assert probabilities.dtype == np.float32 and probabilities.shape == (3,)
        assert abs(float(probabilities.sum()) - 1.0) < 1e-5
        assert predicted == classes[int(probabilities.argmax())]
        expected = estimator.predict_proba(matrix[image_id][None, :])[0]
        assert np.allclose(probabilities, expected, atol=1e-6)
    for image_id, label in zip(labelled, labels):
        assert written[image_id][0] == label


def test_random_labels_give_chance_accuracy(db):
    feature_model_id = add_feature_model(db, 32)
    rng = np.random.default_rng(5)
    labels = [f"label{k}" for k in rng.integers(0, 3, size=240)]
    add_images(db, feature_model_id, labels, rng.normal(size=(240, 32)))
    split_images(db)
    summary = train_classifier(db, feature_model=FEATURE_MODEL, seed=5)
    # About 60 test images, chance is 1/3: 0.6 is over four standard deviations above it.
    assert summary.test_images >= 55
    assert summary.test_accuracy < 0.6
    assert max(summary.cv_accuracy.values()) < 0.6


def test_mlp_is_chosen_where_classes_are_not_linearly_separable(db):
    # XOR in the first two coordinates: no line separates the classes, one hidden layer does.
    feature_model_id = add_feature_model(db, 8)
    rng = np.random.default_rng(2)
    corners = rng.choice([-1.0, 1.0], size=(160, 2))
    vectors = np.hstack([corners * 3 + rng.normal(scale=0.3, size=(160, 2)), rng.normal(scale=0.3, size=(160, 6))])
    labels = ["same" if a == b else "different" for a, b in corners]
    add_images(db, feature_model_id, labels, vectors)
    split_images(db)
    summary = train_classifier(db, feature_model=FEATURE_MODEL, cv_folds=3)
    assert summary.kind == "mlp" and summary.cv_folds == 3
    assert summary.cv_accuracy["logreg"] < 0.75 < 0.95 < summary.cv_accuracy["mlp"]
    assert summary.test_accuracy > 0.9
    estimator, _, _ = load_classifier(db, summary.model_id)
    assert type(estimator[-1]).__name__ == "MLPClassifier"


def test_rerun_reuses_the_model_and_scores_only_new_images(db):
    feature_model_id = add_feature_model(db, 16)
    labels, vectors = clusters(12, 2, 16, separation=6.0, seed=3)
    add_images(db, feature_model_id, labels, vectors)
    split_images(db)
    first = train_classifier(db, feature_model=FEATURE_MODEL)
    again = train_classifier(db, feature_model=FEATURE_MODEL)
    assert again.reused and again.model_id == first.model_id and again.scored == 0
    assert again.test_accuracy == first.test_accuracy
    (new_image,) = add_images(db, feature_model_id, [None], np.ones((1, 16)), tag="new")
    later = train_classifier(db, feature_model=FEATURE_MODEL)
    assert later.reused and later.scored == 1 and new_image in stored_scores(db, first.model_id)
    # Another seed is another model; the first one's scores stay.
    other = train_classifier(db, feature_model=FEATURE_MODEL, seed=1)
    assert not other.reused and other.model_id != first.model_id
    assert len(stored_scores(db, other.model_id)) == len(stored_scores(db, first.model_id)) == 25
    # Back to seed 0: trained again (so the latest model is the one asked for), identical to the first.
    back = train_classifier(db, feature_model=FEATURE_MODEL)
    assert not back.reused and back.model_id not in (first.model_id, other.model_id)
    assert load_classifier(db)[2].id == back.model_id
    first_scores, back_scores = stored_scores(db, first.model_id), stored_scores(db, back.model_id)
    assert first_scores.keys() == back_scores.keys()
    for image_id, (predicted, vector) in first_scores.items():
        assert back_scores[image_id][0] == predicted and np.array_equal(back_scores[image_id][1], vector)
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(models)).scalar_one() == 3


class NotAClassifier:
    """A type skops does not trust: a stored model holding it must not load."""

    def __init__(self):
        self.payload = [1, 2, 3]


class WritesAFile:
    """Unpickling this would create a file: proof that loading never unpickles."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_models_are_skops_and_untrusted_or_pickled_bytes_do_not_load(db, tmp_path):
    feature_model_id = add_feature_model(db, 16)
    labels, vectors = clusters(10, 2, 16, separation=6.0, seed=4)
    add_images(db, feature_model_id, labels, vectors)
    split_images(db)
    summary = train_classifier(db, feature_model=FEATURE_MODEL)
    with db.engine.connect() as conn:
        stored = conn.execute(sa.select(models.c.model).where(models.c.id == summary.model_id)).scalar_one()
    assert "schema.json" in zipfile.ZipFile(BytesIO(stored)).namelist()
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(stored)

    marker = tmp_path / "unpickled"
    bad_models = {"untrusted": skops.io.dumps(NotAClassifier()), "pickle": pickle.dumps(WritesAFile(marker))}
    with db.begin() as conn:
        bad_ids = {name: conn.execute(sa.insert(models).values(
            name=name, kind="logreg", feature_model_id=feature_model_id, classes='["label0", "label1"]',
            params="{}", model=data, created_at=now()).returning(models.c.id)).scalar_one()
            for name, data in bad_models.items()}
    with pytest.raises(UntrustedTypesFoundException, match="NotAClassifier"):
        load_classifier(db, bad_ids["untrusted"])
    with pytest.raises(zipfile.BadZipFile):
        load_classifier(db)  # the latest: the pickle
    assert not marker.exists()
    with pytest.raises(LookupError, match="no classifier with id"):
        load_classifier(db, 10_000)


def test_clear_errors_before_split_featurize_or_with_one_label(db):
    with pytest.raises(LookupError, match="featurize"):
        train_classifier(db, feature_model=FEATURE_MODEL)
    feature_model_id = add_feature_model(db, 8)
    rng = np.random.default_rng(0)
    add_images(db, feature_model_id, ["only"] * 6, rng.normal(size=(6, 8)))
    with pytest.raises(LookupError, match="lookalike split"):
        train_classifier(db, feature_model=FEATURE_MODEL)
    split_images(db)
    with pytest.raises(ValueError, match="at least 2 labels"):
        train_classifier(db, feature_model=FEATURE_MODEL)
    with pytest.raises(LookupError, match="featurize"):   # a known backbone that embedded nothing
        train_classifier(db, feature_model="efficientnet-lite0-texture")
    with pytest.raises(ValueError, match="unknown backbone 'another-backbone'"):
        train_classifier(db, feature_model="another-backbone")
    with db.begin() as conn:  # a feature model that embedded nothing yet
        conn.execute(sa.insert(feature_models).values(name="empty", weights_sha256="1" * 64, dim=8, input_size=224,
                                                      preprocessing="synthetic", created_at=now()))
    with pytest.raises(LookupError, match="no embeddings for the train split"):
        train_classifier(db, feature_model="empty")
    with pytest.raises(LookupError, match="no trained classifier"):
        load_classifier(db)
