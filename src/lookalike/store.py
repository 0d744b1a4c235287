"""Content-addressed image store: the bytes of every loaded image, by sha256.

Files live at ``<root>/<sha[:2]>/<sha>``. Writes go to a temporary file under
``<root>/.tmp/`` that is renamed into place, so a crash never leaves a
half-written image under its final name, and the same bytes are written once
however often they are loaded.

Bytes are stored before their ``images`` row commits, so a killed load can
leave bytes without a row (orphans) and temporary files; :func:`check_store`
finds them, and the damage the other way round (rows whose bytes are missing
or changed). A writing run sweeps old temporary files on its first write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FANOUT = re.compile(r"^[0-9a-f]{2}$")
TEMP_DIR = ".tmp"
TEMP_PREFIX = ".tmp-"
DEFAULT_GRACE_S = 3600.0   # leftovers younger than this may belong to a running load: never deleted
HASH_CHUNK = 1 << 20
LISTED = 10                # paths listed per kind of problem in a check's report
MISSING_REASON = "missing from the image store"
DAMAGED_REASON = "damaged in the image store: its bytes do not hash to its sha256"


class StoreError(Exception):
    """The store could not take bytes (disk full, read-only folder); the message says which.

    Not an OSError on purpose: it stops a run instead of failing one entry.
    """


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_error(exc: OSError, where: Path | str) -> str:
    """One line for a failed write, naming the cause a user can fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: cannot write to {where} ({exc.strerror})"
    if exc.errno == errno.EFBIG:
        return f"file size limit reached: cannot write to {where} ({exc.strerror})"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where} is read-only ({exc.strerror})"
    return f"cannot write to {where}: {exc.strerror or exc}"


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._swept = False
        self._sweep_lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        # Validate: a sha256 is the only thing ever joined to the store path.
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` (idempotent) and return its sha256; StoreError when it cannot be written."""
        sha256 = sha256 or sha256_hex(data)
        target = self.path(sha256)
        if target.is_file():
            # A fresh mtime restarts the grace period, so `store check --fix` never deletes
            # bytes whose row a running load is about to commit.
            try:
                os.utime(target)
            except OSError:
                pass  # a read-only store still serves bytes it already has
            return sha256
        self._sweep_once()
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp_dir = self.root / TEMP_DIR
            temp_dir.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=temp_dir, prefix=TEMP_PREFIX)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise StoreError(write_error(exc, f"the image store at {self.root}")) from None
        except BaseException:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise
        return sha256

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {sha256[:12]}… is missing from the store at {self.root}") from None

    def _sweep_once(self, grace: float = DEFAULT_GRACE_S) -> None:
        """Delete temporary files older than ``grace`` (left by a killed run), once per store object."""
        with self._sweep_lock:
            if self._swept:
                return
            self._swept = True
            for path in _temp_files(self.root):
                _delete_if_old(path, time.time() - grace)


def _temp_files(root: Path) -> list[Path]:
    if (root / TEMP_DIR).is_symlink():   # never delete through a link out of the store
        return []
    try:
        return [Path(e.path) for e in os.scandir(root / TEMP_DIR)
                if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _delete_if_old(path: Path, cutoff: float) -> bool:
    try:
        if path.lstat().st_mtime >= cutoff:
            return False
        path.unlink()
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- store check

@dataclass
class StoreCheck:
    root: Path
    fixed: bool
    grace: float
    files: int = 0                                          # image files in the store
    orphans: list[Path] = field(default_factory=list)       # bytes no images/query_images row names
    temp: list[Path] = field(default_factory=list)          # temporary files of interrupted writes
    missing: list[int] = field(default_factory=list)        # images ids whose bytes are gone
    damaged: list[int] = field(default_factory=list)        # images ids whose bytes changed
    unknown: list[Path] = field(default_factory=list)       # not the store's: reported, never touched
    deleted: int = 0
    kept_young: int = 0                                     # leftovers within the grace period
    marked_failed: int = 0

    @property
    def clean(self) -> bool:
        """Nothing left to fix (after --fix: only what is within the grace period, or nothing)."""
        if self.fixed:
            return self.kept_young == 0
        return not (self.orphans or self.temp or self.missing or self.damaged)

    def lines(self) -> list[str]:
        out = [f"image store {self.root}: {self.files} image files"]
        for name, found, what in (
                ("orphans", self.orphans, "bytes without an images row"),
                ("temporary", self.temp, "files left by interrupted writes"),
                ("missing", self.missing, "images rows whose bytes are gone"),
                ("damaged", self.damaged, "images rows whose bytes do not hash to their sha256"),
                ("unknown", self.unknown, "files that are not the store's, left alone")):
            out.append(f"  {name + ':':<11}{len(found):>6}  {what}")
            out += [f"    {item}" if isinstance(item, Path) else f"    image {item}" for item in found[:LISTED]]
            if len(found) > LISTED:
                out.append(f"    … and {len(found) - LISTED} more")
        if self.fixed:
            out.append(f"fixed: deleted {self.deleted} orphan and temporary files, marked {self.marked_failed} "
                       f"images rows failed; left {self.kept_young} younger than {self.grace:g} s "
                       "(a load may still be writing them)")
        elif not self.clean:
            out.append("run `lookalike store check --fix` to delete leftovers and mark the rows failed")
        return out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _scan(root: Path, check: StoreCheck) -> dict[str, Path]:
    """Walk the store: image files by sha256; temporary and unknown files into ``check``."""
    files: dict[str, Path] = {}
    if not root.is_dir():
        return files
    for top in os.scandir(root):
        if top.name == TEMP_DIR and top.is_dir(follow_symlinks=False):
            continue
        if not (_FANOUT.match(top.name) and top.is_dir(follow_symlinks=False)):
            check.unknown.append(Path(top.path))
            continue
        for entry in os.scandir(top.path):
            path = Path(entry.path)
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                check.temp.append(path)   # where writes went before .tmp/ existed
            elif _SHA256.match(entry.name) and entry.name[:2] == top.name and entry.is_file(follow_symlinks=False):
                files[entry.name] = path
            else:
                check.unknown.append(path)   # symlinks too: never followed, never deleted
    check.temp += _temp_files(root)
    return files


def check_store(db, *, fix: bool = False, grace: float = DEFAULT_GRACE_S) -> StoreCheck:
    """Compare the store with the ``images`` table; with ``fix``, delete leftovers older than
    ``grace`` seconds and mark rows whose bytes are missing or damaged as failed (rows are never deleted)."""
    import sqlalchemy as sa
    from .db import images, query_images   # here: db imports this module

    if grace < 0:
        raise ValueError("--grace must be 0 or more seconds")
    check = StoreCheck(db.store.root, fix, grace)
    # Rows first, files second: bytes a running load writes meanwhile look orphaned but are young.
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.sha256).where(   # not those a fix already marked
            images.c.reason.is_(None) | images.c.reason.not_in([MISSING_REASON, DAMAGED_REASON]))).all()
        named = set(conn.execute(sa.select(images.c.sha256).union(sa.select(query_images.c.sha256))).scalars())
    files = _scan(check.root, check)
    check.files = len(files)
    check.orphans = sorted(path for sha, path in files.items() if sha not in named)
    broken: dict[int, str] = {}
    for row in rows:
        path = files.get(row.sha256)
        if path is None:
            check.missing.append(row.id)
            broken[row.id] = MISSING_REASON
        elif _file_sha256(path) != row.sha256:
            check.damaged.append(row.id)
            broken[row.id] = DAMAGED_REASON
    if not fix:
        return check

    cutoff = time.time() - grace
    with db.engine.connect() as conn:   # a row committed since the scan claims its bytes after all
        orphan_shas = [p.name for p in check.orphans]
        claimed = {sha for i in range(0, len(orphan_shas), 500)
                   for sha in conn.execute(sa.select(images.c.sha256).where(
                       images.c.sha256.in_(orphan_shas[i:i + 500]))).scalars()}
    for path in check.temp + [p for p in check.orphans if p.name not in claimed]:
        if _delete_if_old(path, cutoff):
            check.deleted += 1
        elif path.exists():
            check.kept_young += 1
    with db.begin() as conn:
        for image_id, reason in broken.items():
            check.marked_failed += conn.execute(sa.update(images).where(images.c.id == image_id)
                                                .values(status="failed", reason=reason)).rowcount
    return check
