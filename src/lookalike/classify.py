"""Train step: a classifier on the embeddings of the train split, and class scores for every image.

Two candidates, as in the original solution's choice of a small neural network:
a standardised logistic regression and a one-hidden-layer MLP. Stratified
cross-validation on the train split picks one (a tie goes to the simpler
logistic regression); it is refitted on the whole train split, scored on the
test split, and stored in ``models`` in the skops format — never a pickle, and
loaded back only with an explicit list of trusted types. Class probabilities
(float32, in ``models.classes`` order) and the predicted label are written to
``scores`` for every image that has an embedding for the feature model.

Training is deterministic for a seed, so a re-run over the same split, labels
and embeddings reuses the latest model when it was trained from exactly those
inputs, and only scores images embedded since.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import skops.io
import sqlalchemy as sa
import sklearn
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sqlalchemy.engine import Connection, Row

from .config import DEFAULT_BACKBONE
from .db import (Database, embeddings, images, latest_feature_model, models, now, recorded_run, scores, splits,
                 vector_bytes, vector_from_bytes)
from .errors import BadInput, Precondition
from .steps import default

# Types a stored classifier may hold beyond those skops trusts by default (scikit-learn
# estimators, numpy arrays); anything else in a stored model refuses to load.
TRUSTED_TYPES = ["sklearn.neural_network._stochastic_optimizers.AdamOptimizer"]
SCORE_PAGE = 2048  # embeddings scored per query page: memory stays flat on large collections
CANDIDATES = ("logreg", "mlp")  # simplest first: it wins ties


@dataclass(frozen=True)
class TrainSummary:
    model_id: int
    kind: str                          # the chosen candidate: logreg | mlp
    feature_model: str
    classes: tuple[str, ...]
    train_images: int
    test_images: int
    cv_folds: int                      # folds used (0: too few images per class to cross-validate)
    cv_accuracy: dict[str, float]      # candidate -> mean cross-validated accuracy
    train_accuracy: float
    test_accuracy: float | None        # None without test images
    confusion: tuple[tuple[int, ...], ...]  # test split, rows = true class, in classes order
    scored: int                        # images given scores by this run
    reused: bool                       # an identical model was already stored

    def lines(self) -> list[str]:
        verb = "reused" if self.reused else "trained"
        out = [f"train ({self.feature_model}): {verb} model {self.model_id} ({self.kind}) on "
               f"{self.train_images} train images, {len(self.classes)} classes"]
        if self.cv_accuracy:
            cv = ", ".join(f"{kind} {acc:.3f}" for kind, acc in self.cv_accuracy.items())
            out.append(f"  cross-validation ({self.cv_folds} folds): {cv}")
        else:
            out.append("  no cross-validation (a class has fewer than 2 train images): logistic regression")
        test = f"{self.test_accuracy:.3f} on {self.test_images} test images" if self.test_accuracy is not None \
            else "no test images"
        out.append(f"  accuracy: train {self.train_accuracy:.3f}, test {test}")
        if self.test_accuracy is not None:
            width = max(8, *(len(c) for c in self.classes))
            out.append("  confusion (rows true, columns predicted):")
            out.append("  " + " " * width + "".join(f" {c[:width]:>{width}}" for c in self.classes))
            out += ["  " + f"{c:<{width}}" + "".join(f" {n:>{width}}" for n in row)
                    for c, row in zip(self.classes, self.confusion)]
        out.append(f"  scores written for {self.scored} images")
        return out


def make_candidate(kind: str, seed: int) -> Pipeline:
    """A fresh, unfitted candidate classifier (both standardise the embeddings first)."""
    if kind == "logreg":
        classifier = LogisticRegression(C=1.0, max_iter=2000)
    elif kind == "mlp":
        classifier = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=300, random_state=seed)
    else:
        raise BadInput(f"unknown classifier kind {kind!r}; expected one of {CANDIDATES}")
    return make_pipeline(StandardScaler(), classifier)


def load_classifier(db: Database, model_id: int | None = None) -> tuple[BaseEstimator, list[str], Row]:
    """(estimator, classes, models row) of a stored classifier; the latest when ``model_id`` is None.

    The bytes are read with skops and only the types skops trusts by default plus
    :data:`TRUSTED_TYPES`; anything else raises ``skops.io.exceptions.UntrustedTypesFoundException``.
    """
    with db.engine.connect() as conn:
        query = sa.select(models)
        query = query.where(models.c.id == model_id) if model_id is not None \
            else query.order_by(models.c.id.desc()).limit(1)
        row = conn.execute(query).first()
    if row is None:
        raise Precondition("no trained classifier: run `lookalike train` first" if model_id is None
                           else f"no classifier with id {model_id}")
    estimator = skops.io.loads(row.model, trusted=TRUSTED_TYPES)
    return estimator, json.loads(row.classes), row


def train_classifier(db: Database, *, feature_model: str = DEFAULT_BACKBONE, seed: int = default("train", "seed"),
                     cv_folds: int = default("train", "cv_folds")) -> TrainSummary:
    """Train (or reuse) a classifier on the train split's embeddings; score every embedded image."""
    if cv_folds < 2:
        raise BadInput(f"cv_folds must be at least 2, not {cv_folds}")
    seed = int(seed)
    with recorded_run(db, "train", {"feature_model": feature_model, "seed": seed, "cv_folds": cv_folds}) as counts:
        with db.engine.connect() as conn:
            feature_model_id = latest_feature_model(conn, feature_model)
            data = _split_data(conn, feature_model_id)
        fingerprint = _fingerprint(data, feature_model_id, seed, cv_folds)
        existing = _latest_if_identical(db, fingerprint)
        if existing is not None:
            estimator = load_classifier(db, existing.id)[0]
            with db.begin() as conn:
                scored = _write_scores(conn, feature_model_id, existing.id, estimator)
            summary = _summary(existing, feature_model, scored, reused=True)
        else:
            summary = _train_new(db, data, feature_model, feature_model_id, seed, cv_folds, fingerprint)
        counts.update(model_id=summary.model_id, kind=summary.kind, reused=summary.reused, scored=summary.scored,
                      train_images=summary.train_images, test_images=summary.test_images)
    return summary


