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
from pathlib import Path

from .errors import BadInput, LookalikeError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FANOUT = re.compile(r"^[0-9a-f]{2}$")
TEMP_DIR = ".tmp"
TEMP_PREFIX = ".tmp-"
DEFAULT_GRACE_S = 3600.0   # leftovers younger than this may belong to a running load: never deleted
HASH_CHUNK = 1 << 20
LISTED = 10                # paths listed per kind of problem in a check's report
MISSING_REASON = "missing from the image store"
DAMAGED_REASON = "damaged in the image store: its bytes do not hash to its sha256"


class StoreError(LookalikeError):
    """The store could not take bytes (disk full, read-only folder); the message says which.

    Not an OSError on purpose: it stops a run instead of failing one entry.
    """

    http_status = 507
    sqlstate = "58030"   # io_error


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
            raise BadInput(f"not a sha256 hex digest: {sha256[:80]!r}")
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
