"""Hostile use of the web app: slow servers, huge images, odd ids, a crowd on /collection.

Real uvicorn on 127.0.0.1 over a real SQLite collection, the misbehaving HTTP
server of support.http, and a server subprocess whose peak memory is read from
/proc. Every loop is bounded in count; every test has its own timeout.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike import hashing, reports
from lookalike.db import Database, images, now
from lookalike.features import featurize_images
from lookalike.ingest import FetchLimits, load_images
from lookalike.samples import render_samples
from lookalike.web.app import FETCH_WORKERS, MAX_ID, create_app, running_server
from support.http import LocalHTTPServer
from support.pixels import blank_rgb_png

TESTS = Path(__file__).resolve().parents[1]
SLOW_QUERIES = 50      # concurrent URL queries at a server that sends its headers slowly
DEADLINE_S = 6.0       # the app's limit per query in these tests
QUEUE_WAIT_S = 2.0
HEALTH_BOUND_S = 3.0   # a health check slower than this while fetches are stuck counts as a hang


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, Path]]:
    root = tmp_path_factory.mktemp("hostile-web")
    samples = render_samples(root / "samples", per_label=3, seed=3)
    db = Database(f"sqlite:///{root}/web.db", root / "store")
    load_images(db, samples.manifest, progress=False)
    featurize_images(db, progress=False)
    hashing.hash_images(db, progress=False)
    yield db, root
    db.close()


@pytest.fixture(scope="module")
def db(collection) -> Database:
    return collection[0]


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    return blank_rgb_png(9000, 9000)  # 81 megapixels in about 240 KB


def _some_image_id(db: Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.min(images.c.id)).where(images.c.status == "ok")).scalar_one()


def _all_at_once(count: int, ask: Callable[[int], object]) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(ask, range(count)))


# ---------------------------------------------------------------- slow servers

@pytest.mark.timeout(120)
def test_slow_header_urls_never_starve_health_or_thumbnails(db):
    app = create_app(db, allow_private_urls=True, limits=FetchLimits(timeout=2, retries=0),
                     deadline=DEADLINE_S, queue_wait=QUEUE_WAIT_S)
    image_id = _some_image_id(db)
    with LocalHTTPServer() as slow, running_server(app) as base_url, \
            httpx.Client(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=SLOW_QUERIES + 5)) as http:
        answers: list[tuple[float, httpx.Response]] = []

        def query(_: int) -> None:
            started = time.monotonic()
            response = http.post("/api/similar", json={"url": slow.url("/slow-headers")})
            answers.append((time.monotonic() - started, response))

        crowd = [threading.Thread(target=query, args=(n,)) for n in range(SLOW_QUERIES)]
        for thread in crowd:
            thread.start()
        checks = []
        for _ in range(5):  # while every fetch worker is stuck in a slow header
            time.sleep(0.5)
            for route in ("/api/health", f"/api/images/{image_id}/thumbnail"):
                started = time.monotonic()
                status = http.get(route, timeout=HEALTH_BOUND_S * 3).status_code
                checks.append((route, status, time.monotonic() - started))
        for thread in crowd:
            thread.join(timeout=60)
        fetched = slow.hits["/slow-headers"]

    assert all(status == 200 and seconds < HEALTH_BOUND_S for _, status, seconds in checks), checks
    assert len(answers) == SLOW_QUERIES
    statuses = sorted(response.status_code for _, response in answers)
    assert set(statuses) <= {502, 503, 504}, statuses
    assert fetched <= FETCH_WORKERS  # the others never left the queue
    for seconds, response in answers:
        assert seconds < DEADLINE_S + 5  # one deadline for the whole request, waiting included
        error = response.json()["error"]
        if response.status_code == 503:
            assert error == "busy: too many URL fetches at once, try again in 5 s"
            assert response.headers["retry-after"] == "5"
        else:
            assert ("took longer than the 6 s limit" in error or "too slow" in error or "timed out" in error), error
    assert statuses.count(503) >= SLOW_QUERIES - FETCH_WORKERS


# ---------------------------------------------------------------- huge images

_SERVER = """
import sys
from lookalike.db import Database
from lookalike.web.app import create_app, running_server
with Database(sys.argv[1], sys.argv[2]) as db, running_server(create_app(db)) as url:
    print(url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak memory from /proc")
@pytest.mark.timeout(240)
def test_huge_png_queries_are_refused_within_a_memory_bound(collection, huge_png):
    db, root = collection
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(db.url), str(root / "store")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), "the server did not start"
        with httpx.Client(base_url=base_url, timeout=120) as http:
            # A query that is decoded and embedded, so the baseline holds the model's working memory.
            warm = http.post("/api/similar", files={"file": ("new.png", _png(640, 480))})
            assert warm.status_code == 200, warm.text
            before = _peak_rss_mb(server.pid)
            answers = _all_at_once(8, lambda _: http.post("/api/similar", files={"file": ("huge.png", huge_png)}))
            grown = _peak_rss_mb(server.pid) - before
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    for response in answers:
        assert response.status_code == 422
        assert response.json() == {"error": "cannot use this file: too many pixels: 9000x9000 is 81.0 megapixels, "
                                            "over the limit of 40"}
    assert grown < 100, f"8 huge queries grew the server's peak memory by {grown:.0f} MB"  # was ~4.4 GB