@dataclass(frozen=True)
class _SplitData:
    shas: list[str]
    labels: np.ndarray   # str
    is_test: np.ndarray  # bool
    matrix: np.ndarray   # float32 embeddings, one row per image


def _split_data(conn: Connection, feature_model_id: int) -> _SplitData:
    if conn.execute(sa.select(sa.func.count()).select_from(splits)).scalar_one() == 0:
        raise Precondition("no train/test split: run `lookalike split` first")
    rows = conn.execute(
        sa.select(images.c.sha256, images.c.label, splits.c.split, embeddings.c.vector)
        .select_from(splits.join(images, images.c.id == splits.c.image_id)
                     .join(embeddings, sa.and_(embeddings.c.image_id == splits.c.image_id,
                                               embeddings.c.model_id == feature_model_id)))
        .order_by(images.c.sha256)  # independent of ids, so training is the same in any database
    ).all()
    is_test = np.array([r.split == "test" for r in rows], dtype=bool)
    if not rows or is_test.all():
        raise Precondition("no embeddings for the train split: run `lookalike featurize` first")
    labels = np.array([r.label for r in rows], dtype=object)
    if len(set(labels[~is_test])) < 2:
        raise BadInput(f"need at least 2 labels among the train images to train a classifier, "
                       f"found {sorted(set(labels[~is_test]))}")
    matrix = np.stack([vector_from_bytes(r.vector) for r in rows])
    return _SplitData([r.sha256 for r in rows], labels, is_test, matrix)


def _fingerprint(data: _SplitData, feature_model_id: int, seed: int, cv_folds: int) -> str:
    """What decides the trained model: the split with its labels and embeddings, the settings, sklearn."""
    digest = hashlib.sha256(json.dumps([feature_model_id, seed, cv_folds, sklearn.__version__]).encode())
    for sha, label, test in zip(data.shas, data.labels, data.is_test):
        digest.update(f"{sha}\t{label}\t{int(test)}\n".encode())
    digest.update(np.ascontiguousarray(data.matrix, dtype="<f4").tobytes())
    return digest.hexdigest()


def _latest_if_identical(db: Database, fingerprint: str) -> Row | None:
    """The latest model if it was trained from exactly these inputs.

    Only the latest: an older identical model is trained again rather than reused, so
    "the latest model" (what load_classifier, evaluate and search use) is always the last one asked for.
    """
    with db.engine.connect() as conn:
        latest = conn.execute(sa.select(models).order_by(models.c.id.desc()).limit(1)).first()
    return latest if latest is not None and json.loads(latest.params).get("fingerprint") == fingerprint else None


