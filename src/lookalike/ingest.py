"""Load step: images with their labels into the database and the image store.

Sources are a folder tree (one sub-folder per label, searched recursively), a
manifest (``label<TAB>url`` lines as in the original ``fashion_texture_urls.tsv``,
or CSV/TSV with a header), or a list of (source, label) pairs from Python.

Fetching and decoding run in a thread pool; only the calling thread writes to
the database, in small transactions, so an interrupted load keeps everything
committed and a re-run fetches only what is missing. One bad entry (a bad
manifest line, an unreadable file, a dead URL) is recorded with its reason and
never stops the load.

:func:`fetch` is the one fetch policy for every path that reads a file or URL:
local files must be regular files under the size cap; a URL gets one deadline
for the whole request and, where private addresses are refused, is connected
to the very address that was checked.
"""

from __future__ import annotations

import csv
import errno
import ipaddress
import os
import socket
import stat
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote_to_bytes, urlparse

import httpcore
import httpx
import sqlalchemy as sa
from tqdm import tqdm

from .db import Database, image_sources, images, now, to_json
from .images import ImageError, probe
from .store import sha256_hex

DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0          # seconds to connect, and between bytes
DEFAULT_DOWNLOAD_DEADLINE = 120.0  # seconds for everything one URL takes: connect, headers, redirects, body, retries
DEFAULT_RETRIES = 3
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_LINE_CHARS = 8192           # a manifest line; bounds every field stored from it
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


class Refused(FetchError):
    """The source itself is not acceptable (a bad URL, scheme or address), as opposed to failing to fetch."""


@dataclass(frozen=True)
class Item:
    source: str            # absolute path or URL; undecodable bytes of a path kept as surrogates (see _fs)
    label: str | None
    metadata: dict[str, str] | None = None
    line: int | None = None    # its manifest line
    error: str | None = None   # why its manifest line is not an entry

    @property
    def key(self) -> str:
        """The source as stored, the key that makes re-runs resumable: undecodable bytes backslash-escaped."""
        return _text(self.source)


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


# ---------------------------------------------------------------- names
# Paths travel as str with undecodable bytes as surrogates, and reach the OS as
# UTF-8 bytes: the same names whatever the locale (a C-locale PostgreSQL backend
# runs Python with an ASCII filesystem encoding).

