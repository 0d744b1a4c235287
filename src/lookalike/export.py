"""Export step: the unique images, in one of three layouts.

- ``train-test``: the split, as ``Train/<label>/…`` and ``Test/<label>/…`` (the default when a split exists);
- ``by-label``: ``<label>/…``, no split needed (the default when labels exist); unlabelled images left out;
- ``flat``: every unique image in the destination itself (the default for an unlabelled collection).

The destination is a local folder (a path or ``file://`` URL) or an Azure Blob
Storage container (``az://container/prefix``, the account from a connection
string in an environment variable). Each image is named by its sha256, by
its dHash (size 8) with ``name_by="dhash"``, or by its source's file name with
``name_by="source"``, with the extension of its real format. Beside the images
go two manifests: ``transferimages.txt`` (``url<TAB>folder<TAB>filename``, as in
the dHash lab) and ``manifest.csv`` (each image's path, hash, source and the
extra columns of the manifest it was loaded from, such as a SKU).

Exported are the unique images (ok, and not a non-keeper of the latest dedupe
run; in the train-test layout, those with a split). Objects are written concurrently; every
object is complete or absent (a local file is written under a temporary name
and renamed, a blob is committed in one request), so an interrupted export is
resumed by running it again: an object already there with the same size and
content hash is not written again. The manifests are written last, only when
every image is in place. Nothing at the destination is ever deleted.

Hostile destinations: a folder destination may be neither inside nor around the
image store; no write leaves it (symbolic links inside it are refused, object by
object); a manifest there that lookalike did not write is replaced only with
``force``. A label with no safe folder name (``..``, ``.``, or two labels that
sanitise to one folder) has its images skipped, with the reason in the summary,
while the other labels export.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
import sys
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import quote, unquote, urlparse

import sqlalchemy as sa
from tqdm import tqdm

from .config import mask_secrets
from .db import Database, image_hashes, images, is_unique_image, non_keepers, recorded_run, splits
from .errors import BadInput
from .steps import STEPS, default
from .images import EXTENSIONS
from .store import DEFAULT_GRACE_S, sha256_hex
from .workpool import completed

DEFAULT_CONCURRENCY = default("export", "concurrency")
CONNECTION_STRING_ENV = default("export", "connection_string_env")
NAME_BY = STEPS["export"].param("name_by").choices
LAYOUTS = STEPS["export"].param("layout").choices
DHASH_NAME = ("dhash_rowcol", 8)   # the hash kind and size that name_by="dhash" uses
SPLIT_FOLDERS = {"train": "Train", "test": "Test"}
TRANSFER_MANIFEST = "transferimages.txt"
CSV_MANIFEST = "manifest.csv"
CSV_COLUMNS = ("image_id", "label", "split", "path", "sha256", "byte_size", "source")

# By Pillow format name; anything else is sent as octet-stream.
CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                 "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff", "PPM": "image/x-portable-pixmap",
                 "TGA": "image/x-tga", "ICO": "image/vnd.microsoft.icon"}
MANIFEST_TYPES = {TRANSFER_MANIFEST: "text/plain; charset=utf-8", CSV_MANIFEST: "text/csv; charset=utf-8"}

# Azure's rule for container names: 3-63 of a-z, 0-9 and single hyphens, starting and ending alphanumeric.
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
# Characters a label may not keep in a path segment: separators, controls, and what Windows forbids.
_UNSAFE_IN_SEGMENT = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*]')
# What FolderTarget.put names a file while it is written; a kill -9 can leave one behind.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_AZURE_RETRY = dict(initial_backoff=1, increment_base=2, retry_total=3, random_jitter_range=1)
_AZURE_TIMEOUTS = dict(connection_timeout=10, read_timeout=60)


class ExportError(BadInput):
    """An export that cannot start (no split, bad destination, bad credentials); nothing was written."""


# ---------------------------------------------------------------- what to export

@dataclass(frozen=True)
class ExportObject:
    """One image as it is exported."""

    image_id: int
    label: str | None
    split: str | None   # train | test; None outside the train-test layout
    folder: str         # e.g. "Train/dotted/", "dotted/", "" (flat)
    name: str           # e.g. "<sha256>.jpg"
    sha256: str
    byte_size: int
    content_type: str
    source: str = ""    # where it was loaded from
    metadata: dict = field(default_factory=dict, compare=False)   # the extra columns of its load manifest (SKU, ...)

    @property
    def key(self) -> str:
        """The object's path under the destination."""
        return self.folder + self.name


