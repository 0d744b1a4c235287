"""`lookalike store check`: the image store against the database's rows, after a crash or by hand.

Reads the ``images`` and ``query_images`` rows and the files under the store;
reports (and with ``fix`` repairs) leftovers, orphans and rows whose bytes are
missing or damaged. It lives apart from :mod:`lookalike.store`, which the
database module uses, so that neither imports the other.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .db import images, query_images
from .errors import BadInput
from .store import (DAMAGED_REASON, DEFAULT_GRACE_S, HASH_CHUNK, LISTED, MISSING_REASON, TEMP_DIR, TEMP_PREFIX,
                    _FANOUT, _SHA256, _delete_if_old, _temp_files)

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

    if grace < 0:
        raise BadInput("--grace must be 0 or more seconds")
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
