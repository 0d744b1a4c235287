"""The persistent vector index: one folder per feature model, and one per fitted space, beside the image store.

The database stays the source of truth; a folder is a cache of its embeddings (or of
their projections into a fitted similarity space, :mod:`lookalike.projection`) that every
searcher (CLI, web app, PL/Python backend) opens instead of loading vectors:

- ``vectors.<epoch>.f32`` — the unit vectors, float32 rows, memory-mapped read-only.
  Rows are only appended; a removed image's row is marked dead in the id map.
- ``ids.<generation>.npy`` — the image id of each row (``-1``: dead).
- ``ivf.<generation>.faiss`` — for a large collection, the faiss PCA→IVF→PQ fast-scan structure
  over the first ``ivf_rows`` rows (faiss ids are row numbers); rows appended since are
  searched exactly until there are ``TAIL_ROWS`` of them, then folded in.
- ``header.json`` — what the files hold: the generation of the database it reflects,
  sizes and checksums, and a checksum of itself.

Freshness is one row read: the ``embedding_generations`` counter that triggers on
``embeddings`` bump in the writer's own transaction. Catching up reads the ids
``embedding_changes`` logged since the header's generation and applies the current
state of each (dead row, appended row): O(changes). A model change is another folder.
A space's vectors are a pure function of the embeddings and the space's stored
parameters, so its folder follows the same counter and change log, projecting each
changed embedding; a refit is a new space row, so another folder.

Crash safety: new files are written under temporary names, fsynced and renamed; the
header, replaced last, names the files it describes. On open the header checksum, the
file sizes and sampled contents are verified; anything torn is rebuilt from the database.
Writers take a lock file; readers never wait for one unless the index must change. Reading and
searching a folder is :mod:`lookalike.index_files`, which needs no database driver.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from .config import DEFAULT_BACKBONE
from .db import Database, embeddings, feature_models, settings
from .db.schema import embedding_changes, embedding_generations
from .errors import BadInput, LookalikeError, Precondition
from .index_files import (BLOCK_ROWS, Header, MappedIndex, _blocks, _header_bytes, _ids_digest, _ivf_digest,
                          _open_files, _read_header, _same_source, _sample_digest, _wanted_ivf, folder_name,
                          index_root)
from .projection import Space, fitted_spaces
from .steps import INDEX_KIND
from .vectors import KINDS, default_nlist, default_nprobe, faiss, ivf_sample, train_ivf

READ_ROWS = 8192           # embeddings read from the database per round trip
TAIL_ROWS = 4096           # rows appended after the IVF structure that are searched exactly (kept in memory)
COMPACT_SHARE = 0.25       # rewrite the matrix when this share of its rows is dead
PRUNE_CHANGES = 50_000     # delete change-log rows once the index is this many generations past the last prune
LOCK_WAIT_S = 1800.0       # a writer waits at most this long for another's build


class IndexUnavailable(LookalikeError):
    """The index folder cannot be written (read-only, full disk); the caller searches in memory instead."""


def index_dir(db: Database) -> Path:
    """The folder that holds the indexes of ``db``: beside its image store."""
    return index_root(db.store.root)


def model_dir(db: Database, model_id: int, root: Path | None = None, space: Space | None = None) -> Path:
    """The index folder of feature model ``model_id`` (of its fitted ``space``), in ``root`` (default
    :func:`index_dir`)."""
    return (index_dir(db) if root is None else root) / folder_name(model_id, space.id if space is not None else None)


def generation(conn, model_id: int) -> tuple[int, int]:
    """(generation, pruned) of a feature model's embeddings: one indexed row read."""
    row = conn.execute(sa.select(embedding_generations.c.generation, embedding_generations.c.pruned)
                       .where(embedding_generations.c.model_id == model_id)).first()
    return (row.generation, row.pruned) if row else (0, 0)


def _database_id(db: Database) -> str:
    found = db.setting("database_id")
    if found is None:
        with db.begin() as conn:
            conn.execute(db.insert_ignore(settings).values(key="database_id", value=uuid.uuid4().hex))
        found = db.setting("database_id")
    return found


