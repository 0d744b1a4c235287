"""Serve step: the web pages and the JSON API over one lookalike database.

Pages are rendered on the server (Jinja2) with a little vanilla JS: ``/`` finds
the stored images most like an upload, a URL or a stored image (within a label, if
asked); ``/browse`` pages through the images of a label; ``/images/{id}`` is one
image at full size with all that is known of it; ``/duplicates`` shows a dedupe
run's groups; ``/collection`` shows what is stored, the unique images per hash
size and the last evaluation. Every image appears on a card (``_macros.html``).
The JSON API lives under ``/api`` and is described at ``/docs`` (OpenAPI, with
Swagger UI served from local files).

Safety rules, all enforced here:

- request bodies are capped (413), and uploads must decode as images (415/422);
- stored images are served by id only: id → sha256 → store path, never a path from a request;
- URLs are fetched over http(s) only, with the load step's limits, and — unless
  ``allow_private_urls`` — never from loopback, private or link-local addresses
  (checked again at every redirect);
- responses and logs never carry the database URL, and logged URLs lose their query strings.

The vector index (``search.collection``) and the backbone are loaded once at
start-up and shared by every request. Request handlers run in a thread pool;
URL fetches and image decodes run on small pools of their own (``_Pool``), so
that neither slow servers nor big images can hold the threads the rest answer on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args
from urllib.parse import unquote, urlencode, urlsplit

import numpy as np
import sqlalchemy as sa
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, quality, reports, review
from ..backbones import load_backbone
from ..config import mask_secrets
from ..db import (Database, dedupe_run_rows, embedding_counts, embeddings, hashed_images, image_sources, images,
                  latest_evaluation, runs)
from ..dedupe import unique_counts
from ..errors import LookalikeError
from ..evaluate import RETRIEVAL_K, TOP_K
from ..images import ImageError, thumbnail_jpeg
from ..net import FetchError, FetchLimits, Refused, fetch_one
from ..search import Match, collection, similar_images
from ..status import collection_status
from ..steps import STEPS, default
from ..store import sha256_hex

log = logging.getLogger("lookalike.web")

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMBNAIL_PX = 256
THUMBNAIL_QUALITY = 85
DEFAULT_K = default("similar", "k")
MAX_K = STEPS["similar"].param("k").bounds[1]
PICKER_IMAGES = 24        # stored images offered on the search page
GROUPS_PER_PAGE = 40
IMAGES_PER_PAGE = 48      # the browse page's cards; also /api/images' default limit
SOURCES_SHOWN = 20        # of an image's sources, on its full-size page
MIME_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
              "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}
# Our pages load nothing from elsewhere and run no inline script. /docs (FastAPI's Swagger page, its
# assets served from the fastapi-offline package) needs its one inline script and inline styles.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
Space = Literal[STEPS["similar"].param("space").choices]
DEFAULT_SPACE = default("similar", "space")
KParam = Annotated[int, Query(ge=1, le=MAX_K, description="how many similar images")]
MAX_ID = 2**63 - 1  # ids are signed 64-bit integers in every database we run on
MAX_LABEL = 256     # characters of a label filter
ImageIdParam = Annotated[int, PathParam(ge=1, le=MAX_ID, description="id of a stored image")]
RunIdParam = Annotated[int | None, Query(ge=1, le=MAX_ID, description="id of a dedupe run (default: the latest)")]
LabelParam = Annotated[str | None, Query(min_length=1, max_length=MAX_LABEL, description="only images with this label")]
UnlabelledParam = Annotated[bool, Query(description="only images without a label")]
OffsetParam = Annotated[int, Query(ge=0, le=MAX_ID, description="how many to skip")]
Sort = Literal[STEPS["duplicates"].param("sort").choices]
SortParam = Annotated[Sort, Query(description="size: largest groups first; doubt: lowest score first; id")]
DEFAULT_SORT = default("duplicates", "sort")
Decision = Literal[review.DECISIONS]
WEB_REVIEWER = "web"      # who decided, when a review from the web gives no name
# URL fetches and image decodes run on worker threads of their own, a few at a time, so that
# slow servers and big images never hold the threads health and pages answer on. Each decode
# is capped at images.QUERY_MAX_PIXELS, so decoding never holds more than two of those at once.
FETCH_WORKERS = 4          # URL queries fetching at once
DECODE_WORKERS = 2         # decodes at once: queries (decode and embed) and thumbnails; CPU bound
QUEUE_WAIT_S = 5.0         # the longest a query waits for a worker before it is turned away (503)
REQUEST_DEADLINE_S = 30.0  # the longest a query may take, waiting, fetching and searching included
RETRY_AFTER_S = 5          # what a 503 tells the client to wait


class ApiError(LookalikeError):
    """A request that cannot be served: answered as ``{"error": message}`` with HTTP ``status``.

    Any other user error (:mod:`lookalike.errors`) is answered the same way, with its own status.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = self.http_status = status
        self.message = message
        self.headers = headers


# ---------------------------------------------------------------- API models (they make /docs)

class SimilarRequest(BaseModel):
    """One query: a URL to fetch or a stored image id (an upload goes as multipart ``file``)."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, description="http(s) URL of an image", examples=["https://example.com/shirt.jpg"])
    id: int | None = Field(None, ge=1, le=MAX_ID, description="id of a stored image", examples=[123])
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="how many similar images")
    space: Space = Field(DEFAULT_SPACE, description=STEPS["similar"].param("space").help)
    label: str | None = Field(None, min_length=1, max_length=MAX_LABEL,
                              description="only images with this label (still k of them)")


class QueryInfo(BaseModel):
    kind: Literal["upload", "url", "id"]
    name: str = Field(description="file name, URL or 'image <id>'")
    sha256: str
    image_id: int | None = Field(description="the stored image with these bytes, if any (never in the results)")
    label: str | None


class Result(BaseModel):
    rank: int
    image_id: int
    label: str | None
    similarity: float = Field(description="1 - cosine distance")
    distance: float
    source: str
    thumbnail_url: str


class SimilarResponse(BaseModel):
    query: QueryInfo
    k: int
    space: Space
    seconds: float
    results: list[Result]


class ImageMeta(BaseModel):
    id: int
    sha256: str
    label: str | None
    source: str
    width: int | None
    height: int | None
    format: str | None
    byte_size: int
    status: str
    reason: str | None
    loaded_at: str
    embedded: bool = Field(description="has an embedding (so it can be a query by id)")
    thumbnail_url: str


class ImageCard(BaseModel):
    """What a page's card shows of a stored image."""

    id: int
    name: str = Field(description="file name from the source path or URL")
    source: str
    label: str | None
    width: int | None
    height: int | None
    format: str | None
    byte_size: int
    thumbnail_url: str
    full_url: str


