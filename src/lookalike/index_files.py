"""An index folder's files, read: the header, the memory-mapped matrix, the id map, the IVF structure, and the
search over them (:mod:`lookalike.index` describes the format and writes it).

Apart from the database so that a reader that only searches (a PL/Python backend answering a query by id,
:mod:`lookalike.backend`) imports NumPy and, for an IVF folder, faiss, but no database driver.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadInput
from .vectors import IVF_THRESHOLD, SHORTLIST, _top_k, faiss, recall_at_k, widened_shortlist

if TYPE_CHECKING:
    from .projection import Space

FORMAT, FORMAT_VERSION = "lookalike-index", 1
BLOCK_ROWS = 1 << 16       # rows scored or encoded at a time: bounded temporary memory
SAMPLED_ROWS = 16          # rows whose bytes the header checksums


@dataclass
class Header:
    database: str              # settings.database_id: the database these files belong to
    model_id: int
    weights_sha256: str
    dim: int
    generation: int            # embedding_generations.generation reflected
    epoch: int                 # names the vectors file; bumped when the matrix is rewritten
    rows: int                  # rows of the matrix in use (dead ones included)
    live: int
    ids_sha256: str
    sample_sha256: str
    ivf_epoch: int = 0         # names the IVF file; bumped when the structure changes
    ivf_rows: int = 0          # rows covered by the IVF structure; 0: none
    ivf_bytes: int = 0
    ivf_sha256: str = ""
    nprobe: int = 0
    space_id: int = 0          # the fitted space the rows are projected into; 0: the embeddings themselves
    space_sha256: str = ""     # its parameters' checksum
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def files(self) -> set[str]:
        names = {"header.json", "lock", f"vectors.{self.epoch}.f32", f"ids.{self.generation}.npy"}
        return names | ({f"ivf.{self.ivf_epoch}.faiss"} if self.ivf_rows else set())


def _header_bytes(header: Header) -> bytes:
    body = asdict(header)
    text = json.dumps(body, sort_keys=True)
    return json.dumps({"header": body, "sha256": hashlib.sha256(text.encode()).hexdigest()}).encode()


def _read_header(folder: Path) -> Header | None:
    """The header if it is whole and its checksum matches; None when missing or torn."""
    try:
        data = json.loads((folder / "header.json").read_bytes())
        body = data["header"]
        if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != data["sha256"]:
            return None
        header = Header(**body)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # Numbers name the files: a forged header must not point anywhere else.
    for name, kind in Header.__annotations__.items():
        value = getattr(header, name)
        if type(value) is not {"int": int, "str": str}[kind] or kind == "int" and value < 0:
            return None
    return header if header.format == FORMAT and header.version == FORMAT_VERSION else None


def _sample_digest(matrix: np.ndarray, rows: int) -> str:
    picks = sorted(set(np.linspace(0, rows - 1, SAMPLED_ROWS).astype(np.int64).tolist())) if rows else []
    return hashlib.sha256(b"".join(matrix[int(r)].tobytes() for r in picks)).hexdigest()


def _ivf_digest(path: Path) -> str:
    """sha256 of the first and last MiB and the size: catches a torn or cut file without reading it all."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    return hashlib.sha256(head + tail + str(size).encode()).hexdigest()


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def _rows_without(rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """The distinct rows (>= 0) of ``rows`` not in ``excluded``, sorted (np.unique would import numpy.ma)."""
    rows = np.sort(rows[(rows >= 0) & ~np.isin(rows, excluded)])
    return rows[np.concatenate(([True], rows[1:] != rows[:-1]))] if len(rows) else rows


@dataclass
class MappedIndex:
    """An opened index: the id map in memory, the matrix mapped, the IVF structure (if any) loaded."""

    folder: Path
    header: Header
    row_ids: np.ndarray                 # image id per row, -1 dead
    matrix: np.ndarray                  # (rows, dim) float32, memory-mapped
    ivf: object | None = None           # faiss index over rows < header.ivf_rows
    use_ivf: bool = True
    extra: np.ndarray | None = None     # rows after the file's, caught up in this process only (read-only folder)
    _order: np.ndarray = field(init=False, repr=False)     # rows by id, for lookups by binary search
    _sorted: np.ndarray = field(init=False, repr=False)
    _file: object = field(init=False, repr=False)
    _tail: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # Scattered rows (a re-rank, a stored vector) are read, not mapped: touching one row of the map
        # maps the whole page-cache folio around it, up to 2 MiB each, tens of MiB per query.
        self._file = open(self.matrix.filename, "rb", buffering=0) if isinstance(self.matrix, np.memmap) else None
        self._order = np.argsort(self.row_ids, kind="stable")
        self._sorted = self.row_ids[self._order]

    @property
    def kind(self) -> str:
        return "ivf" if self.ivf is not None and self.use_ivf else "exact"

    @property
    def generation(self) -> int:
        return self.header.generation

    @property
    def dim(self) -> int:
        return self.header.dim

    @property
    def ids(self) -> np.ndarray:
        """The live image ids, in row order."""
        return self.row_ids[self.row_ids >= 0]

    def __len__(self) -> int:
        return self.header.live

    def rows_of(self, ids: Iterable[int]) -> np.ndarray:
        """The row of each id, -1 where it is not in the index."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
        if len(ids) == 0 or len(self._order) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        return np.where((self._sorted[at] == ids) & (ids >= 0), self._order[at], -1)

    def vector(self, image_id: int) -> np.ndarray | None:
        row = int(self.rows_of([image_id])[0])
        return None if row < 0 else self._read(np.array([row]))[0]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The given sorted rows of the matrix; the rows after the IVF structure (every query reads them)
        from a copy kept in memory, others each run of consecutive rows in one pread."""
        mapped = len(self.matrix)
        if self.extra is not None and len(rows) and rows[-1] >= mapped:
            split = int(np.searchsorted(rows, mapped))
            return np.concatenate([self._read(rows[:split]), self.extra[rows[split:] - mapped]])
        if self._file is None:
            return self.matrix[rows]
        start = self.header.ivf_rows if self.ivf is not None else self.header.rows
        if start < self.header.rows and len(rows) and rows[-1] >= start:
            split = int(np.searchsorted(rows, start))
            return np.concatenate([self._pread(rows[:split]), self._tail_rows()[rows[split:] - start]])
        return self._pread(rows)

    def _tail_rows(self) -> np.ndarray:
        """The rows after the IVF structure, read once."""
        if self._tail is None:
            self._tail = self._pread(np.arange(self.header.ivf_rows, len(self.matrix)))
            if self.extra is not None:
                self._tail = np.concatenate([self._tail, self.extra])
        return self._tail

    def _pread(self, rows: np.ndarray) -> np.ndarray:
        """The given sorted rows, each run of consecutive rows read straight into the result (one preadv)."""
        size = self.dim * 4
        out = np.empty((len(rows), self.dim), dtype="<f4")
        if not len(rows):
            return out
        into = memoryview(out).cast("B")
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for lo, hi in zip([0] + breaks, breaks + [len(rows)]):
            if os.preadv(self._file.fileno(), [into[lo * size:hi * size]], int(rows[lo]) * size) != (hi - lo) * size:
                raise BadInput(f"the index matrix {self.matrix.filename} is shorter than its header says")
        return out

    def search(self, query: np.ndarray, k: int, *, exclude: Iterable[int] = (),
               allowed: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine distances) of the ``k`` nearest live rows, best first; ``allowed`` limits them.

        Exact over the mapped rows, or an IVF shortlist (plus the rows after it) re-ranked exactly;
        a query left short of ``k`` eligible rows by the shortlist is answered exactly.
        """
        q = np.asarray(query, dtype=np.float32).ravel()
        if q.shape != (self.dim,) or not np.all(np.isfinite(q)) or not np.any(q):
            raise BadInput(f"a query must be a finite non-zero vector of {self.dim} numbers")
        q = q / np.linalg.norm(q)
        excluded = self.rows_of(list(exclude))
        excluded = excluded[excluded >= 0]
        candidates = None
        if allowed is not None:
            candidates = _rows_without(self.rows_of(allowed), excluded)
            eligible = len(candidates)
        else:
            eligible = self.header.live - len(excluded)
        width = max(0, min(k, eligible))
        if width == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if self.kind == "ivf":
            found = self._ivf_search(q, width, excluded, candidates)
            if len(found[0]) == width:
                return found
        return self._exact(q, width, excluded, candidates)

    def _distances(self, q: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """1 - cosine of ``q`` against sorted ``rows`` (all rows when None), block by block."""
        n = self.header.rows if rows is None else len(rows)
        out = np.empty(n, dtype=np.float32)
        mapped = len(self.matrix) if rows is None else n
        for lo in range(0, mapped, BLOCK_ROWS):
            hi = min(lo + BLOCK_ROWS, mapped)
            out[lo:hi] = (self.matrix[lo:hi] if rows is None else self._read(rows[lo:hi])) @ q
        if mapped < n:
            out[mapped:] = self.extra @ q
        return np.subtract(1.0, out, out=out)

    def _best(self, rows: np.ndarray, dist: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        dist[self.row_ids[rows] < 0] = np.inf
        cols, vals = _top_k(dist[None, :], min(width, len(dist)))
        cols, vals = cols[0], vals[0]
        keep = np.isfinite(vals)
        return self.row_ids[rows[cols[keep]]], np.maximum(vals[keep], 0.0).astype(np.float32)

    def _exact(self, q, width, excluded, candidates):
        rows = np.arange(self.header.rows) if candidates is None else candidates
        dist = self._distances(q, None if candidates is None else rows)
        if candidates is None:
            dist[excluded] = np.inf
        return self._best(rows, dist, width)

    def _ivf_search(self, q, width, excluded, candidates):
        h = self.header
        n_cand = h.live if candidates is None else len(candidates)
        nlist = faiss.extract_index_ivf(self.ivf).nlist
        if n_cand <= max(h.ivf_rows * h.nprobe / nlist, 4 * SHORTLIST):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)   # small: exact is as cheap
        # faiss parameter objects hold raw pointers: each stays bound to a name until the search is done.
        ivf_params = faiss.SearchParametersIVF(nprobe=min(nlist, math.ceil(h.nprobe * h.live / n_cand)))
        if candidates is not None:   # excluded rows are already out of the candidates
            selector = faiss.IDSelectorBatch(candidates[candidates < h.ivf_rows])
            ivf_params.sel = selector
        elif len(excluded) > SHORTLIST:   # many (a dedupe run's copies): faiss skips them
            batch = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(batch)
            ivf_params.sel = selector
        params = ivf_params
        if isinstance(self.ivf, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=ivf_params)
        dead = h.rows - h.live
        # Excluded and dead rows take shortlist places; the 4-bit codes order the deeper ones loosely.
        shortlist = min(h.ivf_rows, widened_shortlist(max(SHORTLIST, width), h.live / n_cand)
                        + 2 * min(len(excluded) + dead, SHORTLIST))
        # One query gains nothing from OpenMP threads, and on a busy machine their barriers cost
        # milliseconds (measured 2 ms against 11 ms p50). The setting is this thread's own.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            _, labels = self.ivf.search(q[None, :], shortlist, params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        rows = _rows_without(labels[0], excluded)
        dist = self._distances(q, rows)
        if h.ivf_rows < h.rows:   # the rows appended since: all of them scored, from the copy in memory
            tail = np.arange(h.ivf_rows, h.rows) if candidates is None else candidates[candidates >= h.ivf_rows]
            tail_dist = 1.0 - (self._read(tail) if candidates is not None else self._tail_rows()) @ q
            tail_dist[np.isin(tail, excluded)] = np.inf
            rows, dist = np.concatenate([rows, tail]), np.concatenate([dist, tail_dist])
        return self._best(rows, dist, width)

    def recall(self, queries: int = 100, k: int = 10, seed: int = 0) -> float | None:
        """recall@k of the IVF search against exact search, on live rows as queries; None without IVF.

        The exact answers come from one pass over the matrix for all queries together.
        """
        if self.ivf is None:
            return None
        live = np.flatnonzero(self.row_ids >= 0)
        picks = np.sort(np.random.default_rng(seed).choice(live, min(queries, len(live)), replace=False))
        q = np.array(self._read(picks))
        best_rows = np.zeros((len(picks), 0), dtype=np.int64)
        best = np.zeros((len(picks), 0), dtype=np.float32)
        for lo, block in _blocks(self.folder / f"vectors.{self.header.epoch}.f32", self.header, 0):
            dist = 1.0 - q @ block.T
            rows = np.arange(lo, lo + len(block))
            dist[:, self.row_ids[rows] < 0] = np.inf
            dist[(picks[:, None] == rows[None, :])] = np.inf   # not the query itself
            best_rows = np.concatenate([best_rows, np.broadcast_to(rows, dist.shape)], axis=1)
            best = np.concatenate([best, dist], axis=1)
            cols, best = _top_k(best, min(k, best.shape[1]))
            best_rows = np.take_along_axis(best_rows, cols, axis=1)
        exact = np.where(np.isfinite(best), self.row_ids[best_rows], -1)
        approx = [np.pad(self.search(q[i], k, exclude=[int(self.row_ids[row])])[0], (0, k), constant_values=-1)[:k]
                  for i, row in enumerate(picks)]
        return recall_at_k(np.array(approx), exact)


def _wanted_ivf(index: MappedIndex, kind: str) -> bool:
    return kind == "ivf" and index.header.live >= 1000 or kind == "auto" and index.header.live >= IVF_THRESHOLD


def _same_source(h: Header, database: str, weights: str, space: Space | None) -> bool:
    """Whether the files of header ``h`` hold these rows: this database, these weights, this space."""
    return (h.database, h.weights_sha256, h.space_id, h.space_sha256) == (
        database, weights, space.id if space else 0, space.checksum if space else "")


def _open_files(folder: Path) -> MappedIndex | None:
    """The index in ``folder`` if its files are whole and match the header; None otherwise.

    Tried a few times: a writer may replace the files between reading the header and opening them.
    """
    for _attempt in range(3):
        header = _read_header(folder)
        if header is None:
            return None
        try:
            return _open_checked(folder, header)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, EOFError, RuntimeError):   # RuntimeError: faiss refused the file
            return None
    return None


def _open_checked(folder: Path, h: Header) -> MappedIndex | None:
    ids = np.load(folder / f"ids.{h.generation}.npy", allow_pickle=False)
    if ids.shape != (h.rows,) or _ids_digest(ids) != h.ids_sha256 or int((ids >= 0).sum()) != h.live:
        return None
    path = folder / f"vectors.{h.epoch}.f32"
    if path.stat().st_size < h.rows * h.dim * 4:
        return None   # cut short
    matrix = np.memmap(path, dtype="<f4", mode="r", shape=(h.rows, h.dim)) if h.rows else \
        np.zeros((0, h.dim), dtype=np.float32)
    if _sample_digest(matrix, h.rows) != h.sample_sha256:
        return None
    ivf = None
    if h.ivf_rows:
        ivf_path = folder / f"ivf.{h.ivf_epoch}.faiss"
        if ivf_path.stat().st_size != h.ivf_bytes or _ivf_digest(ivf_path) != h.ivf_sha256:
            return None
        # Read into this process: about 52 bytes a vector (4-bit codes and an id), private to each
        # searcher (the matrix is what they share). IO_FLAG_MMAP shared the lists' pages of the older 8-bit
        # codes but searched 1.8x slower (11.1 against 6.2 ms p50); IO_FLAG_MMAP_IFC maps flat codes only.
        ivf = faiss.read_index(str(ivf_path))
    return MappedIndex(folder, h, ids, matrix, ivf)


def _blocks(path: Path, h: Header, start: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of the matrix from ``start`` on, read (not mapped) so pages do not stay resident."""
    buffer = np.empty((BLOCK_ROWS, h.dim), dtype="<f4")
    with open(path, "rb", buffering=0) as f:
        f.seek(start * h.dim * 4)
        for lo in range(start, h.rows, BLOCK_ROWS):
            n = min(BLOCK_ROWS, h.rows - lo)
            view = memoryview(buffer[:n]).cast("B")
            got = f.readinto(view)
            if got != n * h.dim * 4:
                raise OSError(errno.EIO, f"the index matrix {path.name} is shorter than its header says")
            yield lo, buffer[:n]


def index_root(store: str | Path) -> Path:
    """The folder that holds the indexes of the database whose image store is ``store``: beside it."""
    root = Path(store).expanduser().resolve()
    return root.with_name(root.name + ".index")


def folder_name(model_id: int, space_id: int | None = None) -> str:
    """The name of the index folder of feature model ``model_id`` (of its fitted space ``space_id``)."""
    return f"model-{int(model_id)}" + (f"-space-{int(space_id)}" if space_id is not None else "")