# ---------------------------------------------------------------- files

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file, fsync, rename over ``path``."""
    temp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


# ---------------------------------------------------------------- opening, building, catching up

def open_index(db: Database, model_id: int, kind: str = "auto", *, private: bool = False,
               space: Space | None = None) -> MappedIndex:
    """The index of feature model ``model_id`` (or of its fitted ``space``), caught up with the database
    (built on first use).

    ``kind``: "exact", "ivf" or "auto" (IVF from :data:`~lookalike.vectors.IVF_THRESHOLD` vectors).
    :class:`IndexUnavailable` when the folder cannot be written and the index is not fresh;
    ``private`` then keeps one in a temporary folder of this process instead.
    """
    if kind not in KINDS:
        raise BadInput(f"index must be one of {', '.join(KINDS)}, not {kind!r}")
    folder = model_dir(db, model_id, _private_root() / _database_id(db) if private else None, space)
    with db.engine.connect() as conn:
        current, _pruned = generation(conn, model_id)
    opened = _open_files(folder)
    if opened is None or opened.header.generation != current or (_wanted_ivf(opened, kind) and opened.ivf is None) \
            or opened.header.database != db.setting("database_id"):
        try:
            with _locked(folder):
                opened = update(db, model_id, folder, kind, space=space, known=opened)
        except IndexUnavailable as exc:
            # Readable but not writable here (a PL/Python backend, another OS user): the changes since, in memory.
            if not _catchable(db, model_id, opened, space):
                raise IndexUnavailable(f"{exc}, nor read as OS user {pwd.getpwuid(os.geteuid()).pw_name} (it "
                                       f"needs r-x on the folders and r on the files to share the index)") from None
            opened = _caught_up_in_memory(db, opened, current, space)
    if kind == "ivf" and opened.ivf is None:
        raise BadInput(f"an IVF index needs at least 1000 vectors to train, got {len(opened)}")
    opened.use_ivf = kind != "exact"
    return opened


_private: list[tempfile.TemporaryDirectory] = []


def _private_root() -> Path:
    """This process's own index folder (removed when it exits), for a database whose index folder is read-only."""
    if not _private:
        _private.append(tempfile.TemporaryDirectory(prefix="lookalike-index-"))
    return Path(_private[0].name)


def update(db: Database, model_id: int, folder: Path, kind: str = "auto", *, rebuild: bool = False,
           add=None, space: Space | None = None, known: MappedIndex | None = None) -> MappedIndex:
    """Bring the files in ``folder`` up to the database (the caller holds the lock): catch up, or build.
    ``add``: how rows go into the IVF structure (see :func:`_fold_ivf`); ``space``: project the rows into it;
    ``known``: the folder as opened before the lock was taken, used again if no writer changed it since
    (opening reads the IVF structure and checks the id map: a tenth of a second at a million rows)."""
    weights, dim = _model(db, model_id)
    database = _database_id(db)
    if rebuild:
        opened = None
    elif known is not None and known.folder == folder and _read_header(folder) == known.header:
        opened = known
    else:
        opened = _open_files(folder)
    if opened is not None and not _same_source(opened.header, database, weights, space):
        opened = None
    with db.engine.connect() as conn:
        current, pruned = generation(conn, model_id)
    if opened is None or opened.header.generation < pruned:
        opened = _build(db, folder, Header(database, model_id, weights, dim if space is None else space.dim,
                                            generation=current, epoch=0, rows=0, live=0, ids_sha256="",
                                            sample_sha256="", space_id=space.id if space else 0,
                                            space_sha256=space.checksum if space else ""), space)
    elif opened.header.generation != current:
        opened = _catch_up(db, opened, current, space)
    if opened.ivf is None and _wanted_ivf(opened, kind) or opened.ivf is not None and \
            opened.header.rows - opened.header.ivf_rows > TAIL_ROWS:
        opened = _commit(folder, opened.header, opened.row_ids, new_ivf=_fold_ivf(opened, add))
    _prune(db, model_id, opened.header.generation, pruned)
    return opened