def _train_new(db: Database, data: _SplitData, feature_model: str, feature_model_id: int, seed: int,
               cv_folds: int, fingerprint: str) -> TrainSummary:
    train_x, train_y = data.matrix[~data.is_test], data.labels[~data.is_test]
    test_x, test_y = data.matrix[data.is_test], data.labels[data.is_test]

    # As many folds as the rarest class allows (StratifiedKFold needs one of each per fold).
    folds = min(cv_folds, int(min(np.unique(train_y, return_counts=True)[1])))
    cv_accuracy: dict[str, float] = {}
    if folds >= 2:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for kind in CANDIDATES:
            with _quiet_convergence():
                cv_accuracy[kind] = float(cross_val_score(make_candidate(kind, seed), train_x, train_y,
                                                          cv=splitter).mean())
        kind = max(CANDIDATES, key=lambda k: (cv_accuracy[k], -CANDIDATES.index(k)))
    else:
        folds, kind = 0, "logreg"

    estimator = make_candidate(kind, seed)
    with _quiet_convergence():
        estimator.fit(train_x, train_y)
    classes = [str(c) for c in estimator.classes_]
    train_accuracy = float((estimator.predict(train_x) == train_y).mean())
    test_accuracy, confusion = None, []
    if len(test_y):
        predicted = estimator.predict(test_x)
        test_accuracy = float((predicted == test_y).mean())
        confusion = confusion_matrix(test_y, predicted, labels=classes).tolist()

    params: dict[str, Any] = {
        "fingerprint": fingerprint, "seed": seed, "cv_folds": folds, "cv_accuracy": cv_accuracy,
        "candidates": list(CANDIDATES), "train_images": int(len(train_y)), "test_images": int(len(test_y)),
        "sklearn": sklearn.__version__,
        "estimator": {k: v for k, v in estimator[-1].get_params().items() if isinstance(v, (int, float, str, tuple))},
    }
    with db.begin() as conn:
        model_id = conn.execute(sa.insert(models).values(
            name=f"{feature_model}/{kind}"[:64], kind=kind, feature_model_id=feature_model_id,
            classes=json.dumps(classes), params=json.dumps(params, sort_keys=True), model=skops.io.dumps(estimator),
            cv_accuracy=cv_accuracy.get(kind), train_accuracy=train_accuracy, test_accuracy=test_accuracy,
            confusion=json.dumps(confusion), created_at=now(),
        ).returning(models.c.id)).scalar_one()
        scored = _write_scores(conn, feature_model_id, model_id, estimator)
        row = conn.execute(sa.select(models).where(models.c.id == model_id)).one()
    return _summary(row, feature_model, scored, reused=False)


def _write_scores(conn: Connection, feature_model_id: int, model_id: int, estimator: BaseEstimator) -> int:
    """Score every embedded image that has no score for this model yet, a page at a time."""
    already = sa.select(scores.c.image_id).where(scores.c.model_id == model_id)
    written, after = 0, -1
    while True:
        page = conn.execute(
            sa.select(embeddings.c.image_id, embeddings.c.vector)
            .where(embeddings.c.model_id == feature_model_id, embeddings.c.image_id > after,
                   embeddings.c.image_id.not_in(already))
            .order_by(embeddings.c.image_id).limit(SCORE_PAGE)).all()
        if not page:
            return written
        probabilities = estimator.predict_proba(np.stack([vector_from_bytes(r.vector) for r in page]))
        probabilities = probabilities.astype(np.float32)
        predicted = estimator.classes_[probabilities.argmax(axis=1)]
        conn.execute(sa.insert(scores), [
            {"image_id": r.image_id, "model_id": model_id, "predicted": str(label), "vector": vector_bytes(p)}
            for r, p, label in zip(page, probabilities, predicted)])
        written += len(page)
        after = page[-1].image_id


def _summary(row: Row, feature_model: str, scored: int, *, reused: bool) -> TrainSummary:
    params = json.loads(row.params)
    return TrainSummary(
        model_id=row.id, kind=row.kind, feature_model=feature_model, classes=tuple(json.loads(row.classes)),
        train_images=params["train_images"], test_images=params["test_images"], cv_folds=params["cv_folds"],
        cv_accuracy=params["cv_accuracy"], train_accuracy=row.train_accuracy, test_accuracy=row.test_accuracy,
        confusion=tuple(tuple(r) for r in json.loads(row.confusion or "[]")), scored=scored, reused=reused)


@contextmanager
def _quiet_convergence() -> Iterator[None]:
    """The iteration budgets are deliberate; sklearn's 'did not converge' notes are noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
