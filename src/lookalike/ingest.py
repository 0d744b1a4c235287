"""Load step: images with their labels into the database and the image store.

Sources are a folder tree (one sub-folder per label, searched recursively), a
manifest (``label<TAB>url`` lines as in the original ``fashion_texture_urls.tsv``,
or CSV/TSV with a header), or a list of (source, label) pairs from Python.

Fetching and decoding run in a thread pool; only the calling thread writes to
the database, in small transactions, so an interrupted load keeps everything
committed and a re-run fetches only what is missing.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlparse

import httpx
import sqlalchemy as sa
from tqdm import tqdm

from .db import Database, image_sources, images, now, to_json
from .images import ImageError, probe
from .store import sha256_hex

DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0          # seconds to connect, and between bytes
DEFAULT_DOWNLOAD_DEADLINE = 120.0  # seconds for a whole download
DEFAULT_RETRIES = 3
MAX_REDIRECTS = 5
MANIFEST_SUFFIXES = {".tsv", ".csv", ".txt"}
URL_COLUMNS = ("url", "path", "source", "uri", "file", "image", "image_url", "imageurl")
COMMIT_EVERY = 200   # rows per transaction
COMMIT_SECONDS = 2.0


class LoadError(ValueError):
    """Input that cannot be loaded at all (bad manifest, missing folder); nothing was written."""


class FetchError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Item:
    source: str            # absolute path or URL: the key that makes re-runs resumable
    label: str | None
    metadata: dict[str, str] | None = None


@dataclass
class LoadSummary:
    loaded: int = 0             # new images stored
    already_present: int = 0    # new source, bytes already stored as an image
    skipped: int = 0            # source already loaded by an earlier run
    failed: Counter = field(default_factory=Counter)  # reason -> count (fetch or decode)
    interrupted: bool = False

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def lines(self) -> list[str]:
        out = [f"loaded {self.loaded} new images, {self.already_present} already present, "
               f"{self.skipped} sources loaded before, {self.failed_total} failed"]
        out += [f"  failed: {n:>5}  {reason}" for reason, n in self.failed.most_common()]
        if self.interrupted:
            out.append("interrupted: what is listed above is committed; run the same command to finish")
        return out


# ---------------------------------------------------------------- discovering sources

def discover(source: str | Path, *, label_column: str | None = None) -> list[Item]:
    """The items named by a folder tree, a manifest file, or a single URL."""
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        raise LoadError("give a folder or a manifest file; to load URLs, list them in a manifest")
    path = Path(unquote(urlparse(text).path) if text.startswith("file://") else text).expanduser()
    if path.is_dir():
        return _folder_items(path)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise LoadError(f"{path} is a file but not a manifest (.tsv, .csv or .txt)")
        return read_manifest(path, label_column=label_column)
    raise LoadError(f"no such folder or manifest: {path}")


def _folder_items(root: Path) -> list[Item]:
    # Label = the top-level sub-folder; files directly under root have no label and are skipped.
    items = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2 or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        items.append(Item(str(path.resolve()), rel.parts[0]))
    if not items:
        raise LoadError(f"{root} has no files in label sub-folders (expected {root}/<label>/<image>)")
    return items


def read_manifest(path: Path, *, label_column: str | None = None) -> list[Item]:
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LoadError(f"{path} is empty")
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [cell.strip() for cell in rows[0]]
    lowered = [cell.lower() for cell in header]
    url_index = next((lowered.index(c) for c in URL_COLUMNS if c in lowered), None)
    wanted_label = (label_column or "label").lower()
    base = path.parent.resolve()

    if url_index is None and label_column is None:
        # Headerless: label<TAB>url, exactly the original fashion_texture_urls.tsv.
        items = []
        for number, row in enumerate(rows, start=1):
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise LoadError(f"{path.name} line {number}: expected 'label{'<TAB>' if delimiter == chr(9) else ','}"
                                f"url-or-path', got {len(row)} field(s)")
            items.append(Item(_absolute(row[1].strip(), base), row[0].strip()))
        return _unique(items)

    if url_index is None:
        raise LoadError(f"{path.name}: no url/path column in header {header}; expected one of {list(URL_COLUMNS)}")
    if wanted_label not in lowered:
        raise LoadError(f"{path.name}: no {label_column or 'label'!r} column in header {header}"
                        + ("" if label_column else "; name it with --label-column"))
    label_index = lowered.index(wanted_label)
    items = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise LoadError(f"{path.name} line {number}: {len(row)} fields, header has {len(header)}")
        extra = {header[i]: row[i] for i in range(len(header)) if i not in (url_index, label_index) and row[i] != ""}
        items.append(Item(_absolute(row[url_index].strip(), base), row[label_index].strip() or None, extra or None))
    return _unique(items)


def _absolute(value: str, base: Path) -> str:
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        seen.setdefault(item.source, item)
    return list(seen.values())


# ---------------------------------------------------------------- fetching

@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DOWNLOAD_DEADLINE
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.5


def make_client(limits: FetchLimits, concurrency: int = DEFAULT_CONCURRENCY) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(limits.timeout), follow_redirects=True, max_redirects=MAX_REDIRECTS,
        limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency),
        headers={"User-Agent": "lookalike/0.1 (+image loader)"},
    )


def fetch(source: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    """The bytes of a path, file:// URL or http(s) URL, within ``limits``; FetchError otherwise."""
    scheme = urlparse(source).scheme.lower() if "://" in source else ""
    if scheme in ("", "file"):
        path = Path(unquote(urlparse(source).path)) if scheme == "file" else Path(source)
        try:
            if path.stat().st_size > limits.max_bytes:
                raise FetchError(f"too large: over {limits.max_bytes} bytes")
            return path.read_bytes()
        except FileNotFoundError:
            raise FetchError("file not found") from None
        except IsADirectoryError:
            raise FetchError("is a directory") from None
        except PermissionError:
            raise FetchError("permission denied") from None
    if scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {scheme!r} (only http, https and file)")
    return _download(source, client, limits)