class ImageList(BaseModel):
    total: int = Field(description="how many images match, on all pages")
    offset: int
    label: str | None
    unlabelled: bool
    images: list[ImageCard]


class GroupMember(BaseModel):
    image_id: int
    label: str | None
    width: int | None
    height: int | None
    byte_size: int
    format: str | None
    is_keeper: bool
    distance: int = Field(description="Hamming distance to the keeper")
    score: float | None = Field(None, description="the similarity that decided (verified rule)")
    verified_by: str | None = Field(None, description="what put it in the group: embedding, geometry or review")
    thumbnail_url: str


class DuplicateGroup(BaseModel):
    group_id: int
    size: int
    keeper: int
    members: list[GroupMember]


class DedupeRun(BaseModel):
    id: int
    rule: str
    hash_kind: str
    hash_size: int
    max_distance: int | None
    per_label: bool
    groups: int
    duplicates: int
    created_at: str


class DuplicatesResponse(BaseModel):
    run: DedupeRun | None
    groups_total: int
    offset: int
    sort: Sort = DEFAULT_SORT
    groups: list[DuplicateGroup]


class ReviewRequest(BaseModel):
    """A decision on a group of the latest dedupe run; later dedupe runs honour it."""

    model_config = ConfigDict(extra="forbid")
    decision: Decision = Field(description="not_duplicate: image_id is not a copy of the others; keep_this: "
                                           "keep image_id; confirmed: the group is right")
    # strict: JSON true is not image 1, nor 1.5 image 1
    image_id: int | None = Field(None, ge=1, le=MAX_ID, strict=True, description="the image (not_duplicate, keep_this)")
    by: str | None = Field(None, description=f"who decides (default: {WEB_REVIEWER!r})")
    note: str | None = None


class ReviewResponse(BaseModel):
    run_id: int
    group_id: int
    decision: Decision
    image_id: int | None
    decided_by: str
    recorded: int
    group: int | None = Field(description="the group's id afterwards; null: no longer a group")


class Error(BaseModel):
    error: str


ERRORS = {status: {"model": Error} for status in (404, 409, 413, 415, 422, 502, 503, 504)}


# ---------------------------------------------------------------- searching

@dataclass(frozen=True)
class Outcome:
    query: QueryInfo
    matches: list[Match]
    space: str
    seconds: float
    data: bytes | None = None   # the query's bytes, for an upload or a URL


def fetch_url(url: str, limits: FetchLimits, *, allow_private: bool = False) -> bytes:
    """The bytes at an http(s) URL, within the load step's ``limits``; ApiError otherwise.

    Never reads local files (``file://`` or a bare path), which the load step would.
    Private addresses are refused by the client itself, at every connection it makes
    (redirects too), against the address it then connects to.
    """
    try:
        return fetch_one(url, limits, allow_private=allow_private, local_files=False)
    except Refused as exc:
        raise ApiError(400, exc.reason) from None
    except FetchError as exc:
        raise ApiError(502, f"cannot fetch the URL: {exc.reason}") from None


def _searchable(db: Database, space: str):
    try:
        return collection(db, space)
    except LookupError as exc:
        raise ApiError(409, f"nothing to search yet: {exc}") from None


def _image_row(db: Database, image_id: int):
    with db.engine.connect() as conn:
        # Bound as a 64-bit integer: on PostgreSQL the id column is 32-bit, and an id beyond it is just absent.
        row = conn.execute(sa.select(images).where(images.c.id == sa.literal(image_id, sa.BigInteger))).first()
    if row is None:
        raise ApiError(404, f"no image with id {image_id}")
    return row


def _answered(matches: list[Match], asked: str) -> str:
    """The space that answered (``auto`` resolved), for the response."""
    return matches[0].space if matches else asked


def search_by_id(db: Database, image_id: int, k: int, space: str, label: str | None = None) -> Outcome:
    """The ``k`` stored images most like stored image ``image_id`` (itself excluded)."""
    started = time.perf_counter()
    row = _image_row(db, image_id)
    coll = _searchable(db, space)
    if not coll.has(image_id):
        why = f"it failed to load: {row.reason}" if row.status == "failed" else "run featurize"
        raise ApiError(422, f"image {image_id} has no stored {space} vector ({why})")
    matches = similar_images(db, image_id, k=k, space=space, label=label)
    query = QueryInfo(kind="id", name=f"image {image_id}", sha256=row.sha256, image_id=image_id, label=row.label)
    return Outcome(query, matches, _answered(matches, space), time.perf_counter() - started)


def search_by_bytes(db: Database, data: bytes, k: int, space: str, *, kind: str, name: str,
                    label: str | None = None) -> Outcome:
    """The ``k`` stored images most like the image in ``data`` (an upload or a fetched URL)."""
    started = time.perf_counter()
    _searchable(db, space)
    try:
        matches = similar_images(db, data, k=k, space=space, label=label)
    except ImageError as exc:
        status = 415 if exc.reason.startswith("not an image") else 422
        raise ApiError(status, f"cannot use this file: {exc.reason}") from None
    sha = sha256_hex(data)
    with db.engine.connect() as conn:
        stored = conn.execute(sa.select(images.c.id, images.c.label).where(images.c.sha256 == sha)).first()
    query = QueryInfo(kind=kind, name=name, sha256=sha, image_id=stored.id if stored else None,
                      label=stored.label if stored else None)
    return Outcome(query, matches, _answered(matches, space), time.perf_counter() - started, data)


