"""Fit step: similarity spaces fitted on the collection itself, and which space answers by default.

A space is a map of one feature model's embeddings, fitted once (``lookalike
fit``) and stored like any model: a ``similarity_spaces`` row with its
parameters and their checksum, and every image's vector in ``space_vectors``.
A new image is projected with the stored parameters, never by refitting.

- ``pca`` (label-free): the embeddings centred on the collection's mean and
  projected on its top ``PCA_DIM`` principal axes. Full PCA whitening (axes
  scaled to unit variance, the classic retrieval gain on large collections)
  measured worse here on collections of a few hundred images, where the small
  axes are noise: ``WHITEN_POWER`` scales each axis by variance^-power, 0 = none.
- ``learned`` (label-aware, needs a split with two or more labels): the class
  probabilities of a shrinkage LDA fitted on the train split, joined with the
  ``pca`` part at weight ``1 - LEARNED_WEIGHT``. Where the labels are sure the
  probabilities saturate, so images of one label differ only in the look part:
  a near-copy stays first for its original and nothing ties (the scores space
  alone ties whole labels). LDA's own coordinates instead of its probabilities
  kept the label but put other images of it before a planted copy.

A fitted space's parameters and projection are :mod:`lookalike.projection`; each space
is searched through its own index folder (:mod:`lookalike.index`), which fit builds. The
evaluate step measures every space on the test split and records the best
(:func:`record_default`); ``similar``, ``rank``, the web app and the PL/Python routines
ask :func:`resolve_space` for ``auto``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sqlalchemy as sa

from .config import DEFAULT_BACKBONE
from .db import (Database, embeddings, images, latest_feature_model, load_embeddings, now, recorded_run, settings,
                 similarity_spaces, space_vectors, splits, vector_bytes, vector_from_bytes)
from .answers import AUTO, BUILT_IN, DEFAULT_KEY, auto_space
from .errors import BadInput, Precondition
from .index import refresh_index
from .projection import FITTED, Part, Space, pack_parts, unpack_parts, fitted_id, fitted_spaces
from .steps import default

PCA_DIM = 256
WHITEN_POWER = 0.0
LEARNED_WEIGHT = 0.7   # label part : look part = 0.7 : 0.3; top-1 measured the same from 0.5 to 0.95, and
                       # a same-label pair stays about 0.1 x its look distance apart (readable, no ties)
FIT_SAMPLE = 50_000                      # embeddings the PCA is fitted on, at most (drawn by seed)
CHUNK = 5_000                            # embeddings projected and written per transaction
# When two spaces measure the same, the one that orders results best: the learned space keeps look within
# a label, the scores space ties whole labels.
PREFERENCE = ("learned", "pca", "embeddings", "scores")


# ---------------------------------------------------------------- fitting

@dataclass
class FitSummary:
    feature_model: str
    fitted: dict[str, dict[str, Any]] = field(default_factory=dict)   # space -> what it was fitted on
    skipped: dict[str, str] = field(default_factory=dict)             # space -> why not
    projected: int = 0
    seconds: float = 0.0
    indexes: list[str] = field(default_factory=list)                  # the spaces' index folders, as status says

    def lines(self) -> list[str]:
        out = [f"fit ({self.feature_model}): {', '.join(self.fitted) or 'no space'} fitted, "
               f"{self.projected} vectors projected in {self.seconds:.1f} s"]
        for name, on in self.fitted.items():
            out.append(f"  {name}: {on['dim']} dimensions, fitted on {on['images']} images"
                       + (f" of {on['labels']} labels (train split)" if "labels" in on else ""))
        out += [f"  {name}: not fitted ({why})" for name, why in self.skipped.items()]
        return out + [f"  {line}" for line in self.indexes]


def fit_spaces(db: Database, *, backbone: str = DEFAULT_BACKBONE, seed: int = default("fit", "seed"),
               progress: bool | None = None) -> FitSummary:
    """Fit the ``pca`` space, and the ``learned`` one where a split has two or more labels; project every image.

    Refitting replaces a space's row and vectors in one transaction per space.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    summary = FitSummary(backbone)
    started = time.monotonic()
    with recorded_run(db, "fit", {"backbone": backbone, "seed": seed}) as counts:
        with db.engine.connect() as conn:
            model_id = latest_feature_model(conn, backbone)
            ids = np.array(conn.execute(sa.select(embeddings.c.image_id).where(embeddings.c.model_id == model_id)
                                        .order_by(embeddings.c.image_id)).scalars().all(), dtype=np.int64)
            if len(ids) < 3:
                raise Precondition(f"need embeddings of at least 3 images to fit a space, found {len(ids)}: "
                                   "run `lookalike featurize`")
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(ids, size=min(FIT_SAMPLE, len(ids)), replace=False))
            X = load_embeddings(conn, model_id, sample)[1].astype(np.float64)
            train = conn.execute(
                sa.select(splits.c.image_id, images.c.label).join(images, images.c.id == splits.c.image_id)
                .join(embeddings, sa.and_(embeddings.c.image_id == splits.c.image_id,
                                          embeddings.c.model_id == model_id))
                .where(splits.c.split == "train", images.c.label.is_not(None))
                .order_by(splits.c.image_id)).all()
        pca = _fit_pca(X)
        fitted = {"pca": (pca,)}
        summary.fitted["pca"] = {"images": len(sample), "dim": pca.matrix.shape[1]}
        labels = sorted({row.label for row in train})
        if len(labels) < 2:
            summary.skipped["learned"] = ("no train split with two or more labels" if not train
                                          else f"the train split has one label ({labels[0]})")
        else:
            train = [train[i] for i in np.sort(rng.choice(len(train), size=min(FIT_SAMPLE, len(train)), replace=False))]
            train_ids = np.array([row.image_id for row in train], dtype=np.int64)
            with db.engine.connect() as conn:
                T = load_embeddings(conn, model_id, train_ids)[1].astype(np.float64)
            lda = _fit_lda(T, np.array([row.label for row in train], dtype=object))
            fitted["learned"] = (lda, replace(pca, weight=1.0 - LEARNED_WEIGHT))
            summary.fitted["learned"] = {"images": len(train), "labels": len(labels),
                                         "dim": len(labels) + pca.matrix.shape[1]}
        for name, parts in fitted.items():
            space = _store_space(db, name, model_id, parts, {**summary.fitted[name], "seed": seed})
            summary.projected += project_missing(db, space, progress=progress)
        # Now, not on the first search: the new spaces' index folders (and the old ones removed).
        summary.indexes = [line for status in refresh_index(db, backbone=backbone).spaces for line in status.lines()]
        summary.seconds = time.monotonic() - started
        counts.update(fitted=list(summary.fitted), skipped=summary.skipped, projected=summary.projected)
    return summary


