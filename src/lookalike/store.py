"""Content-addressed image store: the bytes of every loaded image, by sha256.

Files live at ``<root>/<sha[:2]>/<sha>``. Writes go to a temporary file that is
renamed into place, so a crash never leaves a half-written image under its
final name, and the same bytes are written once however often they are loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, sha256: str) -> Path:
        # Validate: a sha256 is the only thing ever joined to the store path.
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store ``data`` (idempotent) and return its sha256."""
        sha256 = sha256 or sha256_hex(data)
        target = self.path(sha256)
        if target.is_file():
            return sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {sha256[:12]}… is missing from the store at {self.root}") from None