@dataclass(frozen=True)
class ExportPlan:
    objects: tuple[ExportObject, ...]
    sha256_fallbacks: int                 # images named by sha256 because their dHash name collided
    renamed_labels: dict[str, str]        # label -> the folder name it was sanitised to
    skipped_labels: dict[str, tuple[int, str]]  # label -> (images, why) for labels with no safe folder name
    duplicates_left_out: int              # split images that are non-keepers of a later dedupe run
    unsplit: int                          # unique images without a split
    layout: str = "train-test"            # flat | by-label | train-test
    unlabelled: int = 0                   # by-label: unique images without a label, left out


def label_segment(label: str | None) -> str:
    """A label as one safe path segment: separators and control characters become ``_``.

    Raises :class:`ExportError` for labels that leave nothing usable (empty, ``.``, ``..``).
    """
    segment = _UNSAFE_IN_SEGMENT.sub("_", label or "").strip().rstrip(". ")
    if not segment or len(segment.encode()) > 255:
        raise ExportError(f"label {label!r} cannot be a folder name (empty, only dots, or over 255 bytes)")
    return segment


def plan_export(db: Database, *, name_by: str = "sha256", layout: str | None = None) -> ExportPlan:
    """Which images go where: one :class:`ExportObject` per unique image in ``layout``, by key.

    ``layout`` None: train-test when a split exists, else by-label when labels exist, else flat.
    """
    if name_by not in NAME_BY:
        raise ExportError(f"name_by must be one of {NAME_BY}, not {name_by!r}")
    if layout not in (None, *LAYOUTS):
        raise ExportError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    labelled = sa.and_(images.c.label.is_not(None), images.c.label != "")
    with db.engine.connect() as conn:
        has_split = conn.execute(sa.select(splits.c.image_id).limit(1)).first() is not None
        if layout is None:
            has_labels = conn.execute(sa.select(images.c.id).where(is_unique_image(), labelled).limit(1)).first()
            layout = "train-test" if has_split else "by-label" if has_labels else "flat"
        if layout == "train-test" and not has_split:
            raise ExportError("no split yet: run `lookalike split` first, or export with --layout by-label or flat")
        columns = (images.c.id, images.c.label, images.c.sha256, images.c.format, images.c.byte_size,
                   images.c.source, images.c.metadata)
        duplicates_left_out = unsplit = unlabelled = 0
        if layout == "train-test":
            rows = conn.execute(sa.select(*columns, splits.c.split)
                                .join_from(splits, images, splits.c.image_id == images.c.id)
                                .where(is_unique_image()).order_by(images.c.id)).all()
            duplicates_left_out = conn.execute(
                sa.select(sa.func.count()).select_from(splits).where(splits.c.image_id.in_(non_keepers()))
            ).scalar_one()
            unsplit = conn.execute(sa.select(sa.func.count()).select_from(images).where(
                is_unique_image(), ~sa.exists().where(splits.c.image_id == images.c.id))).scalar_one()
        else:
            wanted = sa.and_(is_unique_image(), labelled) if layout == "by-label" else is_unique_image()
            rows = conn.execute(sa.select(*columns, sa.null().label("split")).where(wanted)
                                .order_by(images.c.id)).all()
            if layout == "by-label":
                unlabelled = conn.execute(sa.select(sa.func.count()).select_from(images).where(
                    is_unique_image(), ~labelled)).scalar_one()
        dhashes = {}
        if name_by == "dhash":
            kind, size = DHASH_NAME
            dhashes = dict(conn.execute(
                sa.select(image_hashes.c.image_id, image_hashes.c.hex)
                .where(image_hashes.c.kind == kind, image_hashes.c.size == size)).all())

    # A label with no safe folder name of its own is left out alone; the other labels export.
    segments, reasons = {}, {}
    for label in sorted({row.label for row in rows}) if layout != "flat" else ():
        try:
            segments[label] = label_segment(label)
        except ExportError as exc:
            reasons[label] = str(exc)
    by_segment = defaultdict(list)
    for label, segment in segments.items():
        by_segment[segment].append(label)
    for segment, labels in by_segment.items():
        for label in labels if len(labels) > 1 else ():
            if label != segment:  # the label spelled exactly as the folder keeps it
                others = [other for other in labels if other != label]
                reasons[label] = f"label {label!r} would share the folder {segment!r} with {others}; rename one"
    per_label = Counter(row.label for row in rows)
    skipped = {label: (per_label[label], reason) for label, reason in sorted(reasons.items())}
    rows = [row for row in rows if row.label not in reasons]

    if name_by == "dhash":
        missing = sum(1 for row in rows if row.id not in dhashes)
        if missing:
            raise ExportError(f"{missing} images have no {DHASH_NAME[0]} size {DHASH_NAME[1]} hash: "
                              "run `lookalike hash` first, or name them by sha256")

    def folder(row) -> str:
        if layout == "flat":
            return ""
        label = segments[row.label] + "/"
        return label if layout == "by-label" else f"{SPLIT_FOLDERS[row.split]}/{label}"

    def extension(row) -> str:
        return EXTENSIONS.get(row.format, (row.format or "bin").lower())

    def name(row) -> str:
        stem = {"dhash": lambda: dhashes[row.id], "source": lambda: source_stem(row.source)}.get(
            name_by, lambda: None)()
        return f"{stem or row.sha256}.{extension(row)}"

    # A name taken twice in one folder would overwrite: those images keep their sha256 name.
    taken = Counter((folder(row), name(row)) for row in rows)
    objects, fallbacks = [], 0
    for row in rows:
        chosen = name(row)
        if taken[(folder(row), chosen)] > 1:
            chosen, fallbacks = f"{row.sha256}.{extension(row)}", fallbacks + 1
        objects.append(ExportObject(
            image_id=row.id, label=row.label, split=row.split, folder=folder(row), name=chosen,
            sha256=row.sha256, byte_size=row.byte_size,
            content_type=CONTENT_TYPES.get(row.format, "application/octet-stream"),
            source=row.source, metadata=json.loads(row.metadata) if row.metadata else {}))
    objects.sort(key=lambda o: o.key)
    return ExportPlan(tuple(objects), fallbacks,
                      {label: seg for label, seg in segments.items() if seg != label and label not in reasons},
                      skipped,
                      duplicates_left_out, unsplit, layout, unlabelled)


