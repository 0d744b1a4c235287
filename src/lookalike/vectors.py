"""Nearest-neighbour search over image embeddings, exact or approximate, behind one interface.

Embeddings are float32 vectors keyed by non-negative integer image ids. With the
default ``metric="cosine"`` every stored vector and every query is L2-normalised
and the distance reported is the cosine distance ``1 - dot`` (similarity is
``1 - distance``); :class:`ExactIndex` also offers ``metric="l2"``, which keeps the
vectors as given and reports the *squared* Euclidean distance (what faiss reports).

Two kinds share the :class:`VectorIndex` protocol:

* :class:`ExactIndex` (``kind="exact"``) — a NumPy matrix product against every
  stored vector; the default, and the reference the other kind is measured against.
* :class:`IVFIndex` (``kind="ivf"``) — faiss PCA + inverted file + 4-bit product
  quantised codes scanned with SIMD ("fast scan"). It proposes a shortlist that is re-ranked against the
  full-precision vectors, so the distances it reports are exact and only recall
  is approximate (see :func:`recall_at_k`).

``search`` returns ``(ids, distances)``, both ``(n_queries, width)`` with
``width = min(k, number of candidates)`` (candidates: the whole index, or the
``allowed`` subset), best first, never the same id twice in a row. Where a row
has fewer eligible ids than ``width`` (because of ``exclude``) it is padded with
id ``-1`` and distance ``inf``. An empty index gives ``width == 0`` — an empty
result, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from .errors import BadInput


class _Faiss:
    """The faiss module, imported on first use: an exact search (any collection under IVF_THRESHOLD, so
    most by-id queries) never pays its quarter-second import."""

    def __getattr__(self, name: str):
        return getattr(_import_faiss(), name)


@functools.cache
def _import_faiss():
    with warnings.catch_warnings():
        # faiss's SWIG bindings raise DeprecationWarnings about their own types on import.
        warnings.simplefilter("ignore", DeprecationWarning)
        import faiss
    return faiss


faiss = _Faiss()

METRICS = ("cosine", "l2")
KINDS = ("auto", "exact", "ivf")
IVF_THRESHOLD = 200_000   # kind="auto": an IVF index from this many vectors

# Queries are scored in blocks so that one block's distance matrix stays near
# 128 MB whatever the collection size.
_SCORE_BLOCK_ELEMENTS = 1 << 25
# Vectors are normalised, encoded and added in chunks of this many rows to bound
# temporary memory.
_CHUNK_ROWS = 1 << 16

Allowed = np.ndarray | Iterable[int] | None
Exclude = Sequence[Iterable[int]] | None


class VectorIndex(Protocol):
    """What every index offers: k-nearest-neighbour search plus incremental updates."""

    kind: str
    metric: str
    dim: int

    def __len__(self) -> int: ...

    @property
    def ids(self) -> np.ndarray:
        """The ids in the index."""
        ...

    def search(self, queries: np.ndarray, k: int, *, exclude: Exclude = None,
               allowed: Allowed = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ids int64, distances float32)`` of the k nearest, best first.

        ``exclude[q]``: ids never returned for query q (e.g. the query image itself).
        ``allowed``: a boolean mask indexed by id, or a collection of ids; only those
        are returned, and ``width`` rows are still returned when that many exist.
        """
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids, without rebuilding."""
        ...

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (all must be present), without rebuilding."""
        ...


def _as_ids(ids: np.ndarray | Iterable[int]) -> np.ndarray:
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise BadInput("ids must be a one-dimensional array of integers")
    if array.min() < 0:
        raise BadInput("ids must be non-negative (-1 marks 'no result')")
    return array.astype(np.int64, copy=False)


def _as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    matrix = np.asarray(vectors)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise BadInput(f"{what} must have shape (n, {dim}), got {np.shape(vectors)}")
    return matrix