def _download(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    last_reason = "failed"
    for attempt in range(limits.retries + 1):
        if attempt:
            time.sleep(limits.backoff * 2 ** (attempt - 1))
        try:
            return _download_once(url, client, limits)
        except _Retryable as exc:
            last_reason = exc.reason
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})") from None
        except httpx.TimeoutException:
            last_reason = "timed out"
        except httpx.TransportError as exc:
            last_reason = f"unreachable: {type(exc).__name__}"
    raise FetchError(f"{last_reason} (after {limits.retries + 1} attempts)")


class _Retryable(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _download_once(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    started = time.monotonic()
    with client.stream("GET", url) as response:
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise FetchError(f"HTTP {status}")
        if status != 200:
            raise FetchError(f"unexpected HTTP {status}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(f"too large: {int(declared)} bytes declared, limit {limits.max_bytes}")
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > limits.max_bytes:
                raise FetchError(f"too large: over {limits.max_bytes} bytes")
            if time.monotonic() - started > limits.deadline:
                raise FetchError(f"too slow: not finished in {limits.deadline:g} s")
        return bytes(body)


# ---------------------------------------------------------------- loading

@dataclass
class _Fetched:
    item: Item
    data_sha: str | None = None
    byte_size: int = 0
    info: object | None = None   # ImageInfo when decodable
    decode_reason: str | None = None
    fetch_reason: str | None = None


def _fetch_and_store(item: Item, db: Database, client: httpx.Client, limits: FetchLimits) -> _Fetched:
    try:
        data = fetch(item.source, client, limits)
    except FetchError as exc:
        return _Fetched(item, fetch_reason=exc.reason)
    result = _Fetched(item, data_sha=db.store.put(data, sha256_hex(data)), byte_size=len(data))
    try:
        result.info = probe(data)
    except ImageError as exc:
        result.decode_reason = exc.reason
    return result


def load_images(db: Database, source: str | Path | Iterable[Item], *, label_column: str | None = None,
                concurrency: int = DEFAULT_CONCURRENCY, limits: FetchLimits = FetchLimits(),
                progress: bool | None = None) -> LoadSummary:
    """Load every image named by ``source`` that is not loaded yet; return what happened.

    Re-running does only the missing work: sources already fetched are skipped,
    sources that failed to fetch are tried again.
    """
    items = discover(source, label_column=label_column) if isinstance(source, (str, Path)) else _unique(list(source))
    if concurrency < 1:
        raise LoadError("concurrency must be at least 1")
    summary = LoadSummary()
    with db.engine.connect() as conn:
        done = set(conn.execute(sa.select(image_sources.c.source).where(image_sources.c.status == "ok")).scalars())
    todo = [item for item in items if item.source not in done]
    summary.skipped = len(items) - len(todo)
    if progress is None:
        progress = sys.stderr.isatty()

    pending_rows: list[_Fetched] = []
    order = _InputOrder({item.source: i for i, item in enumerate(todo)})
    last_commit = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc="load", disable=not progress, leave=False)
    client = make_client(limits, concurrency)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load")
    queue = iter(todo)
    in_flight: set[Future] = set()
    try:
        while True:
            # Bounded window: memory stays flat however long the list is.
            while len(in_flight) < concurrency * 4:
                item = next(queue, None)
                if item is None:
                    break
                in_flight.add(pool.submit(_fetch_and_store, item, db, client, limits))
            if not in_flight:
                break
            finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                pending_rows.append(future.result())
                bar.update(1)
            if len(pending_rows) >= COMMIT_EVERY or time.monotonic() - last_commit > COMMIT_SECONDS:
                _record(db, pending_rows, summary, order)
                pending_rows, last_commit = [], time.monotonic()
        _record(db, pending_rows, summary, order)
    except KeyboardInterrupt:
        summary.interrupted = True
        for future in in_flight:
            future.cancel()
        _record(db, pending_rows, summary, order)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()
        bar.close()
    return summary


@dataclass
class _InputOrder:
    """Downloads finish in any order; the same bytes under two sources of one load must
    still get the label of the source listed first, whichever finished first."""

    position: dict[str, int]                                 # source -> index in the input
    owner: dict[str, int] = field(default_factory=dict)      # sha256 -> index of the source its row has


def _record(db: Database, results: list[_Fetched], summary: LoadSummary, order: _InputOrder) -> None:
    """Write one batch in one transaction: images first, then the sources that point at them."""
    if not results:
        return
    stamp = now()
    with db.begin() as conn:
        for r in results:
            item = r.item
            image_id = None
            if r.data_sha is not None:
                existing = conn.execute(sa.select(images.c.id).where(images.c.sha256 == r.data_sha)).scalar()
                if existing is None:
                    info = r.info
                    image_id = conn.execute(sa.insert(images).values(
                        sha256=r.data_sha, label=item.label, source=item.source,
                        width=getattr(info, "width", None), height=getattr(info, "height", None),
                        format=getattr(info, "format", None), byte_size=r.byte_size,
                        status="ok" if info else "failed", reason=r.decode_reason,
                        loaded_at=stamp, metadata=to_json(item.metadata),
                    ).returning(images.c.id)).scalar_one()
                    order.owner[r.data_sha] = order.position[item.source]
                    if info:
                        summary.loaded += 1
                    else:
                        summary.failed[r.decode_reason] += 1
                else:
                    image_id = existing
                    summary.already_present += 1
                    if order.position[item.source] < order.owner.get(r.data_sha, -1):  # listed earlier, came later
                        conn.execute(sa.update(images).where(images.c.id == existing).values(
                            label=item.label, source=item.source, metadata=to_json(item.metadata)))
                        order.owner[r.data_sha] = order.position[item.source]
            else:
                summary.failed[r.fetch_reason] += 1
            values = dict(image_id=image_id, label=item.label,
                          status="ok" if r.data_sha else "failed", reason=r.fetch_reason,
                          loaded_at=stamp, metadata=to_json(item.metadata))
            updated = conn.execute(sa.update(image_sources).where(image_sources.c.source == item.source)
                                   .values(**values)).rowcount
            if not updated:
                conn.execute(sa.insert(image_sources).values(source=item.source, **values))
