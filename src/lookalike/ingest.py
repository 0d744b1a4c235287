"""Load step: images with their labels into the database and the image store.

Sources are a folder tree (one sub-folder per label, searched recursively), a
manifest (``label<TAB>url`` lines as in the original ``fashion_texture_urls.tsv``,
or CSV/TSV with a header), or a list of (source, label) pairs from Python.

Fetching and decoding run in a thread pool; only the calling thread writes to
the database, in small transactions, so an interrupted load keeps everything
committed and a re-run fetches only what is missing. One bad entry (a bad
manifest line, an unreadable file, a dead URL) is recorded with its reason and
never stops the load.

Every file and URL is read through :mod:`lookalike.net`'s one fetch policy.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote_to_bytes, urlparse

import httpx
import sqlalchemy as sa
from tqdm import tqdm

from .db import Database, image_sources, images, now, recorded_run, to_json
from .errors import BadInput
from .images import ImageError, probe
from .net import DEFAULT_CONCURRENCY, FetchError, FetchLimits, fetch, fs_bytes, fs_str, make_client, read_file
from .store import sha256_hex
from .workpool import completed

MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_LINE_CHARS = 8192           # a manifest line; bounds every field stored from it
MANIFEST_SUFFIXES = {".tsv", ".csv", ".txt"}
URL_COLUMNS = ("url", "path", "source", "uri", "file", "image", "image_url", "imageurl")
MAX_FOLDER_DEPTH = 32           # folder levels below the root: a link to / stays bounded
MAX_FOLDER_FILES = 5_000_000
COMMIT_EVERY = 200   # rows per transaction
COMMIT_SECONDS = 2.0


class LoadError(BadInput):
    """Input that cannot be loaded at all (bad manifest, missing folder); nothing was written."""


@dataclass(frozen=True)
class Item:
    source: str            # absolute path or URL; undecodable bytes of a path kept as surrogates (see net.fs_bytes)
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
def _text(value: str | bytes) -> str:
    """Text any database takes: undecodable bytes written as ``\\xff``."""
    raw = value if isinstance(value, bytes) else fs_bytes(value)
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- discovering sources

def discover(source: str | Path, *, label_column: str | None = None) -> list[Item]:
    """The items named by a folder tree or a manifest file (a path or a file:// URL)."""
    text = str(source)
    if "://" in text and not text.startswith("file://"):
        raise LoadError("give a folder or a manifest file; to load URLs, list them in a manifest")
    raw = os.path.abspath(os.path.expanduser(
        unquote_to_bytes(urlparse(text).path) if text.startswith("file://") else fs_bytes(text)))
    if os.path.isdir(raw):
        return _folder_items(raw)
    if not os.path.lexists(raw):
        raise LoadError(f"no such folder or manifest: {_text(raw)}")
    if os.path.splitext(raw)[1].lower() not in {fs_bytes(s) for s in MANIFEST_SUFFIXES}:
        raise LoadError(f"{_text(raw)} is a file but not a manifest (.tsv, .csv or .txt)")
    return read_manifest(Path(fs_str(raw)), label_column=label_column)


def _folder_items(root: bytes) -> list[Item]:
    # Label = the top-level sub-folder; files directly under root have no label (a flat folder),
    # except manifests lying beside the label folders (the sample set's manifest.tsv).
    # Linked folders are followed, each real folder once and at most MAX_FOLDER_DEPTH deep, so a link
    # loop or a link to / ends. Anything that is not a folder is an entry: fetch says why it cannot be read.
    root = os.path.realpath(root)
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        rel = os.path.relpath(folder, root).split(os.sep.encode())
        where = os.stat(folder)
        if (where.st_dev, where.st_ino) in seen or len(rel) > MAX_FOLDER_DEPTH:
            subfolders[:] = []
            continue
        seen.add((where.st_dev, where.st_ino))
        subfolders[:] = [d for d in subfolders if not d.startswith(b".")]
        names = [n for n in names if not n.startswith(b".")]
        if rel == [b"."]:
            manifests = {fs_bytes(s) for s in MANIFEST_SUFFIXES}
            found += [(name,) for name in names if os.path.splitext(name)[1].lower() not in manifests]
        else:
            found += [(*rel, name) for name in names]
        if len(found) > MAX_FOLDER_FILES:
            raise LoadError(f"{_text(root)} holds over {MAX_FOLDER_FILES:,} files: load it in parts, or list "
                            "the images in a manifest")
    if not found:
        raise LoadError(f"{_text(root)} has no image files (expected {_text(root)}/<image> or "
                        f"{_text(root)}/<label>/<image>)")
    return [Item(fs_str(os.path.realpath(os.path.join(root, *parts))), _text(parts[0]) if len(parts) > 1 else None)
            for parts in sorted(found)]


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
    numbered = [(n, line.rstrip("\r")) for n, line in enumerate(fs_str(data.removeprefix(b"\xef\xbb\xbf")).split("\n"), 1)
                if line.strip()]
    if not numbered:
        raise LoadError(f"{path.name} is empty")
    first_number, first = numbered[0]
    delimiter = "\t" if "\t" in first or path.suffix.lower() == ".tsv" else ","
    header = _header(first, delimiter)
    lowered = [cell.lower() for cell in header]
    url_index = next((lowered.index(c) for c in URL_COLUMNS if c in lowered), None)
    base = fs_bytes(str(path.parent))

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
        if label_column and wanted not in lowered:
            raise LoadError(f"{path.name}: the header (line {first_number}) has no {label_column!r} column")
        label_index = lowered.index(wanted) if wanted in lowered else None   # None: no labels

        def entry(number: int, line: str) -> Item:
            row = _csv_line(line, delimiter)
            if len(row) != len(header):
                raise _BadLine(f"{len(row)} fields, header has {len(header)}")
            if not row[url_index].strip():
                raise _BadLine("empty url/path")
            extra = {_text(header[i]): _text(row[i]) for i in range(len(header))
                     if i not in (url_index, label_index) and row[i] != ""}
            label = None if label_index is None else _text(row[label_index].strip()) or None
            return Item(_absolute(row[url_index].strip(), base), label, extra or None, line=number)
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
    return fs_str(os.path.realpath(os.path.join(base, os.path.expanduser(fs_bytes(value)))))


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, Item] = {}
    for item in items:
        seen.setdefault(item.key, item)
    return list(seen.values())


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
    if concurrency < 1:
        raise LoadError("concurrency must be at least 1")
    named = isinstance(source, (str, Path))
    # A source that cannot be loaded at all is refused before anything, the run row too, is written.
    items = discover(source, label_column=label_column) if named else _unique(list(source))
    params = {"source": _text(str(source)) if named else "(items)", "label_column": label_column,
              "concurrency": concurrency}
    with recorded_run(db, "load", params) as counts:
        summary = LoadSummary()
        with db.engine.connect() as conn:
            done = set(conn.execute(sa.select(image_sources.c.source).where(image_sources.c.status == "ok")).scalars())
        todo = [item for item in items if item.key not in done]
        summary.skipped = len(items) - len(todo)
        if progress is None:
            progress = sys.stderr.isatty()

        pending_rows: list[_Fetched] = []
        # Fetches finish in any order; rows are written in input order, so that image ids follow the folder or
        # manifest whatever finished first (a re-run gives the same ids), and the same bytes under two sources
        # get the row of the source listed first. What finished early waits here, small (no image bytes).
        position = {item.key: i for i, item in enumerate(todo)}
        finished: dict[int, _Fetched] = {}
        next_row = 0   # the input position written next
        last_commit = time.monotonic()
        bar = tqdm(total=len(todo), unit="img", desc="load", disable=not progress, leave=False)
        client = make_client(limits, concurrency)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load")
        try:
            for item, future in completed(pool, lambda item: _fetch_and_store(item, db, client, limits), todo,
                                          window=concurrency * 4):
                finished[position[item.key]] = future.result()
                bar.update(1)
                while next_row in finished:
                    pending_rows.append(finished.pop(next_row))
                    next_row += 1
                if len(pending_rows) >= COMMIT_EVERY or time.monotonic() - last_commit > COMMIT_SECONDS:
                    _record(db, pending_rows, summary)
                    pending_rows, last_commit = [], time.monotonic()
            _record(db, pending_rows, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
            _record(db, pending_rows + [finished[i] for i in sorted(finished)], summary)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            client.close()
            bar.close()
        counts.update(loaded=summary.loaded, already_present=summary.already_present, skipped=summary.skipped,
                      failed=summary.failed_total, interrupted=summary.interrupted)
    return summary


def _record(db: Database, results: list[_Fetched], summary: LoadSummary) -> None:
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
                    if info:
                        summary.loaded += 1
                    else:
                        summary.failed[r.decode_reason] += 1
                else:
                    image_id = conn.execute(sa.select(images.c.id).where(images.c.sha256 == r.data_sha)).scalar_one()
                    summary.already_present += 1
            else:
                summary.failed[r.fetch_reason] += 1
            reason = r.fetch_reason and (f"line {item.line}: {r.fetch_reason}" if item.line else r.fetch_reason)
            values = dict(image_id=image_id, label=item.label, status="ok" if r.data_sha else "failed",
                          reason=reason, loaded_at=stamp, metadata=to_json(item.metadata))
            if not conn.execute(db.insert_ignore(image_sources).values(source=key, **values)).rowcount:
                conn.execute(sa.update(image_sources).where(image_sources.c.source == key).values(**values))