def _model(db: Database, model_id: int) -> tuple[str, int]:
    with db.engine.connect() as conn:
        row = conn.execute(sa.select(feature_models.c.weights_sha256, feature_models.c.dim)
                           .where(feature_models.c.id == model_id)).first()
    if row is None:
        raise Precondition(f"no feature model {model_id}: run `lookalike featurize` first")
    return row.weights_sha256, row.dim


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's writer lock (another process's build is waited for, at most LOCK_WAIT_S)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDONLY | os.O_CREAT, 0o664)   # flock needs no write access
    except OSError as exc:
        raise IndexUnavailable(f"cannot write the vector index in {folder}: {exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexUnavailable(f"the vector index in {folder} stayed locked for {LOCK_WAIT_S:g} s")
                time.sleep(0.05)
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
                raise IndexUnavailable(f"cannot write the vector index in {folder}: {exc.strerror}") from None
            raise
    finally:
        os.close(fd)   # closing releases the lock


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to length one (a zero row stays zero: it matches nothing)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _embedding_chunks(db: Database, model_id: int, image_ids: np.ndarray | None = None, space: Space | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, unit rows) of stored embeddings in chunks: all of a model's (by image id), or those of ``image_ids``;
    projected into ``space`` when given (from the stored vectors as they are: a space was fitted on those)."""
    dim = _model(db, model_id)[1]

    def decode(rows):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[1] for r in rows)
        if len(blob) != len(rows) * dim * 4:
            raise BadInput(f"stored embeddings of model {model_id} are not all {dim} float32 numbers")
        vectors = np.frombuffer(blob, dtype="<f4").reshape(len(rows), dim)
        return ids, _unit_rows(vectors) if space is None else space.project(vectors)

    query = sa.select(embeddings.c.image_id, embeddings.c.vector).where(embeddings.c.model_id == model_id)
    with db.engine.connect() as conn:
        if image_ids is None:
            result = conn.execution_options(stream_results=True, yield_per=READ_ROWS).execute(
                query.order_by(embeddings.c.image_id))
            for rows in result.partitions(READ_ROWS):
                yield decode(rows)
            return
        for lo in range(0, len(image_ids), READ_ROWS):
            part = [int(i) for i in image_ids[lo:lo + READ_ROWS]]
            rows = conn.execute(query.where(embeddings.c.image_id.in_(part)).order_by(embeddings.c.image_id)).all()
            if rows:
                yield decode(rows)


def _append(path: Path, keep_rows: int, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Append chunks to the matrix file after its first ``keep_rows`` rows (leftovers of a crash are cut); fsync.

    Returns the ids appended, in row order.
    """
    added = []
    with open(path, "ab") as f:
        f.truncate(keep_rows * dim * 4)
        for ids, rows in chunks:
            f.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
            added.append(ids)
        f.flush()
        os.fsync(f.fileno())
    return np.concatenate(added) if added else np.zeros(0, dtype=np.int64)


def _commit(folder: Path, h: Header, row_ids: np.ndarray, ivf=None, new_ivf=None) -> MappedIndex:
    """Write the id map, a new IVF structure (``new_ivf``: index, rows, nprobe) and then the header (the
    commit point); remove stale files. ``ivf``: the loaded structure the header already names, kept."""
    path = folder / f"vectors.{h.epoch}.f32"
    h.rows, h.live = len(row_ids), int((row_ids >= 0).sum())
    matrix = np.memmap(path, dtype="<f4", mode="r", shape=(h.rows, h.dim)) if h.rows else \
        np.zeros((0, h.dim), dtype=np.float32)
    h.ids_sha256, h.sample_sha256 = _ids_digest(row_ids), _sample_digest(matrix, h.rows)
    _write_atomic(folder / f"ids.{h.generation}.npy", lambda f: np.save(f, row_ids.astype("<i8"), allow_pickle=False))
    if new_ivf is not None:
        ivf, h.ivf_rows, h.nprobe = new_ivf
        h.ivf_epoch += 1
        ivf_path = folder / f"ivf.{h.ivf_epoch}.faiss"
        _write_atomic(ivf_path, lambda f: faiss.write_index(ivf, faiss.PyCallbackIOWriter(f.write)))
        h.ivf_bytes, h.ivf_sha256 = ivf_path.stat().st_size, _ivf_digest(ivf_path)
    elif ivf is None:
        h.ivf_rows, h.ivf_bytes, h.ivf_sha256, h.nprobe = 0, 0, "", 0
    _write_atomic(folder / "header.json", lambda f: f.write(_header_bytes(h)))
    _fsync_dir(folder)
    for stale in folder.iterdir():
        if stale.name not in h.files():
            stale.unlink(missing_ok=True)
    return MappedIndex(folder, h, row_ids, matrix, ivf)


def _build(db: Database, folder: Path, h: Header, space: Space | None) -> MappedIndex:
    """Every embedding of the model (projected into ``space``) into a new matrix file; the IVF structure is
    added by the caller when wanted."""
    h.epoch = 1 + max((int(p.name.split(".")[1]) for p in folder.glob("vectors.*.f32")
                       if p.name.split(".")[1].isdigit()), default=0)
    path = folder / f"vectors.{h.epoch}.f32"
    return _commit(folder, h, _append(path, 0, h.dim, _embedding_chunks(db, h.model_id, space=space)))


def _changed(db: Database, index: MappedIndex, current: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids changed after the index's generation up to ``current``, row ids with their old rows marked dead)."""
    h = index.header
    with db.engine.connect() as conn:
        changed = np.array(sorted(conn.execute(
            sa.select(embedding_changes.c.image_id.distinct()).where(
                embedding_changes.c.model_id == h.model_id, embedding_changes.c.generation > h.generation,
                embedding_changes.c.generation <= current)).scalars()), dtype=np.int64)
    row_ids = index.row_ids.copy()
    dying = index.rows_of(changed)
    row_ids[dying[dying >= 0]] = -1
    return changed, row_ids


def _catchable(db: Database, model_id: int, index: MappedIndex | None, space: Space | None) -> bool:
    """Whether ``index`` (opened, maybe stale) can be caught up from the change log: same database, weights
    and space, and the log not pruned past it."""
    if index is None or not _same_source(index.header, db.setting("database_id"), _model(db, model_id)[0], space):
        return False
    with db.engine.connect() as conn:
        return index.header.generation >= generation(conn, model_id)[1]


def _caught_up_in_memory(db: Database, index: MappedIndex, current: int, space: Space | None = None) -> MappedIndex:
    """``index`` with the changes after its generation applied in this process only (its files stay as they are)."""
    h = Header(**asdict(index.header))
    changed, row_ids = _changed(db, index, current)
    chunks = list(_embedding_chunks(db, h.model_id, changed, space))
    added = np.concatenate([ids for ids, _ in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    extra = np.concatenate([rows for _, rows in chunks]) if chunks else np.zeros((0, h.dim), dtype=np.float32)
    row_ids = np.concatenate([row_ids, added])
    h.generation, h.rows, h.live = current, len(row_ids), int((row_ids >= 0).sum())
    return MappedIndex(index.folder, h, row_ids, index.matrix, index.ivf, extra=extra)


def _catch_up(db: Database, index: MappedIndex, current: int, space: Space | None) -> MappedIndex:
    """Apply the changes logged after the index's generation: each changed id's row dies, its current vector
    (if it still has one) is appended. Idempotent, so changes committed meanwhile are simply seen again."""
    h = Header(**asdict(index.header))
    changed, row_ids = _changed(db, index, current)
    added = _append(index.folder / f"vectors.{h.epoch}.f32", h.rows, h.dim,
                    _embedding_chunks(db, h.model_id, changed, space))
    row_ids = np.concatenate([row_ids, added])
    h.generation = current
    dead = int((row_ids < 0).sum())
    if dead > COMPACT_SHARE * len(row_ids):
        return _compact(index.folder, h, row_ids, index.ivf is not None)
    return _commit(index.folder, h, row_ids, ivf=index.ivf)


def _compact(folder: Path, h: Header, row_ids: np.ndarray, with_ivf: bool) -> MappedIndex:
    """Rewrite the matrix with live rows only (a new epoch); the IVF structure is rebuilt over it."""
    old = np.memmap(folder / f"vectors.{h.epoch}.f32", dtype="<f4", mode="r", shape=(len(row_ids), h.dim))
    live = np.flatnonzero(row_ids >= 0)
    h.epoch += 1
    path = folder / f"vectors.{h.epoch}.f32"
    path.unlink(missing_ok=True)
    chunks = ((row_ids[live[lo:lo + BLOCK_ROWS]], old[live[lo:lo + BLOCK_ROWS]])
              for lo in range(0, len(live), BLOCK_ROWS))
    compacted = _commit(folder, h, _append(path, 0, h.dim, chunks))
    if with_ivf and compacted.header.live >= 1000:
        compacted = _commit(folder, compacted.header, compacted.row_ids, new_ivf=_fold_ivf(compacted))
    return compacted


def _fold_ivf(index: MappedIndex, add=None):
    """The IVF structure over every row: trained anew on a sample when there is none, else extended with the tail.

    ``add(ivf, path, header, start)`` adds the matrix rows from ``start`` on (default :func:`_add_rows`; the
    Spark job adds them on its executors)."""
    h = index.header
    if index.ivf is None:
        nlist = default_nlist(h.rows)
        sample = ivf_sample(h.rows, nlist)
        ivf, start, nprobe = train_ivf(_gather(index.folder / f"vectors.{h.epoch}.f32", h, sample), h.rows,
                                       nlist=nlist), 0, default_nprobe(nlist)
    else:
        ivf = faiss.read_index(str(index.folder / f"ivf.{h.ivf_epoch}.faiss"))   # a copy that can change
        start, nprobe = h.ivf_rows, h.nprobe
    (add or _add_rows)(ivf, index.folder / f"vectors.{h.epoch}.f32", h, start)
    # Dead rows keep their codes (fast-scan lists cannot drop any): the re-rank skips them, the
    # shortlist is widened for them, and compaction rebuilds the structure without them.
    return ivf, h.rows, nprobe


def _add_rows(ivf, path: Path, h: Header, start: int) -> None:
    """Rows ``start``.. of the matrix into ``ivf``, under their row numbers."""
    for lo, block in _blocks(path, h, start):
        ivf.add_with_ids(block, np.arange(lo, lo + len(block), dtype=np.int64))


def _gather(path: Path, h: Header, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows of the matrix, read block by block."""
    out = np.empty((len(rows), h.dim), dtype=np.float32)
    at = 0
    for lo, block in _blocks(path, h, 0):
        mine = rows[(rows >= lo) & (rows < lo + len(block))]
        out[at:at + len(mine)] = block[mine - lo]
        at += len(mine)
    return out


def _prune(db: Database, model_id: int, reached: int, pruned: int) -> None:
    """Drop change-log rows this index has applied, once there are many (an older copy elsewhere rebuilds)."""
    if reached - pruned < PRUNE_CHANGES:
        return
    with db.begin() as conn:
        conn.execute(sa.delete(embedding_changes).where(embedding_changes.c.model_id == model_id,
                                                        embedding_changes.c.generation <= reached))
        conn.execute(sa.update(embedding_generations).where(embedding_generations.c.model_id == model_id)
                     .values(pruned=sa.func.max(embedding_generations.c.pruned, reached)
                             if db.dialect == "sqlite" else sa.func.greatest(embedding_generations.c.pruned,
                                                                              reached)))


# ---------------------------------------------------------------- the steps: status and rebuild

@dataclass(frozen=True)
class IndexStatus:
    folder: str
    model: str
    kind: str
    vectors: int
    rows: int
    bytes: int
    generation: int
    database_generation: int
    recall_at_10: float | None
    space: str = "embeddings"
    spaces: tuple[IndexStatus, ...] = ()   # the indexes of the spaces fitted on the same feature model

    @property
    def fresh(self) -> bool:
        return self.generation == self.database_generation and all(space.fresh for space in self.spaces)

    def lines(self) -> list[str]:
        what = self.model if self.space == "embeddings" else f"{self.model}, {self.space} space"
        if self.generation < 0:   # no files: never built, or the folder cannot be written
            out = [f"index {self.folder} ({what}): {self.kind}"]
        else:
            state = "fresh" if self.generation == self.database_generation else \
                f"stale (the database is at generation {self.database_generation})"
            out = [f"index {self.folder} ({what}): {self.kind}, {self.vectors} vectors in {self.rows} rows, "
                   f"{self.bytes / 2**20:.1f} MiB, generation {self.generation}, {state}"]
            if self.recall_at_10 is not None:
                out.append(f"  IVF recall@10 on a sample of 100: {self.recall_at_10:.3f}")
        return out + [line for space in self.spaces for line in space.lines()]


def _latest_model(db: Database, backbone: str) -> tuple[int, list[Space]]:
    """The latest feature model of ``backbone`` and the spaces fitted on it."""
    from .db import latest_feature_model
    with db.engine.connect() as conn:
        model_id = latest_feature_model(conn, backbone)
        return model_id, fitted_spaces(conn, model_id)


def _with_spaces(status, db: Database, model_id: int, spaces: list[Space]) -> IndexStatus:
    """``status(folder, name, space)`` of the embeddings' index, the spaces' statuses inside it."""
    def of(space: Space | None) -> IndexStatus:
        return status(model_dir(db, model_id, space=space), space.name if space else "embeddings", space)
    return replace(of(None), spaces=tuple(of(space) for space in spaces))


def _opened_status(folder: Path, backbone: str, name: str, opened: MappedIndex, database_generation: int,
                   recall: float | None) -> IndexStatus:
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return IndexStatus(str(folder), backbone, opened.kind, len(opened), opened.header.rows, size,
                       opened.generation, database_generation, recall, name)


def index_status(db: Database, *, backbone: str = DEFAULT_BACKBONE) -> IndexStatus:
    """Size, generation and freshness of the indexes of ``backbone``'s latest model and its fitted spaces
    (read-only), IVF recall@10."""
    model_id, spaces = _latest_model(db, backbone)
    with db.engine.connect() as conn:
        current, _pruned = generation(conn, model_id)

    def status(folder: Path, name: str, _space: Space | None) -> IndexStatus:
        opened = _open_files(folder)
        if opened is None:
            return IndexStatus(str(folder), backbone, "none (built on the first search)", 0, 0, 0, -1, current,
                               None, name)
        return _opened_status(folder, backbone, name, opened, current, opened.recall())
    return _with_spaces(status, db, model_id, spaces)


def refresh_index(db: Database, *, backbone: str = DEFAULT_BACKBONE, index: str = INDEX_KIND.default) -> IndexStatus:
    """Build the indexes of ``backbone``'s latest model and its fitted spaces, or catch them up, so the next
    search opens them ready (`lookalike run` does this after featurize, `lookalike fit` after fitting); their
    status without the recall sample. Folders of spaces fitted over since are removed."""
    model_id, spaces = _latest_model(db, backbone)
    _remove_refitted(db, model_id, spaces)

    def status(folder: Path, name: str, space: Space | None) -> IndexStatus:
        try:
            opened = open_index(db, model_id, index, space=space)
        except IndexUnavailable as exc:   # not worth failing a run for: each search indexes in memory instead
            return IndexStatus(str(folder), backbone, f"not kept ({exc}): each search indexes in memory", 0, 0, 0,
                               -1, -1, None, name)
        if opened.extra is not None:
            return IndexStatus(str(folder), backbone, "read-only here: each search applies the changes since in "
                               "memory", 0, 0, 0, -1, -1, None, name)
        return _opened_status(folder, backbone, name, opened, opened.generation, None)
    return _with_spaces(status, db, model_id, spaces)


def _remove_refitted(db: Database, model_id: int, spaces: list[Space]) -> None:
    """Remove the index folders of this model's spaces that were fitted again since (a refit is a new row)."""
    current = {model_dir(db, model_id, space=space).name for space in spaces}
    for folder in index_dir(db).glob(f"model-{int(model_id)}-space-*"):
        if folder.name not in current and folder.name.rsplit("-", 1)[1].isdigit():
            try:
                with _locked(folder):
                    for path in folder.iterdir():
                        path.unlink()
                folder.rmdir()
            except (IndexUnavailable, OSError):   # another user's folder, or in use: left for later
                pass


def rebuild_index(db: Database, *, backbone: str = DEFAULT_BACKBONE, index: str = INDEX_KIND.default,
                  add=None) -> IndexStatus:
    """Rebuild the indexes of ``backbone``'s latest model and its fitted spaces from the database; their status
    after. ``add``: how rows go into an IVF structure (``lookalike spark index`` adds them on Spark)."""
    model_id, spaces = _latest_model(db, backbone)
    for space in [None, *spaces]:
        folder = model_dir(db, model_id, space=space)
        with _locked(folder):
            update(db, model_id, folder, index, rebuild=True, add=add, space=space)
    return index_status(db, backbone=backbone)