@pytest.mark.timeout(60)
def test_a_stored_image_over_the_budget_has_no_thumbnail_and_says_why(db, huge_png):
    # Loading allows up to the 89-megapixel bomb guard, so such an image can be stored.
    sha = db.store.put(huge_png)
    with db.begin() as conn:
        conn.execute(sa.insert(images).values(sha256=sha, label="huge", source="huge.png", width=9000, height=9000,
                                              format="PNG", byte_size=len(huge_png), status="ok", loaded_at=now()))
        image_id = conn.execute(sa.select(images.c.id).where(images.c.sha256 == sha)).scalar_one()
    try:
        with running_server(create_app(db, warm=False)) as base_url, httpx.Client(base_url=base_url) as http:
            response = http.get(f"/api/images/{image_id}/thumbnail")
        assert (response.status_code, response.json()) == (422, {
            "error": f"image {image_id} cannot be decoded: too many pixels: 9000x9000 is 81.0 megapixels, "
                     "over the limit of 40"})
    finally:
        with db.begin() as conn:
            conn.execute(sa.delete(images).where(images.c.id == image_id))


# ---------------------------------------------------------------- ids

@pytest.fixture(scope="module")
def client(db: Database) -> Iterator[httpx.Client]:
    with running_server(create_app(db, warm=False)) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [2**63, 2**64, -(2**63) - 1, True, False, 1.0, "1", 0, -5, [1], {"id": 1}])
def test_json_ids_must_be_integers_in_range(client, value):
    response = client.post("/api/similar", json={"id": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("id: Input should be"), response.json()
    assert "Traceback" not in response.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ["/api/images/{}", "/api/images/{}/thumbnail", "/api/images/{}/full",
                                   "/api/images/{}/similar", "/api/duplicates?run_id={}", "/duplicates?run={}"])
def test_path_and_query_ids_must_be_in_range(client, route):
    for value in (2**63, 10**30, 0, -1, "true", "1.5"):
        response = client.get(route.format(value))
        assert response.status_code == 422, (value, response.text)
        assert "Input should be" in response.json()["error"] and "Traceback" not in response.text
    largest = client.get(route.format(MAX_ID))
    assert largest.status_code == 404, largest.text  # in range, and simply not there
    assert f"with id {MAX_ID}" in largest.text  # the duplicates page says so in HTML


@pytest.mark.timeout(60)
def test_the_search_page_refuses_ids_out_of_range(client):
    response = client.get("/", params={"id": str(2**63)})
    assert response.status_code == 422 and 'role="alert"' in response.text
    assert "id: Input should be less than or equal to 9223372036854775807" in response.text


# ---------------------------------------------------------------- /collection under a crowd

@pytest.mark.timeout(180)
def test_the_plot_is_drawn_once_per_change_however_many_ask(db, client, monkeypatch, tmp_path):
    drawn = []
    draw = reports.plot_unique_counts

    def counted(table, path):  # the real drawing, counted
        drawn.append(1)
        return draw(table, path)
    monkeypatch.setattr(reports, "plot_unique_counts", counted)

    plots = _all_at_once(30, lambda _: client.get("/api/plots/unique-counts.png"))
    pages = _all_at_once(30, lambda _: client.get("/collection"))
    assert {r.status_code for r in plots + pages} == {200}
    assert len({r.content for r in plots}) == 1 and len({r.headers["etag"] for r in plots}) == 1
    assert len(drawn) <= 1  # 0 when an earlier test of this module already drew it for this data
    etag = plots[0].headers["etag"]
    assert client.get("/api/plots/unique-counts.png", headers={"if-none-match": etag}).status_code == 304

    # A new image, hashed: the plot's data changed, so it is drawn again, once.
    out = tmp_path / "new" / "dotted"
    out.mkdir(parents=True)
    (out / "extra.png").write_bytes(_png(64, 48))
    load_images(db, tmp_path / "new", progress=False)
    hashing.hash_images(db, progress=False)
    before = len(drawn)
    again = _all_at_once(10, lambda _: client.get("/api/plots/unique-counts.png"))
    assert {r.headers["etag"] for r in again} != {etag} and len({r.headers["etag"] for r in again}) == 1
    assert len(drawn) == before + 1


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.radial_gradient("L").resize((width, height)).convert("RGB").save(out, "PNG")
    return out.getvalue()