def _fs(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _str(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _text(value: str | bytes) -> str:
    """Text any database takes: undecodable bytes written as ``\\xff``."""
    raw = value if isinstance(value, bytes) else _fs(value)
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- discovering sources

def discover(source: str | Path, *, label_column: str | None = None) -> list[Item]:
    """The items named by a folder tree or a manifest file (a path or a file:// URL)."""
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        raise LoadError("give a folder or a manifest file; to load URLs, list them in a manifest")
    raw = os.path.abspath(os.path.expanduser(
        unquote_to_bytes(urlparse(text).path) if text.startswith("file://") else _fs(text)))
    if os.path.isdir(raw):
        return _folder_items(raw)
    if not os.path.lexists(raw):
        raise LoadError(f"no such folder or manifest: {_text(raw)}")
    if os.path.splitext(raw)[1].lower() not in {_fs(s) for s in MANIFEST_SUFFIXES}:
        raise LoadError(f"{_text(raw)} is a file but not a manifest (.tsv, .csv or .txt)")
    return read_manifest(Path(_str(raw)), label_column=label_column)


def _folder_items(root: bytes) -> list[Item]:
    # Label = the top-level sub-folder; files directly under root have no label and are skipped.
    # Anything that is not a folder is an entry: fetch says why a pipe or a symlink loop cannot be read.
    root = os.path.realpath(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(b".")]
        rel = os.path.relpath(folder, root).split(os.sep.encode())
        if rel == [b"."]:
            continue
        found += [(*rel, name) for name in names if not name.startswith(b".")]
    if not found:
        raise LoadError(f"{_text(root)} has no files in label sub-folders (expected {_text(root)}/<label>/<image>)")
    return [Item(_str(os.path.realpath(os.path.join(root, *parts))), _text(parts[0])) for parts in sorted(found)]


def read_manifest(path: Path, *, label_column: str | None = None) -> list[Item]:
    """The entries of a manifest, one per non-blank line, in order.

    A line that is not an entry becomes an item with ``error`` set (the load records it
    as failed under ``<manifest>:<line>``); a manifest with no entry at all is a LoadError.
    Errors name the line and what is wrong, never the line's text: a manifest may be a
    file the caller could not otherwise read.
    """
    try:
        data = read_file(str(path), MAX_MANIFEST_BYTES)
    except FetchError as exc:
        raise LoadError(f"cannot read manifest {_text(str(path))}: {exc.reason}") from None
    # Physical lines, numbered as an editor shows them; a quote never joins two lines.
    numbered = [(n, line.rstrip("\r")) for n, line in enumerate(_str(data.removeprefix(b"\xef\xbb\xbf")).split("\n"), 1)
                if line.strip()]
    if not numbered:
        raise LoadError(f"{path.name} is empty")
    first_number, first = numbered[0]
    delimiter = "\t" if "\t" in first or path.suffix.lower() == ".tsv" else ","
    header = _header(first, delimiter)
    lowered = [cell.lower() for cell in header]
    url_index = next((lowered.index(c) for c in URL_COLUMNS if c in lowered), None)
    base = _fs(str(path.parent))

    if url_index is None and label_column is None:
        # Headerless: label<TAB>url, exactly the original fashion_texture_urls.tsv (no CSV quoting).
        def entry(number: int, line: str) -> Item:
            fields = [f.strip() for f in (line.split("\t") if delimiter == "\t" else line.split(",", 1))]
            if len(fields) != 2 or not all(fields):
                raise _BadLine(f"expected 'label{'<TAB>' if delimiter == chr(9) else ','}url-or-path', "
                               f"got {len(fields)} field(s)")
            return Item(_absolute(fields[1], base), _text(fields[0]), line=number)
        items = _entries(path, numbered, entry)
    else:
        if url_index is None:
            raise LoadError(f"{path.name}: the header (line {first_number}) has no url/path column; "
                            f"expected one of {list(URL_COLUMNS)}")
        wanted = (label_column or "label").lower()
        if wanted not in lowered:
            raise LoadError(f"{path.name}: the header (line {first_number}) has no {label_column or 'label'!r} "
                            "column" + ("" if label_column else "; name it with --label-column"))
        label_index = lowered.index(wanted)

        def entry(number: int, line: str) -> Item:
            row = _csv_line(line, delimiter)
            if len(row) != len(header):
                raise _BadLine(f"{len(row)} fields, header has {len(header)}")
            if not row[url_index].strip():
                raise _BadLine("empty url/path")
            extra = {_text(header[i]): _text(row[i]) for i in range(len(header))
                     if i not in (url_index, label_index) and row[i] != ""}
            return Item(_absolute(row[url_index].strip(), base), _text(row[label_index].strip()) or None,
                        extra or None, line=number)
        items = _entries(path, numbered[1:], entry)
    return _unique(items)


class _BadLine(Exception):
    pass


def _header(line: str, delimiter: str) -> list[str]:
    try:
        return [cell.strip() for cell in _csv_line(line, delimiter)]
    except _BadLine:
        return []  # not a header: a headerless manifest says what is wrong with the line


def _csv_line(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error:
        raise _BadLine("unbalanced quote (a quoted field cannot span lines)") from None


def _entries(path: Path, numbered: list[tuple[int, str]], entry) -> list[Item]:
    items, bad = [], None
    for number, line in numbered:
        try:
            if len(line) > MAX_LINE_CHARS:
                raise _BadLine(f"line too long (over {MAX_LINE_CHARS} characters)")
            if "\0" in line:
                raise _BadLine("NUL character in line")
            items.append(entry(number, line))
        except _BadLine as exc:
            reason = str(exc)
            bad = bad or f"line {number}: {reason}"
            items.append(Item(f"{path}:{number}", None, line=number, error=f"manifest line is not an entry: {reason}"))
    if all(item.error for item in items):
        raise LoadError(f"{path.name}: no line is an entry ({bad})" if bad else f"{path.name} has no entries")
    return items


def _absolute(value: str, base: bytes) -> str:
    if "://" in value:
        return value
    # realpath, not Path.resolve: a symlink loop or an over-long name is left for fetch to report.
    return _str(os.path.realpath(os.path.join(base, os.path.expanduser(_fs(value)))))


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        seen.setdefault(item.key, item)
    return list(seen.values())


# ---------------------------------------------------------------- fetching

@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DOWNLOAD_DEADLINE
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.5


def make_client(limits: FetchLimits, concurrency: int = DEFAULT_CONCURRENCY, *,
                allow_private: bool = True) -> httpx.Client:
    """An HTTP client for :func:`fetch`; ``allow_private=False`` refuses loopback, private and other
    non-public addresses, for every connection including redirects."""
    pool = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    return httpx.Client(
        transport=_PinnedTransport(pool, allow_private), timeout=httpx.Timeout(limits.timeout),
        follow_redirects=True, max_redirects=MAX_REDIRECTS,
        headers={"User-Agent": "lookalike/0.1 (+image loader)"},
    )


def fetch(source: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    """The bytes of a path, file:// URL or http(s) URL, within ``limits``; FetchError otherwise."""
    if "://" not in source:
        return read_file(source, limits.max_bytes)
    try:
        parts = urlparse(source)
    except ValueError:
        raise Refused("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return read_file(_str(unquote_to_bytes(parts.path)), limits.max_bytes)
    if scheme not in ("http", "https"):
        raise Refused(f"unsupported URL scheme {_short(scheme)!r} (only http, https and file)")
    token = _deadline.set(time.monotonic() + limits.deadline)
    try:
        return _download(source, client, limits)
    finally:
        _deadline.reset(token)


def read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FetchError (naming no content) otherwise."""
    name = os.path.abspath(_fs(path))
    try:
        # stat first, so a device is never opened; O_NONBLOCK, so a file swapped for a pipe can't block the open.
        mode = os.stat(name).st_mode
        if not stat.S_ISREG(mode):
            raise FetchError(_not_regular(mode))
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FetchError(_os_reason(exc)) from None
    except ValueError:
        raise FetchError("invalid file name (NUL character)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(_not_regular(info.st_mode))
        if info.st_size > max_bytes:
            raise FetchError(f"too large: {info.st_size} bytes, limit {max_bytes}")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):  # the cap holds as the file grows
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"too large: over {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise FetchError(_os_reason(exc)) from None
    finally:
        os.close(fd)


_OS_REASONS = {errno.ENOENT: "file not found", errno.ENOTDIR: "file not found", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ELOOP: "symlink loop", errno.EISDIR: "is a directory",
               errno.ENAMETOOLONG: "file name too long"}


def _os_reason(exc: OSError) -> str:
    # Never str(exc): it carries the path. The errno says enough.
    return _OS_REASONS.get(exc.errno) or f"cannot read: {os.strerror(exc.errno).lower() if exc.errno else 'I/O error'}"


def _not_regular(mode: int) -> str:
    return "is a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _download(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    last_reason, tries = "failed", 0
    for attempt in range(limits.retries + 1):
        if attempt:
            pause = limits.backoff * 2 ** (attempt - 1)
            if time.monotonic() + pause >= _deadline.get():
                break  # no time left for another try
            time.sleep(pause)
        tries += 1
        try:
            return _download_once(url, client, limits)
        except _Retryable as exc:
            last_reason = exc.reason
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})") from None
        except httpx.UnsupportedProtocol:
            raise Refused("redirected to an unsupported URL scheme (only http and https)") from None
        except httpx.InvalidURL:
            raise Refused("not a valid URL") from None
        except httpx.TimeoutException:
            if time.monotonic() >= _deadline.get():
                raise FetchError(f"too slow: not finished in {limits.deadline:g} s") from None
            last_reason = "timed out"
        except httpx.TransportError as exc:
            last_reason = f"unreachable: {type(exc).__name__}"
    raise FetchError(f"{last_reason} (after {tries} attempt{'s' if tries > 1 else ''})")


class _Retryable(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _download_once(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
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
        return bytes(body)


# The monotonic time by which the current fetch must be done; every socket step is cut to it.
_deadline: ContextVar[float] = ContextVar("lookalike_fetch_deadline", default=float("inf"))


def _time_left(timeout: float | None) -> float | None:
    """The timeout for one socket step: its own, cut to what is left until the fetch's deadline."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends by the fetch's deadline,
    so a server that sends its headers (or anything) a byte at a time cannot stretch it."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _time_left(timeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses ``host`` resolves to, each checked; Refused when private ones are not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise httpcore.ConnectError("cannot resolve the host name") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
            if not ip.is_global or ip.is_multicast:
                raise Refused(f"refused: {_short(host)} is a {'loopback' if ip.is_loopback else 'non-public'} "
                              "address, and this server fetches public URLs only")
    return addresses


class _PinnedBackend(httpcore.NetworkBackend):
    """Resolves each host once, checks every address, then connects to a checked address:
    no second lookup between check and connect for DNS rebinding to slip into. The
    Host header and TLS server name stay the URL's, as httpcore sets them above this."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        failure = httpcore.ConnectError("the host name has no address")
        for address in resolve(host, port, allow_private=self.allow_private):
            try:
                return _DeadlineStream(self._inner.connect_tcp(address, port, _time_left(timeout),
                                                               local_address, socket_options))
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport, over a connection pool whose connections _PinnedBackend makes."""

    def __init__(self, limits: httpx.Limits, allow_private: bool):
        super().__init__(limits=limits)
        # httpx has no parameter for the network backend; the pool it builds is replaced by the same one with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(allow_private))


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
    if item.error:
        return _Fetched(item, fetch_reason=item.error)
    try:
        data = fetch(item.source, client, limits)
    except FetchError as exc:
        return _Fetched(item, fetch_reason=exc.reason)
    except Exception as exc:  # one odd source (a URL httpx cannot take, say) must not stop the load
        return _Fetched(item, fetch_reason=f"cannot fetch: {type(exc).__name__}")
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
    sources that failed to fetch are tried again. Loads into one database may run
    at once: each image and each source is stored once.
    """
    items = discover(source, label_column=label_column) if isinstance(source, (str, Path)) else _unique(list(source))
    if concurrency < 1:
        raise LoadError("concurrency must be at least 1")
    summary = LoadSummary()
    with db.engine.connect() as conn:
        done = set(conn.execute(sa.select(image_sources.c.source).where(image_sources.c.status == "ok")).scalars())
    todo = [item for item in items if item.key not in done]
    summary.skipped = len(items) - len(todo)
    if progress is None:
        progress = sys.stderr.isatty()

    pending_rows: list[_Fetched] = []
    order = _InputOrder({item.key: i for i, item in enumerate(todo)})
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

    position: dict[str, int]                                 # source key -> index in the input
    owner: dict[str, int] = field(default_factory=dict)      # sha256 -> index of the source its row has


def _record(db: Database, results: list[_Fetched], summary: LoadSummary, order: _InputOrder) -> None:
    """Write one batch in one transaction: images first, then the sources that point at them.

    Inserts ignore conflicts and then read the row back, so another load writing the
    same image or source at the same time neither fails this batch nor doubles a row.
    """
    if not results:
        return
    stamp = now()
    with db.begin() as conn:
        for r in results:
            item, key = r.item, r.item.key
            image_id = None
            if r.data_sha is not None:
                info = r.info
                image_id = conn.execute(db.insert_ignore(images).values(
                    sha256=r.data_sha, label=item.label, source=key,
                    width=getattr(info, "width", None), height=getattr(info, "height", None),
                    format=getattr(info, "format", None), byte_size=r.byte_size,
                    status="ok" if info else "failed", reason=r.decode_reason,
                    loaded_at=stamp, metadata=to_json(item.metadata),
                ).returning(images.c.id)).scalar()
                if image_id is not None:
                    order.owner[r.data_sha] = order.position[key]
                    if info:
                        summary.loaded += 1
                    else:
                        summary.failed[r.decode_reason] += 1
                else:
                    image_id = conn.execute(sa.select(images.c.id).where(images.c.sha256 == r.data_sha)).scalar_one()
                    summary.already_present += 1
                    if order.position[key] < order.owner.get(r.data_sha, -1):  # listed earlier, came later
                        conn.execute(sa.update(images).where(images.c.id == image_id).values(
                            label=item.label, source=key, metadata=to_json(item.metadata)))
                        order.owner[r.data_sha] = order.position[key]
            else:
                summary.failed[r.fetch_reason] += 1
            reason = r.fetch_reason and (f"line {item.line}: {r.fetch_reason}" if item.line else r.fetch_reason)
            values = dict(image_id=image_id, label=item.label, status="ok" if r.data_sha else "failed",
                          reason=reason, loaded_at=stamp, metadata=to_json(item.metadata))
            if not conn.execute(db.insert_ignore(image_sources).values(source=key, **values)).rowcount:
                conn.execute(sa.update(image_sources).where(image_sources.c.source == key).values(**values))