def _result(m: Match) -> Result:
    return Result(rank=m.rank, image_id=m.image_id, label=m.label, similarity=m.similarity, distance=m.distance,
                  source=mask_secrets(m.source), thumbnail_url=f"/api/images/{m.image_id}/thumbnail")


def _response(outcome: Outcome, k: int) -> SimilarResponse:
    return SimilarResponse(query=outcome.query, k=k, space=outcome.space, seconds=round(outcome.seconds, 4),
                           results=[_result(m) for m in outcome.matches])


class _Pool:
    """A few worker threads of its own; a job waits at most ``wait`` seconds for one (else 503),
    and a request is answered within ``limit`` seconds of its start (else 504)."""

    def __init__(self, name: str, workers: int, wait: float, limit: float):
        self.name, self.wait, self.limit = name, wait, limit
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"lookalike-{name}")

    async def run(self, started_at: float, function: Callable[[], Any]) -> Any:
        """``function()`` on a worker, for a request that started at ``started_at`` (time.monotonic)."""
        deadline = started_at + self.limit
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def job():
            loop.call_soon_threadsafe(started.set)
            return function()

        future = self._executor.submit(job)
        try:
            wait = deadline - time.monotonic()
            try:
                await asyncio.wait_for(started.wait(), min(self.wait, wait))
            except TimeoutError:
                if future.cancel():  # still queued: give its place up
                    if wait <= self.wait:
                        raise  # out of time rather than turned away
                    raise ApiError(503, f"busy: too many {self.name} at once, try again in {RETRY_AFTER_S} s",
                                   {"Retry-After": str(RETRY_AFTER_S)}) from None
            # A worker cannot be stopped, but the work it runs has its own deadline (fetches) or is
            # bounded by the pixel budget (decodes); the answer does not wait past ours.
            return await asyncio.wait_for(asyncio.wrap_future(future), deadline - time.monotonic())
        except TimeoutError:
            raise ApiError(504, f"the query took longer than the {self.limit:g} s limit") from None
        finally:
            future.cancel()  # no-op once started; drops a queued job whose client has gone

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- images and thumbnails

@lru_cache(maxsize=2048)
def _stored_thumbnail(path: Path) -> bytes:
    # Keyed by the content-addressed store path: the bytes behind it never change.
    return thumbnail_jpeg(path.read_bytes(), THUMBNAIL_PX, THUMBNAIL_QUALITY)


def _data_uri(data: bytes) -> str | None:
    try:
        thumbnail = thumbnail_jpeg(data, THUMBNAIL_PX, THUMBNAIL_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode("ascii")
    except ImageError:
        return None


def _stored_bytes_path(db: Database, image_id: int) -> tuple[Any, Path]:
    row = _image_row(db, image_id)
    if row.status != "ok":
        raise ApiError(422, f"image {image_id} could not be decoded when loaded: {row.reason}")
    path = db.store.path(row.sha256)  # the sha256 from our own table is the only thing joined to the store root
    if not path.is_file():
        raise ApiError(404, f"image {image_id} is missing from the image store")
    return row, path


def _cached(content: bytes, media_type: str, etag: str, request: Request) -> Response:
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


# ---------------------------------------------------------------- cards and browsing

_CARD_COLUMNS = (images.c.id, images.c.source, images.c.label, images.c.width, images.c.height, images.c.format,
                 images.c.byte_size)


def file_name(source: str) -> str:
    """The last part of a source path or URL, without its query string: what a person calls the file."""
    name = PurePosixPath(unquote(urlsplit(source).path)).name if "://" in source else Path(source).name
    return name or mask_secrets(source)


def _card(row) -> ImageCard:
    return ImageCard(id=row.id, name=file_name(row.source), source=mask_secrets(row.source), label=row.label,
                     width=row.width, height=row.height, format=row.format, byte_size=row.byte_size,
                     thumbnail_url=f"/api/images/{row.id}/thumbnail", full_url=f"/api/images/{row.id}/full")


def image_cards(db: Database, ids: list[int]) -> dict[int, ImageCard]:
    """The cards of the stored images among ``ids``, in one query."""
    if not ids:
        return {}
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(*_CARD_COLUMNS).where(images.c.id.in_(sorted(set(ids))))).all()
    return {row.id: _card(row) for row in rows}


def browse_images(db: Database, label: str | None = None, unlabelled: bool = False, offset: int = 0,
                  limit: int = IMAGES_PER_PAGE) -> ImageList:
    """A page of the decoded stored images, by id: all of them, those with ``label``, or those with none."""
    if label is not None and unlabelled:
        raise ApiError(422, "give label or unlabelled, not both")
    where = images.c.status == "ok"
    if label is not None:
        where &= images.c.label == label
    elif unlabelled:
        where &= images.c.label.is_(None)
    with db.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(images).where(where)).scalar()
        rows = conn.execute(sa.select(*_CARD_COLUMNS).where(where).order_by(images.c.id)
                            .offset(offset).limit(limit)).all()
    return ImageList(total=total, offset=offset, label=label, unlabelled=unlabelled, images=[_card(r) for r in rows])