def _fit_pca(X: np.ndarray) -> Part:
    """The top principal axes of ``X``, each scaled by its variance^-WHITEN_POWER."""
    mean = X.mean(axis=0)
    centred = X - mean
    if len(X) > X.shape[1]:   # many images: the covariance's eigenvectors, 4x faster than the SVD at 50,000
        variance, axes = np.linalg.eigh(centred.T @ centred / len(X))
        variance, axes = np.maximum(variance[::-1], 0.0), axes[:, ::-1].T
    else:
        _, singular, axes = np.linalg.svd(centred, full_matrices=False)
        variance = singular ** 2 / len(X)
    keep = min(PCA_DIM, int((variance > variance[0] * 1e-9).sum()))
    return Part("linear", mean, axes[:keep].T / variance[:keep] ** WHITEN_POWER, 1.0)


def _fit_lda(X: np.ndarray, labels: np.ndarray) -> Part:
    """Class probabilities of a shrinkage LDA on the embeddings themselves. Fitted after a PCA it measured far
    worse (sample set top-1 0.35 against 1.00): the shrinkage target assumes the embeddings' own axes."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(X, labels)
    return Part("softmax", lda.intercept_.astype(np.float64), lda.coef_.T.astype(np.float64), LEARNED_WEIGHT)


def _store_space(db: Database, name: str, model_id: int, parts, fitted_on: dict) -> Space:
    params = pack_parts(parts)
    checksum = hashlib.sha256(params).hexdigest()
    with db.begin() as conn:
        conn.execute(sa.delete(similarity_spaces).where(similarity_spaces.c.name == name,
                                                        similarity_spaces.c.feature_model_id == model_id))
        space_id = conn.execute(sa.insert(similarity_spaces).values(
            name=name, feature_model_id=model_id, params=params, checksum=checksum,
            fitted_on=json.dumps(fitted_on, sort_keys=True), created_at=now()).returning(similarity_spaces.c.id)
        ).scalar_one()
    return Space(space_id, name, model_id, unpack_parts(params), checksum)


def project_missing(db: Database, space: Space, *, progress: bool = False) -> int:
    """Project every embedding of the space's model that has no vector in it yet; returns how many.

    Incremental: images featurized after the fit get their vectors from the stored parameters.
    Each chunk commits, so an interrupted run keeps what it wrote.
    """
    from tqdm import tqdm
    stored = space_vectors.alias("stored")
    written, after = 0, 0
    with tqdm(unit="img", desc=f"project ({space.name})", disable=not progress) as bar:
        while True:   # by image id, from where the last chunk ended: one pass over the embeddings in all
            with db.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(embeddings.c.image_id, embeddings.c.vector)
                    .outerjoin(stored, sa.and_(stored.c.space_id == space.id,
                                               stored.c.image_id == embeddings.c.image_id))
                    .where(embeddings.c.model_id == space.feature_model_id, embeddings.c.image_id > after,
                           stored.c.image_id.is_(None))
                    .order_by(embeddings.c.image_id).limit(CHUNK)).all()
            if not rows:
                return written
            after = rows[-1].image_id
            projected = space.project(np.stack([vector_from_bytes(r.vector) for r in rows]))
            with db.begin() as conn:
                conn.execute(db.insert_ignore(space_vectors), [
                    {"space_id": space.id, "image_id": r.image_id, "vector": vector_bytes(v)}
                    for r, v in zip(rows, projected)])
            written += len(rows)
            bar.update(len(rows))


def project_fitted(db: Database, feature_model_id: int) -> int:
    """:func:`project_missing` for every space fitted on this feature model."""
    with db.engine.connect() as conn:
        spaces = fitted_spaces(conn, feature_model_id)
    return sum(project_missing(db, space) for space in spaces)


def record_default(conn, feature_model_id: int, table: dict[str, dict[str, float]], evaluation_id: int) -> str:
    """Record the best space by the ranking protocol's top-1 (cosine) in ``table``; returns its name."""
    def key(name):
        return (-table[name]["top1"], table[name]["mean_rank"], PREFERENCE.index(name))
    # Not the scores space: an image there is its class probabilities, so whole labels tie.
    best = min((name for name in table if name != "scores"), key=key)
    conn.execute(sa.delete(settings).where(settings.c.key == DEFAULT_KEY))
    conn.execute(sa.insert(settings).values(key=DEFAULT_KEY, value=json.dumps({
        "space": best, "feature_model_id": feature_model_id, "evaluation_id": evaluation_id,
        "top1": table[best]["top1"]}, sort_keys=True)))
    return best


def resolve_space(conn, space: str, feature_model_id: int) -> str:
    """``space`` itself, or for ``auto``: the space the latest evaluation found best on these embeddings
    (while it is still fitted), else ``pca`` where fitted (label-free), else the raw ``embeddings``."""
    if space != AUTO:
        if space not in FITTED + BUILT_IN:
            raise BadInput(f"space must be one of {', '.join((AUTO,) + FITTED + BUILT_IN)}, not {space!r}")
        return space
    stored = conn.execute(sa.select(settings.c.value).where(settings.c.key == DEFAULT_KEY)).scalar()
    fitted = {name for name in FITTED if fitted_id(conn, name, feature_model_id) is not None}
    return auto_space(None if stored is None else json.loads(stored), feature_model_id, fitted)
