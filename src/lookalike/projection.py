"""A fitted similarity space as stored: its parameters, how it projects embeddings, and reading it back.

The fit step (:mod:`lookalike.spaces`) makes spaces; the persistent index (:mod:`lookalike.index`)
and the searches read them through this module, so neither depends on the other to do so.

A part is ``(x - mean) @ matrix`` (``linear``) or ``softmax(x @ matrix + bias)``
(``softmax``), scaled to unit length and weighted; the joined vector is unit
length again, so cosine distance applies in every space.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from .db import similarity_spaces
from .errors import Precondition

FITTED = ("pca", "learned")             # spaces the fit step makes


@dataclass(frozen=True)
class Part:
    """One block of a space's vector: ``linear`` (x - offset) @ matrix, or ``softmax`` of x @ matrix + offset."""

    kind: str
    offset: np.ndarray
    matrix: np.ndarray
    weight: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return _unit((x - self.offset) @ self.matrix)
        logits = x @ self.matrix + self.offset
        if logits.shape[1] == 1:   # two classes: one logit, as scikit-learn's binary LDA gives it
            logits = np.hstack([np.zeros_like(logits), logits])
        logits -= logits.max(axis=1, keepdims=True)
        odds = np.exp(logits)
        return _unit(odds / odds.sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Space:
    """A fitted space: its row id, the parts its vectors are made of, and their stored checksum."""

    id: int
    name: str
    feature_model_id: int
    parts: tuple[Part, ...]
    checksum: str

    @property
    def dim(self) -> int:
        """The length of this space's vectors."""
        return sum(2 if part.kind == "softmax" and part.matrix.shape[1] == 1 else part.matrix.shape[1]
                   for part in self.parts)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Embeddings (n, d) to this space's unit vectors (n, k), float32."""
        x = np.asarray(vectors, dtype=np.float64).reshape(-1, self.parts[0].matrix.shape[0])
        return _unit(np.hstack([part.weight * part.apply(x) for part in self.parts])).astype(np.float32)


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def pack_parts(parts: tuple[Part, ...]) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for i, part in enumerate(parts):
        arrays.update({f"kind{i}": np.array(part.kind), f"offset{i}": part.offset, f"matrix{i}": part.matrix,
                       f"weight{i}": np.float64(part.weight)})
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_parts(data: bytes) -> tuple[Part, ...]:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return tuple(Part(str(arrays[f"kind{i}"]), arrays[f"offset{i}"], arrays[f"matrix{i}"],
                          float(arrays[f"weight{i}"])) for i in range(len(arrays.files) // 4))


# ---------------------------------------------------------------- reading spaces

def fitted_id(conn, name: str, feature_model_id: int) -> int | None:
    """The row id of the fitted space ``name`` (a refit makes a new one), without reading its parameters."""
    return conn.execute(sa.select(sa.func.max(similarity_spaces.c.id)).where(
        similarity_spaces.c.name == name, similarity_spaces.c.feature_model_id == feature_model_id)).scalar()


def load_space(conn, name: str, feature_model_id: int) -> Space | None:
    """The fitted space ``name`` on this feature model, its checksum verified; None when not fitted."""
    row = conn.execute(sa.select(similarity_spaces).where(
        similarity_spaces.c.name == name, similarity_spaces.c.feature_model_id == feature_model_id)
        .order_by(similarity_spaces.c.id.desc())).first()
    if row is None:
        return None
    if hashlib.sha256(row.params).hexdigest() != row.checksum:
        raise Precondition(f"the stored {name} space's parameters fail their checksum: run `lookalike fit` again")
    return Space(row.id, name, feature_model_id, unpack_parts(row.params), row.checksum)


def fitted_spaces(conn, feature_model_id: int) -> list[Space]:
    return [space for name in FITTED if (space := load_space(conn, name, feature_model_id)) is not None]