def label_counts(db: Database) -> list[tuple[str | None, int]]:
    """How many decoded images each label has, by label; the unlabelled (None) last."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.label, sa.func.count()).where(images.c.status == "ok")
                            .group_by(images.c.label)).all()
    return sorted(((label, n) for label, n in rows), key=lambda row: (row[0] is None, row[0] or ""))


def _image_sources(db: Database, image_id: int) -> tuple[list[str], int]:
    """The first SOURCES_SHOWN sources of an image (secrets masked), and how many it has."""
    where = image_sources.c.image_id == image_id
    with db.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(image_sources).where(where)).scalar()
        shown = conn.execute(sa.select(image_sources.c.source).where(where).order_by(image_sources.c.id)
                             .limit(SOURCES_SHOWN)).scalars().all()
    return [mask_secrets(s) for s in shown], total


# ---------------------------------------------------------------- reading what other steps wrote

def _runs(db: Database) -> list[DedupeRun]:
    with db.engine.connect() as conn:
        rows = dedupe_run_rows(conn)
    return [DedupeRun(id=r.id, rule=r.rule, hash_kind=r.hash_kind, hash_size=r.hash_size,
                      max_distance=r.max_distance, per_label=r.per_label, groups=r.groups,
                      duplicates=r.duplicates, created_at=r.created_at.isoformat(timespec="seconds"))
            for r in rows]


def duplicates(db: Database, run_id: int | None, offset: int, limit: int,
               sort: str = DEFAULT_SORT) -> DuplicatesResponse:
    """A page of a dedupe run's groups (the latest run by default), sorted by ``sort``."""
    runs = _runs(db)
    if run_id is None and not runs:
        return DuplicatesResponse(run=None, groups_total=0, offset=offset, groups=[])
    run = runs[0] if run_id is None else next((r for r in runs if r.id == run_id), None)
    if run is None:
        raise ApiError(404, f"no dedupe run with id {run_id}")
    groups = reports.duplicate_groups_report(db, run.id, sort=sort, limit=limit, offset=offset)
    page = [DuplicateGroup(group_id=g.group_id, size=len(g.members), keeper=g.keeper.image_id, members=[
        GroupMember(image_id=m.image_id, label=m.label, width=m.width, height=m.height, byte_size=m.byte_size,
                    format=m.format, is_keeper=m.is_keeper, distance=m.distance, score=m.score,
                    verified_by=m.verified_by, thumbnail_url=f"/api/images/{m.image_id}/thumbnail")
        for m in g.members]) for g in groups]
    return DuplicatesResponse(run=run, groups_total=run.groups, offset=offset, sort=sort, groups=page)


def review_decision(db: Database, group_id: int, request: ReviewRequest) -> ReviewResponse:
    """Record a decision through the review step (the same call as `lookalike duplicates review`)."""
    if request.decision != "confirmed" and request.image_id is None:
        raise ApiError(422, f"image_id is required for {request.decision}")
    image = {"not_duplicate": "not_duplicate", "keep_this": "keep"}.get(request.decision)
    kwargs = {image: request.image_id} if image else {"confirm": True}
    outcome = review.review_group(db, group_id, by=request.by or WEB_REVIEWER, note=request.note, **kwargs)
    return ReviewResponse(**outcome.as_dict())


def _same_origin(request: Request) -> None:
    """Refuse a state-changing request a browser sent from another site (a form posted elsewhere).

    Browsers say where a request comes from in Sec-Fetch-Site; older ones only in Origin, which our
    pages' no-referrer policy turns into "null" on their own form posts.
    """
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None:
        crossed = site not in ("same-origin", "none")
    else:
        crossed = origin not in (None, "null") and urlsplit(origin).netloc != request.headers.get("host")
    if crossed:
        raise ApiError(403, "cross-site requests may not change review decisions")


def _embedding_counts(db: Database) -> list[tuple[str, int, int]]:
    with db.engine.connect() as conn:
        return embedding_counts(conn)


def _last_evaluation(db: Database) -> dict | None:
    """The newest evaluation as a table: one row per (space, metric), one column per measure."""
    with db.engine.connect() as conn:
        found = latest_evaluation(conn)
    if found is None:
        return None
    latest, rows = found
    order = [f"top{k}" for k in TOP_K] + ["mean_rank", "median_rank", f"map@{RETRIEVAL_K}", f"recall@{RETRIEVAL_K}"]
    present = {r.measure for r in rows}
    measures = [m for m in order if m in present] + sorted(present - set(order))
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r.space, r.metric), {})[r.measure] = r.value
    return {"id": latest.id, "created_at": latest.created_at.isoformat(timespec="seconds"), "measures": measures,
            "rows": [(space, metric, [values.get(m) for m in measures])
                     for (space, metric), values in sorted(table.items())]}


class _UniqueCountsCache:
    """The unique-counts table and its plot, counted and drawn once per change of what they count.

    The fingerprint is cheap: the newest step run, and how many images there are and are hashed.
    One lock: concurrent requests wait for the one count or drawing under way instead of repeating it.
    """

    def __init__(self, db: Database):
        self.db = db
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._table = None
        self._png: bytes | None = None

    def _fingerprint(self) -> tuple:
        count = sa.select(sa.func.count())
        with self.db.engine.connect() as conn:
            return tuple(conn.execute(sa.select(
                sa.select(sa.func.max(runs.c.id)).scalar_subquery(),
                sa.select(sa.func.max(images.c.id)).scalar_subquery(),
                count.select_from(images).scalar_subquery(),
                count.select_from(hashed_images).scalar_subquery())).one())

    def _current(self) -> tuple:
        key = self._fingerprint()
        if key != self._key:
            table = unique_counts(self.db)
            self._key, self._table, self._png = key, table if table.labels else None, None
        return self._key

    def table(self):
        """The table, or None when nothing is hashed."""
        with self._lock:
            self._current()
            return self._table

    def png(self) -> tuple[bytes, str]:
        """The plot as PNG bytes and an ETag for them; ApiError 404 when nothing is hashed."""
        with self._lock:
            key = self._current()
            if self._table is None:
                raise ApiError(404, "no image hashes yet: run the hash step")
            if self._png is None:
                with tempfile.TemporaryDirectory(prefix="lookalike-plot-") as folder:
                    self._png = reports.plot_unique_counts(self._table, Path(folder) / "unique.png").read_bytes()
            return self._png, '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'


# ---------------------------------------------------------------- the app

class _Guard:
    """ASGI middleware: caps request bodies (413 JSON) and adds security headers to every response."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the {self.max_bytes / 2**20:g} MB limit"
        policy = DOCS_POLICY if scope["path"] == "/docs" else PAGE_POLICY

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"content-security-policy", policy.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(413, too_large)(scope, receive, send_with_headers)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body that declared no length
                raise ApiError(413, too_large)
            return message

        await self.app(scope, capped_receive, send_with_headers)


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form"))
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


class _MaskSecrets(logging.Filter):
    """Keeps passwords, storage keys and query strings (which may hold either) out of the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access formatter unpacks these five arguments; keep their shape.
            client, method, path, version, status = record.args
            path = str(path)
            record.args = (client, method, path.split("?", 1)[0] + ("?…" if "?" in path else ""), version, status)
        else:
            record.msg, record.args = mask_secrets(record.getMessage()), None
        if record.exc_info:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _mask_logs() -> None:
    for name in ("uvicorn.error", "uvicorn.access", "lookalike", "lookalike.web"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MaskSecrets) for f in logger.filters):
            logger.addFilter(_MaskSecrets())