def source_stem(source: str) -> str | None:
    """The file name a source had, without its extension, as a safe name; None when nothing usable is left."""
    path = unquote(urlparse(source).path) if "://" in source else source
    stem = _UNSAFE_IN_SEGMENT.sub("_", os.path.splitext(path.replace("\\", "/").rsplit("/", 1)[-1])[0]).strip(". ")
    return stem if stem and len(stem.encode()) <= 200 else None


# ---------------------------------------------------------------- destinations

class Target(Protocol):
    display: str   # where, safe to print

    def open(self, *, dry_run: bool) -> None: ...
    def holds(self, key: str, size: int, sha256: str, content_type: str, data: Callable[[], bytes]) -> bool: ...
    def foreign(self, name: str) -> str | None: ...
    def put(self, key: str, data: bytes, sha256: str, content_type: str) -> None: ...
    def url(self, key: str) -> str: ...
    def keys(self, tops: set[str]) -> set[str]: ...
    def sweep(self, grace: float, tops: set[str]) -> int: ...
    def close(self) -> None: ...


class FolderTarget:
    """A local folder; each file is written under a temporary name and renamed into place.

    Every path below the folder is walked one name at a time from an open handle on
    the folder, never following a symbolic link, so no write can land outside it.
    """

    def __init__(self, root: Path, store: Path | None = None):
        self.root = Path(os.path.realpath(root.expanduser()))
        self.display = str(self.root)
        self._store = Path(os.path.realpath(store)) if store is not None else None
        self._fd: int | None = None

    def open(self, *, dry_run: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ExportError(f"{self.root} exists and is not a folder")
        store = self._store
        if store is not None and (self.root.is_relative_to(store) or store.is_relative_to(self.root)):
            where = "is inside" if self.root.is_relative_to(store) else "contains"
            raise ExportError(f"{self.root} {where} the image store {store}: export to a folder outside it")
        if not dry_run:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ExportError(f"cannot create {self.root}: {exc.strerror}") from None
        if self.root.is_dir():
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)

    def _folder(self, parts: list[str], *, create: bool) -> int | None:
        """A new handle on the folder ``parts`` below the root (None if missing and not ``create``)."""
        if self._fd is None:  # a dry run into a folder that does not exist yet
            if create:
                raise OSError(f"{self.root} is not open for writing")
            return None
        fd = os.dup(self._fd)
        try:
            for n, name in enumerate(parts):
                if create:
                    try:
                        os.mkdir(name, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if create:
                        raise
                    os.close(fd)
                    return None
                except OSError as exc:
                    raise _refusal(fd, name, "/".join(parts[:n + 1]), exc) from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _read(self, key: str, limit: int) -> bytes | None:
        """The first ``limit`` bytes of the regular file at ``key``, None if absent; a link is an error."""
        *parts, name = key.split("/")
        folder = self._folder(parts, create=False)
        if folder is None:
            return None
        try:
            try:
                # O_NONBLOCK: a named pipe planted here must not hang the export.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _refusal(folder, name, key, exc) from None
            with os.fdopen(fd, "rb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise OSError(f"{key} is not a regular file: refusing to replace it")
                return file.read(limit)
        finally:
            os.close(folder)

    def holds(self, key: str, size: int, sha256: str, content_type: str, data: Callable[[], bytes]) -> bool:
        found = self._read(key, size + 1)  # one byte more tells a longer file without reading it all
        return found is not None and len(found) == size and sha256_hex(found) == sha256

    def foreign(self, name: str) -> str | None:
        """Why the manifest file ``name`` is not one that lookalike wrote (None: absent, or ours)."""
        try:
            head = self._read(name, 64 * 1024)
        except OSError:
            return "is a symbolic link or not a regular file"
        if head is None or _is_our_manifest(name, head):
            return None
        return "was not written by lookalike"

    def put(self, key: str, data: bytes, sha256: str, content_type: str) -> None:
        *parts, name = key.split("/")
        folder = self._folder(parts, create=True)
        temporary = f".{name}.{uuid.uuid4().hex[:12]}.tmp"  # matches _TEMPORARY
        try:
            # Mode 0o666 so the file gets the user's umask, as a plain copy would.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=folder)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                # rename replaces a link at ``name`` itself; it never writes through one.
                os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with suppress(OSError):
                    os.unlink(temporary, dir_fd=folder)
                raise
        finally:
            os.close(folder)

    def url(self, key: str) -> str:
        return (self.root / key).as_uri()

    def keys(self, tops: set[str]) -> set[str]:
        """The files under the top folders ``tops`` ("": the root's own files, manifests aside)."""
        if self._fd is None:
            return set()
        # fwalk does not follow links, not even a linked Train/ itself.
        found = {f"{folder}/{name}" for top in tops - {""}
                 for folder, _, files, _ in os.fwalk(top, dir_fd=self._fd) for name in files
                 if not name.startswith(".")}
        if "" in tops:
            found |= {name for name in os.listdir(self._fd)
                      if not name.startswith(".") and name not in MANIFEST_TYPES
                      and stat.S_ISREG(os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode)}
        return found

    def sweep(self, grace: float, tops: set[str]) -> int:
        """Delete temporary files that an interrupted export left, once older than ``grace`` seconds.

        Younger ones may belong to an export running now. Returns how many were deleted.
        """
        if self._fd is None:
            return 0
        cutoff = time.time() - grace

        def sweep_in(folder: int, names: list[str]) -> int:
            removed = 0
            for name in filter(_TEMPORARY.match, names):
                with suppress(FileNotFoundError):
                    found = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    if stat.S_ISREG(found.st_mode) and found.st_mtime < cutoff:
                        os.unlink(name, dir_fd=folder)
                        removed += 1
            return removed

        # The manifests' folder, then the export's top folders (fwalk's handles live only while it walks).
        return sweep_in(self._fd, os.listdir(self._fd)) + sum(
            sweep_in(folder, names) for top in tops - {""}
            for _, _, names, folder in os.fwalk(top, dir_fd=self._fd))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _refusal(folder: int, name: str, shown: str, exc: OSError) -> OSError:
    """The clear error for a path below the destination that could not be opened."""
    with suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            return OSError(f"{shown} is a symbolic link: refusing to follow it out of the destination")
    if isinstance(exc, NotADirectoryError):
        return OSError(f"{shown} is not a folder")
    return OSError(f"cannot open {shown}: {exc.strerror or exc}")


def _is_our_manifest(name: str, head: bytes) -> bool:
    """Whether a manifest's first bytes are what :func:`manifest_texts` writes."""
    first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    if name == CSV_MANIFEST:
        return first.startswith(",".join(CSV_COLUMNS[:6]))   # older versions wrote no source column
    fields = first.split("\t")
    return not head or (len(fields) == 3 and "://" in fields[0] and (fields[1] == "" or fields[1].endswith("/")))


@dataclass(frozen=True)
class _Blob:
    size: int
    content_type: str | None
    md5: bytes | None
    sha256: str | None


class BlobTarget:
    """A container in Azure Blob Storage, through the official client and its retry policy."""

    def __init__(self, container: str, prefix: str, connection_string: str, *, concurrency: int,
                 create_container: bool, env_name: str):
        self.container_name, self.prefix = container, prefix
        self.display = f"az://{container}/{prefix}"
        self.create_container = create_container
        self._connection_string, self._env_name = connection_string, env_name
        self._concurrency = concurrency
        self._existing: dict[str, _Blob] = {}
        self._container = None

    def mask(self, text: str) -> str:
        """``text`` with the connection string's secrets hidden, however they appear."""
        text = mask_secrets(text)
        for part in self._connection_string.split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() in ("accountkey", "sharedaccesssignature") and len(value) >= 8:
                text = text.replace(value, "***")
        return text

    def open(self, *, dry_run: bool) -> None:
        from azure.core.exceptions import AzureError
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        try:
            service = BlobServiceClient.from_connection_string(
                self._connection_string, retry_policy=ExponentialRetry(**_AZURE_RETRY),
                transport=_transport(self._concurrency), **_AZURE_TIMEOUTS)
        except ValueError as exc:
            raise ExportError(f"${self._env_name} is not a usable storage connection string: "
                              f"{self.mask(str(exc))}") from None
        self._container = service.get_container_client(self.container_name)
        where = f"container {self.container_name!r} at {service.url}"
        try:
            exists = self._container.exists()
            if not exists and not self.create_container:
                raise ExportError(f"{where} does not exist: create it, or pass --create-container")
            if not exists and not dry_run:
                self._container.create_container()
            if exists:
                for blob in self._container.list_blobs(name_starts_with=self.prefix or None, include=["metadata"]):
                    settings = blob.content_settings
                    self._existing[blob.name[len(self.prefix):]] = _Blob(
                        blob.size, settings.content_type,
                        bytes(settings.content_md5) if settings.content_md5 else None,
                        (blob.metadata or {}).get("sha256"))
        except AzureError as exc:
            hint = (f" (check the account name and key in ${self._env_name})"
                    if getattr(exc, "status_code", None) in (401, 403) else "")
            raise ExportError(f"cannot use {where}: {self.mask(_azure_reason(exc))}{hint}") from None

    def holds(self, key: str, size: int, sha256: str, content_type: str, data: Callable[[], bytes]) -> bool:
        found = self._existing.get(key)
        if found is None or found.size != size or found.content_type != content_type:
            return False
        if found.sha256:  # set by us on upload: no need to read the bytes
            return found.sha256 == sha256
        return found.md5 is not None and found.md5 == hashlib.md5(data()).digest()

    def foreign(self, name: str) -> str | None:
        found = self._existing.get(name)
        return None if found is None or found.sha256 else "was not written by lookalike"  # we always set sha256

    def put(self, key: str, data: bytes, sha256: str, content_type: str) -> None:
        from azure.core.exceptions import AzureError
        from azure.storage.blob import ContentSettings

        settings = ContentSettings(content_type=content_type, content_md5=bytearray(hashlib.md5(data).digest()))
        try:
            self._container.upload_blob(self.prefix + key, data, overwrite=True, content_settings=settings,
                                        metadata={"sha256": sha256}, validate_content=True)
        except AzureError as exc:
            raise OSError(self.mask(_azure_reason(exc))) from None

    def url(self, key: str) -> str:
        return f"{self._container.url}/{quote(self.prefix + key, safe='/')}"

    def keys(self, tops: set[str]) -> set[str]:
        return {key for key in self._existing if key not in MANIFEST_TYPES
                and (key.split("/", 1)[0] if "/" in key else "") in tops}

    def sweep(self, grace: float, tops: set[str]) -> int:
        return 0  # a blob is committed in one request: nothing half-written to clean up

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


def _transport(concurrency: int):
    """The client's HTTP transport with a connection pool as big as the thread pool."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from urllib3.util.retry import Retry

    session = requests.Session()
    # Retries are the storage client's retry policy's job, not urllib3's.
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(concurrency, 10),
                                            max_retries=Retry(total=False, redirect=False, raise_on_status=False))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True)


def _azure_reason(exc: Exception) -> str:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the client gives a StorageErrorCode enum, or a plain string
    message = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
    return f"{code}: {message}" if code else f"{type(exc).__name__}: {message}"


def open_target(dest: str, *, concurrency: int = DEFAULT_CONCURRENCY, create_container: bool = False,
                connection_string_env: str = CONNECTION_STRING_ENV, store: Path | None = None) -> Target:
    """The destination named by ``dest``: a folder path, ``file://`` URL or ``az://container/prefix``.

    A folder may be neither inside nor around the image store at ``store``.
    """
    text = str(dest)
    scheme = urlparse(text).scheme.lower() if "://" in text else ""
    if scheme == "":
        return FolderTarget(Path(text), store)
    if scheme == "file":
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ExportError(f"file:// URLs must name a local path, not host {parsed.netloc!r}")
        return FolderTarget(Path(unquote(parsed.path)), store)
    if scheme != "az":
        raise ExportError(f"unsupported destination {text!r}: use a folder, file:///path or az://container/prefix")
    parsed = urlparse(text)
    container = parsed.netloc
    if not _CONTAINER.match(container):
        raise ExportError(f"{container!r} is not a valid container name (3-63 characters: a-z, 0-9, hyphens)")
    parts = [part for part in unquote(parsed.path).split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ExportError(f"the prefix in {text!r} may not contain '.' or '..' segments")
    connection_string = os.environ.get(connection_string_env, "").strip()
    if not connection_string:
        raise ExportError(f"set ${connection_string_env} to the storage account's connection string "
                          f"to export to {text}")
    return BlobTarget(container, "".join(part + "/" for part in parts), connection_string,
                      concurrency=concurrency, create_container=create_container, env_name=connection_string_env)


# ---------------------------------------------------------------- the step

@dataclass
class ExportSummary:
    destination: str
    dry_run: bool = False
    images: int = 0                 # images in the export
    uploaded: int = 0               # written by this run (or, in a dry run, that would be)
    already_there: int = 0          # same size and content already at the destination
    bytes_uploaded: int = 0
    seconds: float = 0.0
    manifests_written: int = 0      # of 2; 0 when unchanged, or when images failed
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason
    would_write: list[str] = field(default_factory=list)  # dry run: the keys it would write
    not_in_export: int = 0          # objects under Train/ and Test/ that this export does not list
    sha256_fallbacks: int = 0
    renamed_labels: dict[str, str] = field(default_factory=dict)
    temporaries_removed: int = 0    # files an interrupted export left behind, deleted by this one
    skipped_labels: dict[str, tuple[int, str]] = field(default_factory=dict)  # label -> (images, why)
    duplicates_left_out: int = 0
    unsplit: int = 0
    layout: str = "train-test"
    unlabelled: int = 0
    interrupted: bool = False

    def lines(self) -> list[str]:
        megabytes = self.bytes_uploaded / 1e6
        if self.dry_run:
            out = [f"dry run, nothing written: {self.uploaded} of {self.images} images ({megabytes:.1f} MB) "
                   f"would be written to {self.destination}, {self.already_there} already there"]
            out += [f"  would write {key}" for key in self.would_write]
        else:
            out = [f"exported {self.images} images ({self.layout} layout) to {self.destination}: "
                   f"{self.uploaded} written "
                   f"({megabytes:.1f} MB), {self.already_there} already there, {len(self.failed)} failed, "
                   f"in {self.seconds:.1f} s"]
            if self.images and not self.failed and not self.interrupted:
                out.append(f"  manifests: {TRANSFER_MANIFEST}, {CSV_MANIFEST} "
                           f"({'written' if self.manifests_written else 'unchanged'})")
        out += [f"  failed: {key}: {reason}" for key, reason in sorted(self.failed.items())[:20]]
        if len(self.failed) > 20:
            out.append(f"  … and {len(self.failed) - 20} more failures")
        if self.failed:
            out.append("  manifests not written: run the same command again to retry the failures")
        if self.sha256_fallbacks:
            out.append(f"  {self.sha256_fallbacks} images named by sha256: their name was taken twice "
                       "in one folder")
        out += [f"  label {label!r} exported as folder {segment!r}" for label, segment in self.renamed_labels.items()]
        out += [f"  skipped {n} images: {reason}" for n, reason in self.skipped_labels.values()]
        if self.duplicates_left_out:
            out.append(f"  left out: {self.duplicates_left_out} split images that the latest dedupe run marks as "
                       "duplicates (run `lookalike split` again)")
        if self.unsplit:
            out.append(f"  left out: {self.unsplit} unique images without a split (no label, or loaded after "
                       "the split: run `lookalike split` again)")
        if self.unlabelled:
            out.append(f"  left out: {self.unlabelled} unique images without a label (--layout flat exports them)")
        if self.not_in_export:
            out.append(f"  {self.not_in_export} objects in the export's folders are not in this export "
                       "(left in place)")
        if self.temporaries_removed:
            out.append(f"  removed {self.temporaries_removed} temporary files that an interrupted export left")
        if self.interrupted:
            out.append("interrupted: every object listed as written is complete; run the same command to finish")
        return out


def export_images(db: Database, dest: str, *, layout: str | None = None,
                  name_by: str = default("export", "name_by"), dry_run: bool = False,
                  concurrency: int = DEFAULT_CONCURRENCY, progress: bool | None = None,
                  create_container: bool = False, connection_string_env: str = CONNECTION_STRING_ENV,
                  force: bool = False) -> ExportSummary:
    """Write the unique images of the split, and their manifests, to ``dest``; return what happened.

    ``dest`` is a folder path, ``file://`` URL, or ``az://container/prefix`` (connection
    string in the environment variable ``connection_string_env``; the container must
    exist unless ``create_container``). Objects already there with the same content are
    not written again, so a re-run resumes an interrupted export. ``dry_run`` lists what
    would be written and writes nothing. A manifest at ``dest`` that lookalike did not
    write is an error unless ``force``; images of a label with no safe folder name are
    skipped, and the summary says why.
    """
    if concurrency < 1:
        raise ExportError("concurrency must be at least 1")
    started = time.monotonic()
    plan = plan_export(db, name_by=name_by, layout=layout)
    target = open_target(dest, concurrency=concurrency, create_container=create_container,
                         connection_string_env=connection_string_env, store=db.store.root)
    summary = ExportSummary(target.display, dry_run=dry_run, images=len(plan.objects),
                            sha256_fallbacks=plan.sha256_fallbacks, renamed_labels=dict(plan.renamed_labels),
                            skipped_labels=dict(plan.skipped_labels),
                            duplicates_left_out=plan.duplicates_left_out, unsplit=plan.unsplit,
                            layout=plan.layout, unlabelled=plan.unlabelled)
    params = {"dest": target.display, "layout": plan.layout, "name_by": name_by, "concurrency": concurrency,
              "force": force}
    with nullcontext({}) if dry_run else recorded_run(db, "export", params) as counts:
        try:
            target.open(dry_run=dry_run)
            for name in MANIFEST_TYPES if not force else ():
                if reason := target.foreign(name):
                    raise ExportError(f"{target.display.rstrip('/')}/{name} {reason}: move it away, "
                                      "or pass --force to overwrite it")
            _export_objects(db, target, plan.objects, summary, dry_run=dry_run, concurrency=concurrency,
                            progress=sys.stderr.isatty() if progress is None else progress)
            if not summary.failed and not summary.interrupted:
                _write_manifests(target, plan.objects, summary, dry_run=dry_run)
                tops = {o.key.split("/", 1)[0] if "/" in o.key else "" for o in plan.objects}
                summary.not_in_export = len(target.keys(tops) - {o.key for o in plan.objects})
                if not dry_run:
                    summary.temporaries_removed = target.sweep(DEFAULT_GRACE_S, tops)
        finally:
            target.close()
            summary.seconds = time.monotonic() - started
        counts.update(images=summary.images, uploaded=summary.uploaded, already_there=summary.already_there,
                      bytes=summary.bytes_uploaded, failed=len(summary.failed), interrupted=summary.interrupted,
                      skipped=sum(n for n, _ in summary.skipped_labels.values()))
    return summary


def _export_one(db: Database, target: Target, obj: ExportObject, dry_run: bool) -> int | None:
    """Write one image unless it is already there; the bytes written (None when it was there)."""
    if target.holds(obj.key, obj.byte_size, obj.sha256, obj.content_type, lambda: db.store.get(obj.sha256)):
        return None
    if dry_run:
        return obj.byte_size
    data = db.store.get(obj.sha256)
    if sha256_hex(data) != obj.sha256:
        raise OSError(f"the store's copy of image {obj.image_id} is corrupt (sha256 differs)")
    target.put(obj.key, data, obj.sha256, obj.content_type)
    return len(data)


def _export_objects(db: Database, target: Target, objects: tuple[ExportObject, ...], summary: ExportSummary, *,
                    dry_run: bool, concurrency: int, progress: bool) -> None:
    bar = tqdm(total=len(objects), unit="img", desc="export", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="export")
    try:
        for obj, future in completed(pool, lambda obj: _export_one(db, target, obj, dry_run), objects,
                                     window=concurrency * 4):
            try:
                written = future.result()
            except (OSError, ValueError) as exc:
                summary.failed[obj.key] = str(exc) or type(exc).__name__
            else:
                if written is None:
                    summary.already_there += 1
                else:
                    summary.uploaded += 1
                    summary.bytes_uploaded += written
                    if dry_run:
                        summary.would_write.append(obj.key)
            bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary.would_write.sort()


def manifest_texts(target: Target, objects: tuple[ExportObject, ...]) -> dict[str, str]:
    """The two manifests' contents, by file name: the lab's transfer list and a CSV of every image."""
    transfer = "".join(f"{target.url(o.key)}\t{o.folder}\t{o.name}\n" for o in objects)
    # Then one column per metadata key of the load manifest (SKU, ...); a key named like ours gets a prefix.
    keys = sorted({key for o in objects for key in o.metadata})
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + tuple(f"metadata.{k}" if k in CSV_COLUMNS else k for k in keys))
    writer.writerows((o.image_id, o.label, o.split, o.key, o.sha256, o.byte_size, o.source,
                      *(o.metadata.get(k, "") for k in keys)) for o in objects)
    return {TRANSFER_MANIFEST: transfer, CSV_MANIFEST: table.getvalue()}


def _write_manifests(target: Target, objects: tuple[ExportObject, ...], summary: ExportSummary, *,
                     dry_run: bool) -> None:
    for name, text in manifest_texts(target, objects).items():
        data = text.encode()
        sha, content_type = sha256_hex(data), MANIFEST_TYPES[name]
        try:
            held = target.holds(name, len(data), sha, content_type, lambda: data)
        except OSError:  # a link or other odd file in its place, let through by force: replaced, never followed
            held = False
        if held:
            continue
        try:
            if not dry_run:
                target.put(name, data, sha, content_type)
        except OSError as exc:
            summary.failed[name] = str(exc) or type(exc).__name__
            continue
        summary.manifests_written += 1
        if dry_run:
            summary.would_write.append(name)