def _unit_rows(matrix: np.ndarray, what: str) -> np.ndarray:
    """``matrix`` as float32 rows of length one; a zero or non-finite row is an error."""
    rows = np.array(matrix, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise BadInput(f"{what} must be finite and non-zero to be normalised")
    rows /= norms[:, None]
    return rows


def _check_k(k: int) -> None:
    if k < 0:
        raise BadInput(f"k must be >= 0, got {k}")


def _top_k(dist: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and values of the ``width`` smallest entries of each row, ascending."""
    if width < dist.shape[1]:
        cols = np.argpartition(dist, width - 1, axis=1)[:, :width]
    else:
        cols = np.broadcast_to(np.arange(dist.shape[1]), dist.shape)
    vals = np.take_along_axis(dist, cols, axis=1)
    order = np.argsort(vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


class ExactIndex:
    """Exact search: one float32 matrix (rows normalised for cosine), scored by matrix product.

    Rows live in a buffer with spare capacity, so ``add`` is amortised O(new rows);
    ``remove`` moves the last row into each freed slot. Queries are scored in blocks
    (at most about 128 MB of distances at a time) and the k best picked with
    ``argpartition``.
    """

    kind = "exact"

    def __init__(self, dim: int, metric: str = "cosine"):
        if metric not in METRICS:
            raise BadInput(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim = dim
        self.metric = metric
        self._size = 0
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._sq_norms = np.zeros(0, dtype=np.float32)  # l2 only: |x|^2 per row
        self._row_of: dict[int, int] = {}

    def __len__(self) -> int:
        return self._size

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, in row order (read-only view)."""
        view = self._ids[:self._size]
        view.flags.writeable = False
        return view

    @property
    def vectors(self) -> np.ndarray:
        """The stored vectors (normalised for cosine), in row order (read-only view)."""
        view = self._vectors[:self._size]
        view.flags.writeable = False
        return view

    def add(self, ids: np.ndarray | Iterable[int], vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) under new, distinct ``ids``; an existing id is an error."""
        ids = _as_ids(ids)
        vectors = _as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(vectors):
            raise BadInput(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise BadInput("ids must be distinct")
        present = [int(i) for i in ids if int(i) in self._row_of]
        if present:
            raise BadInput(f"ids already in the index: {present[:5]}")
        start, end = self._size, self._size + len(ids)
        self._reserve(end)
        for lo in range(0, len(ids), _CHUNK_ROWS):
            chunk = vectors[lo:lo + _CHUNK_ROWS]
            if self.metric == "cosine":
                chunk = _unit_rows(chunk, "vectors")
            elif not np.all(np.isfinite(chunk)):
                raise BadInput("vectors must be finite")
            rows = slice(start + lo, start + lo + len(chunk))
            self._vectors[rows] = chunk
            if self.metric == "l2":
                self._sq_norms[rows] = np.einsum("ij,ij->i", self._vectors[rows], self._vectors[rows])
        self._ids[start:end] = ids
        self._row_of.update(zip(ids.tolist(), range(start, end)))
        self._size = end

    def _reserve(self, rows: int) -> None:
        capacity = len(self._ids)
        if rows <= capacity:
            return
        # The first fill is sized exactly (a bulk load); later growth is by half
        # again, so single adds are amortised.
        new_capacity = rows if capacity == 0 else max(rows, capacity + capacity // 2)
        for name in ("_ids", "_vectors") + (("_sq_norms",) if self.metric == "l2" else ()):
            old = getattr(self, name)
            grown = np.empty((new_capacity,) + old.shape[1:], dtype=old.dtype)
            grown[:self._size] = old[:self._size]
            setattr(self, name, grown)

    def remove(self, ids: np.ndarray | Iterable[int]) -> None:
        """Remove ``ids``; every one must be present (``KeyError`` otherwise)."""
        ids = _as_ids(ids)
        missing = [int(i) for i in ids if int(i) not in self._row_of]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:5]}")
        for image_id in dict.fromkeys(ids.tolist()):
            row = self._row_of.pop(image_id)
            last = self._size - 1
            if row != last:
                moved = int(self._ids[last])
                self._ids[row] = moved
                self._vectors[row] = self._vectors[last]
                if self.metric == "l2":
                    self._sq_norms[row] = self._sq_norms[last]
                self._row_of[moved] = row
            self._size = last

    def rows_of(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Row of each id, ``-1`` for ids not in the index."""
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
        get = self._row_of.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))

    def allowed_rows(self, allowed: np.ndarray | Iterable[int]) -> np.ndarray:
        """Sorted rows that ``allowed`` admits: a boolean mask indexed by id, or ids."""
        if isinstance(allowed, np.ndarray) and allowed.dtype == np.bool_:
            ids = self.ids
            admitted = ids < len(allowed)
            admitted[admitted] = allowed[ids[admitted]]
            return np.flatnonzero(admitted)
        rows = self.rows_of(allowed)
        return np.unique(rows[rows >= 0])

    def prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries as a float32 (nq, dim) matrix, normalised for cosine."""
        queries = _as_matrix(queries, self.dim, "queries")
        if self.metric == "cosine":
            return _unit_rows(queries, "queries")
        return np.ascontiguousarray(queries, dtype=np.float32)

    def excluded_rows(self, exclude: Exclude, n_queries: int) -> list[np.ndarray] | None:
        """Per query, the rows of its excluded ids that are in the index."""
        if exclude is None:
            return None
        if len(exclude) != n_queries:
            raise BadInput(f"exclude has {len(exclude)} entries for {n_queries} queries")
        rows = [self.rows_of(ids) for ids in exclude]
        return [r[r >= 0] for r in rows]

    def search(self, queries: np.ndarray, k: int, *, exclude: Exclude = None,
               allowed: Allowed = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest of each query (see the module docstring for the result shape)."""
        _check_k(k)
        queries = self.prepare_queries(queries)
        candidates = None if allowed is None else self.allowed_rows(allowed)
        return self.search_rows(queries, k, self.excluded_rows(exclude, len(queries)), candidates)

    def search_rows(self, queries: np.ndarray, k: int, excluded: list[np.ndarray] | None,
                    candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Search prepared queries over candidate rows (all rows when None)."""
        if candidates is None:
            matrix = self._vectors[:self._size]
            cand_ids = self._ids[:self._size]
            sq_norms = self._sq_norms[:self._size] if self.metric == "l2" else None
            col_of_row = None
        else:
            matrix = self._vectors[candidates]
            cand_ids = self._ids[candidates]
            sq_norms = self._sq_norms[candidates] if self.metric == "l2" else None
            col_of_row = np.full(self._size, -1, dtype=np.int64)
            col_of_row[candidates] = np.arange(len(candidates))
        n_queries, n_cand = len(queries), len(matrix)
        width = min(k, n_cand)
        ids = np.full((n_queries, width), -1, dtype=np.int64)
        dists = np.full((n_queries, width), np.inf, dtype=np.float32)
        if width == 0:
            return ids, dists
        block = max(1, _SCORE_BLOCK_ELEMENTS // n_cand)
        for lo in range(0, n_queries, block):
            q = queries[lo:lo + block]
            dist = q @ matrix.T
            if self.metric == "cosine":
                np.subtract(1.0, dist, out=dist)
            else:
                dist *= -2.0
                dist += sq_norms
                dist += np.einsum("ij,ij->i", q, q)[:, None]
            if excluded is not None:
                for i, rows in enumerate(excluded[lo:lo + block]):
                    cols = rows if col_of_row is None else col_of_row[rows]
                    dist[i, cols[cols >= 0]] = np.inf
            cols, vals = _top_k(dist, width)
            found = np.isfinite(vals)
            ids[lo:lo + block] = np.where(found, cand_ids[cols], -1)
            # Rounding can put 1 - dot a hair below zero for identical vectors.
            dists[lo:lo + block] = np.where(found, np.maximum(vals, 0.0), np.inf)
        return ids, dists


# IVF candidates re-ranked exactly. The 4-bit codes order candidates loosely; 128 of them keep
# recall@10 at what the coarse probe allows (0.966 at 1M, nprobe 128: the same as 256 of them).
SHORTLIST = 128
MAX_WIDENING = 8   # a filtered search re-ranks up to this many times more (see widened_shortlist)


def widened_shortlist(shortlist: int, widening: float) -> int:
    """Candidates to re-rank when a filter widened the probe ``widening`` times: a larger pool, which
    the 4-bit codes order more loosely. 10 % allowed at 1M: recall@10 0.77 with 128 re-ranked, 0.93 with
    4x, 0.96 with 8x, 0.97 with 16x, at 46, 49 and 52 ms a query (the id selector's scan dominates)."""
    return shortlist * min(MAX_WIDENING, max(1, math.ceil(widening)))


def default_nlist(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 4·sqrt(n), at most n / 39.

    faiss wants about 39 training points per list; 4·sqrt(n) keeps a probe of a
    few dozen lists to a few thousand vectors at a million.
    """
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    return max(1, min(nlist, n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists a query probes: about 3% of them, at least 8 (recall@10 0.96 at 1M, bench/bench_search.py)."""
    return max(8, nlist // 32)


def ivf_sample(n: int, nlist: int, train_size: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted rows (of n) that train an IVF index of ``nlist`` lists: ``train_size`` or 40 per list."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, train_size or 40 * nlist), replace=False))


def train_ivf(sample: np.ndarray, n: int, *, nlist: int | None = None, pca_dim: int = 256,
              seed: int = 0) -> faiss.Index:
    """An empty, trained faiss ``PCA → IVF → PQ fast-scan`` index for ``n`` cosine vectors, trained on unit
    ``sample`` rows.

    The codes are 4 bits per pair of (PCA-reduced) dimensions, scanned with SIMD: at a million
    1280-d vectors a probe of 128 lists takes about 2 ms against 4.4 ms for 8-bit scalar codes,
    and the structure is 52 MiB against 263 MiB (read faster, held privately by every searcher).
    The codes only order the shortlist, which is re-ranked exactly; recall is the coarse probe's.
    A dimension that is not a multiple of 8 (fast scan packs sub-quantisers in pairs) keeps SQ8.
    """
    if n < 1000:
        raise BadInput(f"an IVF index needs at least 1000 vectors to train, got {n}")
    dim = sample.shape[1]
    nlist = nlist or default_nlist(n)
    coded = min(pca_dim, dim)
    codes = f"PQ{coded // 4}x4fs" if coded % 8 == 0 else "SQ8"
    recipe = f"IVF{nlist},{codes}" if pca_dim >= dim else f"PCA{pca_dim},IVF{nlist},{codes}"
    index = faiss.index_factory(dim, recipe, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = max(256, -(-len(sample) // nlist))  # no resampling
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


class IVFIndex:
    """Approximate search: faiss ``PCA → IVF → PQ fast-scan`` shortlist, re-ranked exactly.

    The full-precision vectors are kept in an :class:`ExactIndex`; faiss holds
    only PCA-reduced 4-bit codes under the image ids (:func:`train_ivf`). A query probes ``nprobe``
    inverted lists, takes the ``shortlist`` nearest by approximate L2 (L2 ranks
    unit vectors like cosine, and survives PCA's centring where inner product
    would not), and re-ranks those by exact cosine distance. Cosine only.

    Filters: an ``allowed`` set no bigger than what one probe scans is searched
    exactly; a larger one is passed to faiss as an id selector with ``nprobe``
    widened by ``len / len(allowed)``. Any query still short of ``width``
    eligible results falls back to exact search over its candidates, so filters
    and exclusions never cost rows.
    """

    kind = "ivf"
    metric = "cosine"

    def __init__(self, exact: ExactIndex, faiss_index: faiss.Index, *, nprobe: int, shortlist: int):
        self._exact = exact
        self._faiss = faiss_index
        self._ivf = faiss.extract_index_ivf(faiss_index)
        self.dim = exact.dim
        self.nprobe = nprobe
        self.shortlist = shortlist

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, **settings) -> IVFIndex:
        """Copy ``vectors`` (n, dim) under ``ids`` into an index; ``settings`` as :meth:`from_exact`."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise BadInput(f"vectors must be two-dimensional, got shape {vectors.shape}")
        exact = ExactIndex(vectors.shape[1])
        exact.add(ids, vectors)
        return cls.from_exact(exact, **settings)

    @classmethod
    def from_exact(cls, exact: ExactIndex, *, nlist: int | None = None, pca_dim: int = 256,
                   nprobe: int | None = None, shortlist: int = SHORTLIST, train_size: int | None = None,
                   seed: int = 0) -> IVFIndex:
        """Train on a sample of a cosine :class:`ExactIndex` and index all of it.

        The IVF index takes ``exact`` over (no copy of the vectors: a caller that
        fills it chunk by chunk never holds two copies). ``nlist`` defaults to
        :func:`default_nlist`, ``nprobe`` to ``nlist / 32`` (at least 8): a probe
        scans about 3% of the collection, which measured recall@10 0.96 at 1M
        (bench/bench_search.py). The shortlist barely matters for recall (the
        coarse probe decides it); it bounds the re-rank work. PCA is skipped when
        ``pca_dim`` is not below the dimension; ``train_size`` (default
        ``min(n, 40·nlist)``) rows drawn with ``seed`` train PCA, the coarse
        centroids and the quantiser. Needs at least 1000 vectors.
        """
        if exact.metric != "cosine":
            raise BadInput("an IVF index supports metric='cosine' only")
        n = len(exact)
        nlist = nlist or default_nlist(n)
        sample = ivf_sample(n, nlist, train_size, seed)
        index = train_ivf(exact.vectors[sample], n, nlist=nlist, pca_dim=pca_dim, seed=seed)
        built = cls(exact, index, nprobe=nprobe or default_nprobe(nlist), shortlist=shortlist)
        built._add_to_faiss(0, n)
        return built

    def _add_to_faiss(self, start: int, end: int) -> None:
        vectors, ids = self._exact.vectors, self._exact.ids
        for lo in range(start, end, _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, end)
            self._faiss.add_with_ids(vectors[lo:hi], ids[lo:hi])

    def __len__(self) -> int:
        return len(self._exact)

    @property
    def nlist(self) -> int:
        return self._ivf.nlist

    @property
    def ids(self) -> np.ndarray:
        """The stored ids (read-only view)."""
        return self._exact.ids

    @property
    def exact(self) -> ExactIndex:
        """Exact search over the same full-precision vectors (shared, not copied)."""
        return self._exact

    def add(self, ids: np.ndarray | Iterable[int], vectors: np.ndarray) -> None:
        """Add vectors under new ids; they are encoded against the trained centroids."""
        start = len(self._exact)
        self._exact.add(ids, vectors)
        self._add_to_faiss(start, len(self._exact))

    def remove(self, ids: np.ndarray | Iterable[int]) -> None:
        """Remove ids (all must be present) from the codes and the full vectors."""
        ids = _as_ids(ids)
        self._exact.remove(ids)
        if self._faiss.remove_ids(faiss.IDSelectorBatch(ids)) < len(ids):
            # Fast-scan lists cannot drop codes (faiss removes none): encode what is left anew, O(n).
            self._faiss.reset()
            self._add_to_faiss(0, len(self._exact))

    def search(self, queries: np.ndarray, k: int, *, exclude: Exclude = None,
               allowed: Allowed = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k nearest by cosine distance (exact distances, approximate recall)."""
        _check_k(k)
        exact = self._exact
        queries = exact.prepare_queries(queries)
        excluded = exact.excluded_rows(exclude, len(queries))
        n = len(exact)
        candidates = None if allowed is None else exact.allowed_rows(allowed)
        n_cand = n if candidates is None else len(candidates)
        width = min(k, n_cand)
        probe_size = n * self.nprobe / self.nlist
        if width == 0 or n_cand <= max(probe_size, 4 * self.shortlist):
            return exact.search_rows(queries, k, excluded, candidates)

        # faiss parameter objects hold raw pointers: every one stays bound to a
        # local name until the search is done.
        ivf_params = faiss.SearchParametersIVF(nprobe=min(self.nlist, math.ceil(self.nprobe * n / n_cand)))
        if candidates is not None:
            selector = faiss.IDSelectorBatch(exact.ids[candidates])
            ivf_params.sel = selector
        params = ivf_params
        if isinstance(self._faiss, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=ivf_params)
        extra = 0 if excluded is None else max(map(len, excluded), default=0)
        # Excluded ids take shortlist places; the 4-bit codes order the deeper ones loosely: twice as many.
        shortlist = min(n_cand, widened_shortlist(max(self.shortlist, k), n / n_cand) + 2 * extra)
        _, labels = self._faiss.search(queries, shortlist, params=params)

        ids = np.empty((len(queries), width), dtype=np.int64)
        dists = np.empty((len(queries), width), dtype=np.float32)
        block = max(1, _SCORE_BLOCK_ELEMENTS // (shortlist * self.dim))
        for lo in range(0, len(queries), block):
            ids[lo:lo + block], dists[lo:lo + block] = self._rerank(
                queries[lo:lo + block], labels[lo:lo + block], width,
                None if excluded is None else excluded[lo:lo + block])
        # A query with fewer than its eligible count (capped at width) goes exact.
        found = (ids >= 0).sum(axis=1)
        eligible = np.full(len(queries), width)
        if excluded is not None:
            in_cand = np.ones(n, dtype=bool)
            if candidates is not None:
                in_cand[:] = False
                in_cand[candidates] = True
            eligible = np.minimum(width, n_cand - np.array([in_cand[r].sum() for r in excluded]))
        short = np.flatnonzero(found < eligible)
        if len(short):
            redo = None if excluded is None else [excluded[i] for i in short]
            ids[short], dists[short] = exact.search_rows(queries[short], k, redo, candidates)
        return ids, dists

    def _rerank(self, queries: np.ndarray, labels: np.ndarray, width: int,
                excluded: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine distances of each query's shortlist; keep the best ``width``."""
        rows = self._exact.rows_of(labels).reshape(labels.shape)
        if excluded is not None:
            for i, excluded_rows in enumerate(excluded):
                rows[i, np.isin(rows[i], excluded_rows)] = -1
        matrix = self._exact.vectors
        candidates = matrix[np.maximum(rows, 0)]  # (nq, shortlist, dim)
        dist = 1.0 - np.matmul(candidates, queries[:, :, None])[:, :, 0]
        dist[rows < 0] = np.inf
        cols, vals = _top_k(dist, min(width, dist.shape[1]))
        found = np.isfinite(vals)
        ids = np.full((len(queries), width), -1, dtype=np.int64)
        dists = np.full((len(queries), width), np.inf, dtype=np.float32)
        ids[:, :cols.shape[1]] = np.where(found, np.take_along_axis(labels, cols, axis=1), -1)
        dists[:, :cols.shape[1]] = np.where(found, np.maximum(vals, 0.0), np.inf)
        return ids, dists

    def to_bytes(self) -> bytes:
        """The trained faiss index (PCA, centroids, codes, ids) and settings, as bytes.

        The full-precision vectors are *not* included — they are the embeddings
        already stored in the database; :meth:`from_bytes` takes them back.
        """
        header = json.dumps({
            "format": "lookalike-ivf", "version": 1, "dim": self.dim, "count": len(self),
            "nprobe": self.nprobe, "shortlist": self.shortlist,
            "ids_sha256": _ids_digest(self.ids),
        }).encode()
        return struct.pack("<I", len(header)) + header + faiss.serialize_index(self._faiss).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, ids: np.ndarray, vectors: np.ndarray) -> IVFIndex:
        """Load what :meth:`to_bytes` wrote, given the same ids and full vectors (any order)."""
        (header_len,) = struct.unpack_from("<I", data)
        header = json.loads(data[4:4 + header_len])
        if header.get("format") != "lookalike-ivf" or header.get("version") != 1:
            raise BadInput("not a lookalike IVF index")
        ids = _as_ids(ids)
        if len(ids) != header["count"] or _ids_digest(ids) != header["ids_sha256"]:
            raise BadInput("the ids given are not the ids the index was saved with")
        exact = ExactIndex(header["dim"])
        exact.add(ids, vectors)
        faiss_index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=4 + header_len))
        return cls(exact, faiss_index, nprobe=header["nprobe"], shortlist=header["shortlist"])


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(ids).astype("<i8").tobytes()).hexdigest()


def build_index(ids: np.ndarray, vectors: np.ndarray, *, kind: str = "auto", threshold: int = IVF_THRESHOLD,
                metric: str = "cosine", seed: int = 0) -> VectorIndex:
    """Index ``vectors`` (n, dim) under ``ids``.

    ``kind="auto"`` builds an :class:`ExactIndex` below ``threshold`` vectors and an
    :class:`IVFIndex` from there up; ``"exact"`` / ``"ivf"`` force one. ``metric="l2"``
    is exact-only, so ``auto`` then always builds exact. ``seed`` fixes IVF training.
    """
    if kind not in KINDS:
        raise BadInput(f"kind must be one of {KINDS}, got {kind!r}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise BadInput(f"vectors must be two-dimensional, got shape {vectors.shape}")
    if kind == "ivf" and metric != "cosine":
        raise BadInput("an IVF index supports metric='cosine' only")
    if kind == "ivf" or (kind == "auto" and metric == "cosine" and len(vectors) >= threshold):
        return IVFIndex.build(ids, vectors, seed=seed)
    index = ExactIndex(vectors.shape[1], metric)
    index.add(ids, vectors)
    return index


def nearest_neighbours(vectors: np.ndarray, k: int, *, exact_up_to: int = 5_000, reduced_dim: int = 128,
                       nprobe: int = 8) -> np.ndarray:
    """Row indices of each row's ``k`` most similar other rows (inner product of unit vectors), -1 padded.

    Exact (faiss flat) up to ``exact_up_to`` rows. Above, the vectors are
    reduced by PCA to ``reduced_dim`` and searched in an inverted file probing
    ``nprobe`` lists: near-copies are close in any projection and sit in one
    cell or its neighbours, so they are found at a small fraction of the cost
    (these are candidates; callers compare the full vectors).
    """
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = matrix.shape
    if n == 0 or k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, 20_000), replace=False))
    if n <= exact_up_to:
        index = faiss.IndexFlatIP(dim)
    else:
        pca = faiss.PCAMatrix(dim, min(reduced_dim, dim))
        pca.train(matrix[sample[:10_000]])
        reduced = pca.apply(matrix)
        faiss.normalize_L2(reduced)
        matrix, dim = reduced, reduced.shape[1]
        nlist = max(1, min(default_nlist(n), len(sample) // 39))   # faiss wants 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10   # coarse cells are enough: a copy and its original land in the same or a probed one
        index.train(matrix[sample])
        index.nprobe = nprobe
    index.add(matrix)
    found = np.empty((n, min(k + 1, n)), dtype=np.int64)
    for lo in range(0, n, _CHUNK_ROWS):
        _, found[lo:lo + _CHUNK_ROWS] = index.search(matrix[lo:lo + _CHUNK_ROWS], found.shape[1])
    # Drop each row itself (it may tie with an exact copy, so not always in column 0).
    mine = found == np.arange(n)[:, None]
    keep = np.where(mine.any(axis=1, keepdims=True), ~mine, np.arange(found.shape[1]) < found.shape[1] - 1)
    return found[keep].reshape(n, found.shape[1] - 1)[:, :k]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact neighbours (``-1`` padding ignored) found by the approximation."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if len(approx_ids) != len(exact_ids):
        raise BadInput("approx_ids and exact_ids must have one row per query each")
    shares = []
    for approx, exact in zip(approx_ids, exact_ids):
        truth = exact[exact >= 0]
        if len(truth):
            shares.append(np.isin(truth, approx).mean())
    return float(np.mean(shares)) if shares else 1.0