def _warm(db: Database) -> None:
    """Load the vector index and the backbone before the first request needs them."""
    try:
        coll = collection(db)
    except LookupError:
        return  # nothing featurized yet: the first search will say so
    load_backbone(coll.backbone)


def create_app(db: Database, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, limits: FetchLimits = FetchLimits(),
               allow_private_urls: bool = False, warm: bool = True, deadline: float = REQUEST_DEADLINE_S,
               fetch_workers: int = FETCH_WORKERS, queue_wait: float = QUEUE_WAIT_S) -> FastAPI:
    """The web app over ``db``: pages, JSON API, OpenAPI docs.

    ``limits`` bound URL fetches (the load step's defaults); ``allow_private_urls``
    lets queries fetch from loopback and private networks (off: a public server must
    not be a way into its own network); ``warm`` loads the index and the model at start-up.
    A query is answered within ``deadline`` seconds; at most ``fetch_workers`` URL queries fetch
    at once, and a query waits at most ``queue_wait`` seconds for a worker (then 503).
    """
    _mask_logs()

    context = _Context(db, limits, allow_private_urls, max_upload_bytes,
                       fetches=_Pool("URL fetches", fetch_workers, queue_wait, deadline),
                       decodes=_Pool("image decodes", DECODE_WORKERS, queue_wait, deadline),
                       plot=_UniqueCountsCache(db))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warm:
            await run_in_threadpool(_warm, db)
        try:
            yield
        finally:
            context.close()

    app = FastAPI(title="lookalike", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Find the stored images most similar to an image, and review duplicate groups.")
    app.add_middleware(_Guard, max_bytes=max_upload_bytes)
    app.mount("/static", StaticFiles(packages=[("lookalike.web", "static")]), name="static")
    # Swagger UI 5 as packaged by fastapi-offline, so /docs works with no internet. (swagger-ui-bundle's
    # newest, 1.1.0, has Swagger UI 4, which cannot read the OpenAPI 3.1 that FastAPI writes.)
    app.mount("/docs/assets", StaticFiles(packages=[("fastapi_offline", "static")]), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="lookalike API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/static/icon.svg",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.exception_handler(LookalikeError)
    async def _user_error(_request: Request, exc: LookalikeError):
        return JSONResponse({"error": mask_secrets(str(exc))}, status_code=exc.http_status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return _error_response(422, _validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal server error")

    _api_routes(app, context)
    _page_routes(app, context)
    _quality_routes(app, db)
    return app


@dataclass(frozen=True)
class _Context:
    db: Database
    limits: FetchLimits
    allow_private_urls: bool
    max_upload_bytes: int
    fetches: _Pool
    decodes: _Pool
    plot: _UniqueCountsCache

    async def search(self, request: SimilarRequest, upload: tuple[str, bytes] | None) -> Outcome:
        """Run exactly one of: an upload, a URL, a stored id (what both the API and the page call)."""
        started_at = time.monotonic()
        given = [name for name, present in (("file", upload is not None), ("url", bool(request.url)),
                                            ("id", request.id is not None)) if present]
        if len(given) != 1:
            raise ApiError(422, "give exactly one of: file (multipart upload), url, id"
                           + (f" (got {', '.join(given)})" if given else ""))
        if request.id is not None:
            return await run_in_threadpool(search_by_id, self.db, request.id, request.k, request.space,
                                           request.label)
        if upload is not None:
            (name, data), kind = upload, "upload"
            if not data:
                raise ApiError(422, "cannot use this file: empty file")
        else:
            name, kind = request.url, "url"

            def download() -> bytes:
                # The fetch stops itself a second before the request's time is up, so that its own
                # reason (e.g. "too slow") is what the client reads, not a bare 504.
                left = round(started_at + self.fetches.limit - time.monotonic() - 1.0, 1)
                return fetch_url(name, replace(self.limits, deadline=max(min(self.limits.deadline, left), 0.1)),
                                 allow_private=self.allow_private_urls)
            data = await self.fetches.run(started_at, download)
        return await self.decodes.run(started_at, lambda: search_by_bytes(
            self.db, data, request.k, request.space, kind=kind, name=name, label=request.label))

    def close(self) -> None:
        self.fetches.close()
        self.decodes.close()


async def _read_query(request: Request) -> tuple[SimilarRequest, tuple[str, bytes] | None]:
    """A /api/similar body: JSON, or a multipart form with ``file`` (and optionally k, space)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if content_type == "application/json":
        try:
            fields = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(422, "the JSON body must be an object such as {\"id\": 123, \"k\": 10}")
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=8)
        fields = {key: value for key, value in form.items() if key != "file" and value != ""}
        file = form.get("file")
        if isinstance(file, UploadFile):
            upload = (file.filename or "upload", await file.read())
        elif file:
            raise ApiError(422, "file must be an uploaded file (multipart/form-data)")
    else:
        raise ApiError(415, "send JSON ({\"url\": …} or {\"id\": …}) or a multipart form with a file")
    try:
        # JSON strictly ({"id": true} is not image 1); form fields are text, so they are parsed.
        return SimilarRequest.model_validate(fields, strict=content_type == "application/json"), upload
    except ValidationError as exc:
        raise ApiError(422, _validation_message(exc.errors())) from None


_SIMILAR_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/SimilarRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": "an image file"},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
            "space": {"type": "string", "enum": list(get_args(Space)), "default": DEFAULT_SPACE},
            "label": {"type": "string", "description": "only images with this label"}}}},
    }}}


def _api_routes(app: FastAPI, ctx: _Context) -> None:
    db = ctx.db

    @app.post("/api/similar", response_model=SimilarResponse, tags=["search"], openapi_extra=_SIMILAR_BODY,
              responses={**ERRORS, 400: {"model": Error}})
    async def similar(request: Request) -> SimilarResponse:
        """The k stored images most similar to an uploaded file, a URL, or a stored image id.

        Send a multipart form with `file` (and optionally `k`), or JSON `{"url": …, "k": 10}` or
        `{"id": 123, "k": 10}`. A stored image is never among its own results.
        """
        query, upload = await _read_query(request)
        outcome = await ctx.search(query, upload)
        return _response(outcome, query.k)

    @app.get("/api/images/{image_id}/similar", response_model=SimilarResponse, tags=["search"], responses=ERRORS)
    def similar_to_stored(image_id: ImageIdParam, k: KParam = DEFAULT_K,
                          space: Space = DEFAULT_SPACE) -> SimilarResponse:
        """The k stored images most similar to stored image `image_id` (itself excluded)."""
        return _response(search_by_id(db, image_id, k, space), k)

    @app.get("/api/images", response_model=ImageList, tags=["images"], responses=ERRORS)
    def list_images(label: LabelParam = None, unlabelled: UnlabelledParam = False,
                    offset: OffsetParam = 0,
                    limit: Annotated[int, Query(ge=1, le=1000)] = IMAGES_PER_PAGE) -> ImageList:
        """The decoded stored images by id, a page at a time: all, those with `label`, or the `unlabelled`."""
        return browse_images(db, label, unlabelled, offset, limit)

    @app.get("/api/images/{image_id}", response_model=ImageMeta, tags=["images"], responses=ERRORS)
    def image_meta(image_id: ImageIdParam) -> ImageMeta:
        """What is stored about an image."""
        row = _image_row(db, image_id)
        with db.engine.connect() as conn:
            embedded = conn.execute(sa.select(sa.func.count()).select_from(embeddings)
                                    .where(embeddings.c.image_id == image_id)).scalar() > 0
        return ImageMeta(id=row.id, sha256=row.sha256, label=row.label, source=mask_secrets(row.source),
                         width=row.width, height=row.height, format=row.format, byte_size=row.byte_size,
                         status=row.status, reason=row.reason, loaded_at=row.loaded_at.isoformat(),
                         embedded=embedded, thumbnail_url=f"/api/images/{row.id}/thumbnail")

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], responses={
        **ERRORS, 200: {"content": {"image/jpeg": {}}, "description": f"JPEG, at most {THUMBNAIL_PX} px"}})
    async def thumbnail(image_id: ImageIdParam, request: Request) -> Response:
        """A JPEG thumbnail, at most 256 px on its longest side; cacheable (ETag)."""
        row, path = await run_in_threadpool(_stored_bytes_path, db, image_id)
        try:
            data = await ctx.decodes.run(time.monotonic(), lambda: _stored_thumbnail(path))
        except ImageError as exc:
            raise ApiError(422, f"image {image_id} cannot be decoded: {exc.reason}") from None
        return _cached(data, "image/jpeg", f'"{row.sha256[:32]}-t{THUMBNAIL_PX}"', request)

    @app.get("/api/images/{image_id}/full", tags=["images"], responses={
        **ERRORS, 200: {"content": {"image/*": {}}, "description": "the stored bytes"}})
    def full_image(image_id: ImageIdParam, request: Request) -> Response:
        """The stored image's original bytes, with its image content type."""
        row, path = _stored_bytes_path(db, image_id)
        media_type = MIME_TYPES.get(row.format or "", "application/octet-stream")
        return _cached(path.read_bytes(), media_type, f'"{row.sha256[:32]}"', request)

    @app.get("/api/duplicates", response_model=DuplicatesResponse, tags=["duplicates"], responses=ERRORS)
    def duplicate_groups(run_id: RunIdParam = None, offset: Annotated[int, Query(ge=0)] = 0,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         sort: SortParam = DEFAULT_SORT) -> DuplicatesResponse:
        """The groups of a dedupe run (the latest by default), keeper first in each group; sorted by size
        (largest first), doubt (lowest score first) or id."""
        return duplicates(db, run_id, offset, limit, sort)

    @app.post("/api/duplicates/{group_id}/review", response_model=ReviewResponse, tags=["duplicates"],
              responses={**ERRORS, 403: {"model": Error}})
    def review_group(group_id: Annotated[int, PathParam(ge=1, le=MAX_ID)], body: ReviewRequest,
                     request: Request) -> ReviewResponse:
        """Record a decision on a group of the latest dedupe run: `not_duplicate` (image_id is not a copy of
        the others), `keep_this` (keep image_id) or `confirmed`. It changes the latest run's groups at once,
        and every later dedupe run honours it. Nothing is deleted."""
        _same_origin(request)
        return review_decision(db, group_id, body)

    @app.get("/api/duplicates/removable", tags=["duplicates"], responses=ERRORS)
    def removable() -> JSONResponse:
        """The non-keepers of the latest dedupe run, decisions applied, with their sources: what a script
        may remove (lookalike deletes nothing). Store paths are left out: they are the server's."""
        return JSONResponse([dict(r.as_dict(), path=None, source=mask_secrets(r.source),
                                  sources=[mask_secrets(x) for x in r.sources])
                             for r in review.removable_images(db)])

    @app.get("/api/duplicates/decisions", tags=["duplicates"], responses=ERRORS)
    def decisions() -> JSONResponse:
        """Every review decision, oldest first, with who and when."""
        return JSONResponse([d.as_dict() for d in review.list_decisions(db)])

    @app.get("/api/plots/unique-counts.png", tags=["collection"], responses={
        404: {"model": Error}, 200: {"content": {"image/png": {}}}})
    def unique_counts_plot(request: Request) -> Response:
        """Unique images per label against dHash size (the exact rule), as a PNG; drawn once per change."""
        png, etag = ctx.plot.png()
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # revalidate: it changes when steps run
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/api/health", tags=["health"])
    def health() -> JSONResponse:
        """Whether the database answers, and what can be searched."""
        try:
            with db.engine.connect() as conn:
                stored = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
                embedded = conn.execute(sa.select(sa.func.count()).select_from(embeddings)).scalar()
        except sa.exc.SQLAlchemyError as exc:
            log.error("health check: database error: %s", exc)
            return JSONResponse({"status": "error", "error": "database unavailable"}, status_code=503)
        try:
            indexed = len(collection(db).ids)
        except LookupError:
            indexed = 0
        return JSONResponse({"status": "ok", "version": __version__, "database": db.dialect,
                             "images": stored, "embeddings": embedded, "indexed": indexed})


# ---------------------------------------------------------------- pages

_templates = Environment(loader=PackageLoader("lookalike.web", "templates"),
                         autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def similar_url(image_id: int, k: int = DEFAULT_K, label: str | None = None) -> str:
    """The search page's address for "similar to this"; only what differs from the defaults is in it."""
    query = {"id": image_id} | ({"k": k} if k != DEFAULT_K else {}) | ({"label": label} if label else {})
    return "/?" + urlencode(query)


def browse_url(label: str | None = None, unlabelled: bool = False, offset: int = 0) -> str:
    """The browse page's address, with only what differs from the defaults in it."""
    query = ({"label": label} if label is not None else {}) | ({"unlabelled": "true"} if unlabelled else {}) \
        | ({"offset": offset} if offset else {})
    return "/browse" + ("?" + urlencode(query) if query else "")


_templates.globals.update(similar_url=similar_url, browse_url=browse_url)


def _page(name: str, status: int = 200, **values) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**values), status_code=status)


def _picks(db: Database) -> list[tuple[int, str | None]]:
    """A random handful of searchable stored images, from the cached index (no database scan)."""
    try:
        coll = collection(db)
    except LookupError:
        return []
    chosen = np.random.default_rng().choice(coll.ids, size=min(PICKER_IMAGES, len(coll.ids)), replace=False)
    labels = coll.labels(chosen)
    return [(int(i), labels.get(int(i), (None, ""))[0]) for i in chosen]


def _page_routes(app: FastAPI, ctx: _Context) -> None:
    db = ctx.db

    async def preview(outcome: Outcome) -> str | None:
        """The query's picture: a stored thumbnail, or the query's bytes shrunk (None when busy or undecodable)."""
        if outcome.data is None:
            return f"/api/images/{outcome.query.image_id}/thumbnail"
        try:
            return await ctx.decodes.run(time.monotonic(), lambda: _data_uri(outcome.data))
        except ApiError:
            return None

    async def search_page(query: SimilarRequest | None, upload: tuple[str, bytes] | None,
                          error: str | None = None, status: int = 200) -> HTMLResponse:
        labels = await run_in_threadpool(label_counts, db)
        values: dict[str, Any] = {"page": "search", "max_upload_bytes": ctx.max_upload_bytes, "max_k": MAX_K,
                                  "k": query.k if query else DEFAULT_K, "label": query.label if query else None,
                                  "labels": [label for label, _ in labels if label is not None],
                                  "url": query.url if query else None, "id": query.id if query else None,
                                  "error": error}
        if error is None and query is not None and (upload or query.url or query.id is not None):
            try:
                outcome = await ctx.search(query, upload)
                values.update(outcome=outcome, preview=await preview(outcome), cards=await run_in_threadpool(
                    image_cards, db, [m.image_id for m in outcome.matches]))
            except LookalikeError as exc:  # e.g. a label no image has: said on the page, with its status
                values["error"], status = mask_secrets(str(exc)), exc.http_status
        values["picks"] = await run_in_threadpool(_picks, db)
        return _page("search.html", status, **values)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_get(id: str | None = None, url: str | None = None, k: str | None = None,
                         label: str | None = None) -> HTMLResponse:
        fields = {key: value for key, value in (("id", id), ("url", url), ("k", k), ("label", label))
                  if value not in (None, "")}
        try:
            query = SimilarRequest.model_validate(fields)
        except ValidationError as exc:
            return await search_page(None, None, _validation_message(exc.errors()), 422)
        return await search_page(query, None)

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_post(request: Request) -> HTMLResponse:
        try:
            query, upload = await _read_query(request)
        except ApiError as exc:
            return await search_page(None, None, exc.message, exc.status)
        return await search_page(query, upload)

    @app.get("/browse", response_class=HTMLResponse, include_in_schema=False)
    def browse_page(label: LabelParam = None, unlabelled: UnlabelledParam = False,
                    offset: OffsetParam = 0) -> HTMLResponse:
        values: dict[str, Any] = {"page": "browse", "labels": label_counts(db), "per_page": IMAGES_PER_PAGE,
                                  "label": label, "unlabelled": unlabelled}
        try:
            values["result"] = browse_images(db, label, unlabelled, offset)
        except ApiError as exc:
            return _page("browse.html", exc.status, error=exc.message, **values)
        return _page("browse.html", **values)

    @app.get("/images/{image_id}", response_class=HTMLResponse, include_in_schema=False)
    def image_page(image_id: ImageIdParam) -> HTMLResponse:
        try:
            row = _image_row(db, image_id)
        except ApiError as exc:
            return _page("image.html", exc.status, page="browse", error=exc.message)
        sources, source_count = _image_sources(db, image_id)
        try:
            metadata = json.loads(row.metadata) if row.metadata else {}
        except ValueError:
            metadata = {}
        metadata = {str(key): mask_secrets(str(value)) for key, value in metadata.items()} \
            if isinstance(metadata, dict) else {}
        return _page("image.html", page="browse", image=_card(row), row=row, sources=sources,
                     source_count=source_count, metadata=metadata)

    def render_duplicates(run: int | None, page: int, sort: str, error: str | None = None,
                          status: int = 200) -> HTMLResponse:
        values: dict[str, Any] = {"page": "duplicates", "runs": _runs(db), "number": page, "sort": sort,
                                  "sorts": get_args(Sort), "per_page": GROUPS_PER_PAGE, "error": error}
        try:
            values["result"] = duplicates(db, run, (page - 1) * GROUPS_PER_PAGE, GROUPS_PER_PAGE, sort)
            # Decisions are made on the latest run's groups only.
            values["reviewable"] = values["result"].run is not None and values["result"].run.id == values["runs"][0].id
            values["cards"] = image_cards(db, [m.image_id for g in values["result"].groups for m in g.members])
        except ApiError as exc:
            values.update(error=exc.message, result=None)
            status = exc.status
        return _page("duplicates.html", status, **values)

    @app.get("/duplicates", response_class=HTMLResponse, include_in_schema=False)
    def duplicates_page(run: RunIdParam = None, page: Annotated[int, Query(ge=1)] = 1,
                        sort: SortParam = DEFAULT_SORT) -> HTMLResponse:
        return render_duplicates(run, page, sort)

    @app.post("/duplicates/review", response_class=HTMLResponse, include_in_schema=False)
    async def duplicates_review(request: Request) -> Response:
        """The page's buttons: one form per group; the button pressed sends `decision` or `decision:image`."""
        form = await request.form(max_files=0, max_fields=16)
        sort = form.get("sort") if form.get("sort") in get_args(Sort) else DEFAULT_SORT
        page = int(form["page"]) if str(form.get("page", "")).isdigit() and 0 < int(form["page"]) <= MAX_ID else 1
        try:
            _same_origin(request)
            decision, _, image = str(form.get("action", "")).partition(":")
            image_id = int(image) if image.isascii() and image.isdigit() else image or None   # else refused below
            body = ReviewRequest.model_validate({"decision": decision, "image_id": image_id,
                                                 "by": form.get("by") or None, "note": form.get("note") or None})
            group = str(form.get("group_id", ""))
            if not group.isdigit() or not 0 < int(group) <= MAX_ID:
                raise ApiError(422, "group_id must be a group's id")
            outcome = await run_in_threadpool(review_decision, db, int(group), body)
        except ValidationError as exc:
            return await run_in_threadpool(render_duplicates, None, page, sort,
                                           _validation_message(exc.errors()), 422)
        except LookalikeError as exc:
            return await run_in_threadpool(render_duplicates, None, page, sort, mask_secrets(str(exc)),
                                           exc.http_status)
        anchor = f"#group-{outcome.group}" if outcome.group else ""
        return Response(status_code=303, headers={"Location": f"/duplicates?{urlencode(dict(sort=sort, page=page))}"
                                                              f"{anchor}"})

    @app.get("/collection", response_class=HTMLResponse, include_in_schema=False)
    def collection_page() -> HTMLResponse:
        status = collection_status(db)
        labels: dict[str, dict[str, int]] = {}
        for label, state, count in status.by_label:
            labels.setdefault(label or "(no label)", {})[state] = count
        totals = {state: sum(counts.get(state, 0) for counts in labels.values()) for state in ("ok", "failed")}
        return _page("collection.html", page="collection", database=db.dialect, labels=labels, totals=totals,
                     failures=status.fetch_failures, models=_embedding_counts(db), runs=_runs(db),
                     unique=ctx.plot.table(), evaluation=_last_evaluation(db))


# ---------------------------------------------------------------- the image-quality report (`lookalike inspect`)

QualityFlag = Literal[quality.FLAGS]
QualityFlagParam = Annotated[QualityFlag | None, Query(description="only images with this flag (default: any)")]
QUALITY_PER_PAGE = 40


class QualityImage(BaseModel):
    image_id: int
    label: str | None
    source: str
    width: int | None
    height: int | None
    flags: list[str]
    scores: dict[str, float | int | None] = Field(description="sharpness, brightness, dark_share, bright_share, "
                                                               "luminance_p01, luminance_p99, entropy, aspect, pixels")
    thumbnail_url: str


class QualityResponse(BaseModel):
    flag: QualityFlag | None
    total: int = Field(description="flagged images over all pages")
    offset: int
    images: list[QualityImage]


def quality_page(db: Database, flag: str | None, offset: int, limit: int) -> QualityResponse:
    """A page of the stored quality report: images with ``flag`` (any flag when None), worst first."""
    found = quality.quality_report(db, flag=flag, offset=offset, limit=limit)
    return QualityResponse(flag=flag, total=found.total, offset=offset, images=[
        QualityImage(image_id=r.image_id, label=r.label, source=mask_secrets(r.source), width=r.width,
                     height=r.height, flags=r.flags, scores=r.scores,
                     thumbnail_url=f"/api/images/{r.image_id}/thumbnail")
        for r in found.rows])


def _quality_routes(app: FastAPI, db: Database) -> None:
    @app.get("/api/quality", response_model=QualityResponse, tags=["quality"], responses=ERRORS)
    def quality_report(flag: QualityFlagParam = None, offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> QualityResponse:
        """The images `lookalike inspect` flagged (blurry, dark, bright, low-information, odd-aspect, tiny), with
        their scores; worst first for one flag, by id for any."""
        return quality_page(db, flag, offset, limit)

    @app.get("/quality", response_class=HTMLResponse, include_in_schema=False)
    def quality_html(flag: str | None = None, page: Annotated[int, Query(ge=1, le=MAX_ID)] = 1) -> HTMLResponse:
        values: dict[str, Any] = {"page": "quality", "flags": quality.FLAGS, "number": page,
                                  "per_page": QUALITY_PER_PAGE, "thresholds": quality.THRESHOLDS, "flag": None}
        if flag and flag not in quality.FLAGS:   # the form's "any flag" sends an empty flag
            return _page("quality.html", 422, error=f"flag must be one of {', '.join(quality.FLAGS)}", **values)
        values["flag"] = flag or None
        result = quality_page(db, values["flag"], (page - 1) * QUALITY_PER_PAGE, QUALITY_PER_PAGE)
        return _page("quality.html", result=result, **values)


# ---------------------------------------------------------------- running it

def serve(db_url: str | None, store: str | Path | None, host: str = "127.0.0.1", port: int = 8000, *,
          allow_private_urls: bool = False) -> None:
    """Serve the app over the database at ``db_url`` until interrupted (what `lookalike serve` runs)."""
    import uvicorn  # lazy: the server's own dependency, for serving only (tests and callers use create_app)
    with Database(db_url, store) as db:
        app = create_app(db, allow_private_urls=allow_private_urls)
        print(f"lookalike: serving {db.dialect} database on http://{host}:{port}/ (API docs at /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL (port 0: a free one)."""
    import uvicorn  # lazy: the server's own dependency, for serving only (tests and callers use create_app)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lookalike-web", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the web server stopped while starting")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
