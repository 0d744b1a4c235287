"""The web app's JSON API and pages, served by real uvicorn over loopback, on a small real collection.

The collection is the rendered sample set (three textures), loaded, embedded by the
real EfficientNet-Lite0, hashed, deduplicated, split and evaluated — once per module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike import hashing
from lookalike.db import Database, images
from lookalike.dedupe import dedupe_images
from lookalike.evaluate import evaluate_model
from lookalike.features import featurize_images
from lookalike.images import open_image
from lookalike.ingest import FetchLimits, load_images
from lookalike.reports import duplicate_groups_report
from lookalike.samples import LABELS, SampleSet, render_samples
from lookalike.search import similar_images
from lookalike.split import split_images
from lookalike.web.app import MAX_K, browse_images, create_app, file_name, running_server
from support.http import LocalHTTPServer

PER_LABEL = 6  # 3 labels: 18 originals and a couple of near-copies


def build_collection(root: Path, db_url: str | None = None, samples: SampleSet | None = None,
                     *, full: bool = True) -> tuple[Database, SampleSet]:
    """Render (or reuse) the sample set and run the pipeline into ``db_url`` (default: SQLite under ``root``)."""
    samples = samples or render_samples(root / "samples", per_label=PER_LABEL, seed=1)
    db = Database(db_url or f"sqlite:///{root}/web.db", root / "store")
    load_images(db, samples.manifest, progress=False)
    featurize_images(db, progress=False)
    if full:
        hashing.hash_images(db, progress=False)
        dedupe_images(db, rule="near")
        split_images(db, test_ratio=0.34, seed=0)
        evaluate_model(db, queries_per_label=2, negatives_per_query=5)
    return db, samples


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, SampleSet]]:
    db, samples = build_collection(tmp_path_factory.mktemp("web"))
    yield db, samples
    db.close()


@pytest.fixture(scope="module")
def db(built) -> Database:
    return built[0]


@pytest.fixture(scope="module")
def samples(built) -> SampleSet:
    return built[1]


@pytest.fixture(scope="module")
def client(db: Database) -> Iterator[httpx.Client]:
    """The app as shipped (private URLs refused, load-step fetch limits), over real HTTP."""
    with running_server(create_app(db)) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def stored(db: Database, path: Path) -> int:
    """The id of the stored image with the bytes of ``path``."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with db.engine.connect() as conn:
        return conn.execute(sa.select(images.c.id).where(images.c.sha256 == sha)).scalar_one()


def original(samples: SampleSet, label: str = "dotted", number: int = 2) -> Path:
    return samples.root / label / f"{label}_{number:04d}.jpg"


def family(samples: SampleSet, path: Path) -> set[str]:
    """The sources of ``path`` and of the near-copies the sample set planted of it."""
    rel = path.relative_to(samples.root).as_posix()
    rows = [line.split(",") for line in samples.ground_truth.read_text().splitlines()[1:]]
    return {str(path.resolve())} | {str((samples.root / copy).resolve()) for copy, of, _ in rows if of == rel}


def changed_copy(path: Path) -> bytes:
    """A new image: ``path`` shrunk to 80% and re-encoded, so its bytes are stored nowhere."""
    image = open_image(path.read_bytes())
    image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return out.getvalue()


def result_ids(response: httpx.Response) -> list[int]:
    return [r["image_id"] for r in response.json()["results"]]


def assert_ranked(body: dict, k: int) -> None:
    results = body["results"]
    assert len(results) == k
    assert [r["rank"] for r in results] == list(range(1, k + 1))
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    assert len({r["image_id"] for r in results}) == k  # never the same image twice
    for r in results:
        assert r["similarity"] == pytest.approx(1 - r["distance"])
        assert r["label"] in LABELS
        assert r["thumbnail_url"] == f"/api/images/{r['image_id']}/thumbnail"


# ---------------------------------------------------------------- searching

def test_health_reports_what_is_searchable(client, db):
    with db.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
    body = client.get("/api/health").json()
    assert body == {"status": "ok", "version": body["version"], "database": "sqlite", "images": count,
                    "embeddings": count, "indexed": count}


def test_uploading_a_stored_image_lists_ten_others_best_first(client, db, samples):
    path = original(samples)
    query_id = stored(db, path)
    response = client.post("/api/similar", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["kind"] == "upload" and body["query"]["name"] == path.name
    assert body["query"]["image_id"] == query_id and body["query"]["label"] == "dotted"
    assert_ranked(body, 10)
    assert query_id not in result_ids(response)
    # The API answers exactly what the search step answers.
    assert result_ids(response) == [m.image_id for m in similar_images(db, path.read_bytes(), k=10)]


def test_a_new_image_finds_its_original_first(client, db, samples):
    path = original(samples, "leopard", 3)
    response = client.post("/api/similar", files={"file": ("copy.jpg", changed_copy(path), "image/jpeg")},
                           data={"k": "5"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["image_id"] is None
    assert_ranked(body, 5)
    assert body["results"][0]["source"] in family(samples, path)
    assert body["results"][0]["similarity"] > 0.9


def test_search_by_id_excludes_the_image_itself(client, db, samples):
    query_id = stored(db, original(samples, "striped", 1))
    by_post = client.post("/api/similar", json={"id": query_id, "k": 10})
    by_get = client.get(f"/api/images/{query_id}/similar", params={"k": 10})
    assert by_post.status_code == by_get.status_code == 200
    assert_ranked(by_post.json(), 10)
    assert query_id not in result_ids(by_post)
    assert result_ids(by_post) == result_ids(by_get) == [m.image_id for m in similar_images(db, query_id)]
    assert by_post.json()["query"] == {"kind": "id", "name": f"image {query_id}", "image_id": query_id,
                                       "label": "striped", "sha256": by_post.json()["query"]["sha256"]}


def test_k_is_bounded(client, db, samples):
    query_id = stored(db, original(samples))
    assert len(result_ids(client.post("/api/similar", json={"id": query_id, "k": 3}))) == 3
    for k in (0, 1001, "many"):
        response = client.post("/api/similar", json={"id": query_id, "k": k})
        assert response.status_code == 422
        assert response.json()["error"].startswith("k: ")
    assert client.get(f"/api/images/{query_id}/similar", params={"k": 0}).status_code == 422


@pytest.mark.parametrize("body, status, reason", [
    ({}, 422, "give exactly one of"),
    ({"id": 1, "url": "https://example.com/a.jpg"}, 422, "got url, id"),
    ({"id": 1, "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"id": 1, "space": "pixels"}, 422, "space: "),
    ([1, 2], 422, "must be an object"),
])
def test_malformed_queries_say_what_is_wrong(client, body, status, reason):
    response = client.post("/api/similar", json=body)
    assert response.status_code == status
    assert reason in response.json()["error"]


def test_a_body_that_is_not_json_or_a_form_is_refused(client):
    response = client.post("/api/similar", content=b"{not json", headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (400, {"error": "the request body is not valid JSON"})
    response = client.post("/api/similar", content=b"id=1", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "multipart" in response.json()["error"]


@pytest.mark.parametrize("name, data, status, reason", [
    ("notes.txt", b"this is a text file, not a picture\n", 415, "not an image: text"),
    ("page.jpg", b"<!DOCTYPE html><html><body>hello</body></html>", 415, "not an image: HTML page"),
    ("empty.jpg", b"", 422, "empty file"),
])
def test_uploads_that_are_not_images_are_refused_with_the_reason(client, name, data, status, reason):
    response = client.post("/api/similar", files={"file": (name, data, "image/jpeg")})
    assert response.status_code == status
    assert reason in response.json()["error"]


def test_a_truncated_image_is_refused(client, samples):
    data = original(samples).read_bytes()
    response = client.post("/api/similar", files={"file": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert response.status_code == 422
    assert "truncated" in response.json()["error"]


def test_uploads_over_the_limit_get_413(client):
    over = b"\xff" * (20 * 2**20 + 1)
    response = client.post("/api/similar", files={"file": ("big.jpg", over, "image/jpeg")})
    assert response.status_code == 413
    assert response.json() == {"error": "request body over the 20 MB limit"}

    def chunks():  # no Content-Length: the cap must count what arrives
        for _ in range(21):
            yield b"\xff" * 2**20
    response = client.post("/api/similar", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "ftp://example.com/a.jpg",
                                 "http:///a.jpg", "javascript:alert(1)"])
def test_only_http_urls_are_fetched(client, url):
    response = client.post("/api/similar", json={"url": url})
    assert response.status_code == 400
    assert response.json() == {"error": "only http:// and https:// URLs can be fetched"}


def test_private_addresses_are_refused_before_any_request(client, sample_images):
    with LocalHTTPServer(sample_images) as server:
        for url in (server.url("/img/a.jpg"), server.url("/img/a.jpg").replace("127.0.0.1", "localhost")):
            response = client.post("/api/similar", json={"url": url})
            assert response.status_code == 400
            assert "loopback" in response.json()["error"]
        assert sum(server.hits.values()) == 0


@pytest.fixture(scope="module")
def lan_client(db: Database) -> Iterator[httpx.Client]:
    """The app allowed to fetch from loopback (a server on a private network), retrying once."""
    app = create_app(db, allow_private_urls=True, limits=FetchLimits(retries=1, backoff=0.05))
    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def test_a_url_is_fetched_and_searched(lan_client, db, samples):
    path = original(samples, "leopard", 5)
    with LocalHTTPServer({"new.jpg": changed_copy(path), "stored.jpg": path.read_bytes()}) as server:
        response = lan_client.post("/api/similar", json={"url": server.url("/redirect/2/new.jpg"), "k": 4})
        assert response.status_code == 200, response.text
        assert_ranked(response.json(), 4)
        assert response.json()["query"]["kind"] == "url"
        assert response.json()["results"][0]["source"] in family(samples, path)
        response = lan_client.post("/api/similar", json={"url": server.url("/img/stored.jpg")})
        assert response.json()["query"]["image_id"] == stored(db, path)
        assert stored(db, path) not in result_ids(response)


@pytest.mark.parametrize("route, status, reason", [
    ("/404", 502, "cannot fetch the URL: HTTP 404"),
    ("/huge", 502, "too large"),                          # the load step's 50 MB cap
    ("/flaky500/a.jpg", 200, None),                       # retried, as loading does
    ("/html", 415, "not an image: HTML page"),
])
def test_url_failures_say_why(lan_client, sample_images, route, status, reason):
    with LocalHTTPServer(sample_images) as server:
        response = lan_client.post("/api/similar", json={"url": server.url(route)})
    assert response.status_code == status, response.text
    if reason:
        assert reason in response.json()["error"]


def test_an_unreachable_url_is_a_bad_gateway(lan_client):
    with LocalHTTPServer() as server:
        url = server.url("/img/a.jpg")
    response = lan_client.post("/api/similar", json={"url": url})  # the server is gone: connection refused
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("route", ["/api/images/{}", "/api/images/{}/thumbnail", "/api/images/{}/full",
                                   "/api/images/{}/similar"])
def test_unknown_ids_are_404(client, route):
    response = client.get(route.format(987654))
    assert (response.status_code, response.json()) == (404, {"error": "no image with id 987654"})
    assert client.post("/api/similar", json={"id": 987654}).status_code == 404


def test_thumbnails_are_small_cacheable_jpegs(client, db, samples):
    path = original(samples, "striped", 2)
    image_id = stored(db, path)
    response = client.get(f"/api/images/{image_id}/thumbnail")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 256
    width, height = Image.open(path).size
    assert thumb.size[0] / thumb.size[1] == pytest.approx(width / height, rel=0.02)
    again = client.get(f"/api/images/{image_id}/thumbnail", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_full_image_is_the_stored_bytes(client, db, samples):
    path = original(samples, "dotted", 4)
    response = client.get(f"/api/images/{stored(db, path)}/full")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == path.read_bytes()


def test_image_metadata(client, db, samples):
    path = original(samples, "leopard", 1)
    image_id = stored(db, path)
    body = client.get(f"/api/images/{image_id}").json()
    with Image.open(path) as image:
        size = image.size
    assert body["id"] == image_id and body["label"] == "leopard" and body["status"] == "ok"
    assert (body["width"], body["height"], body["format"]) == (*size, "JPEG")
    assert body["byte_size"] == path.stat().st_size
    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["source"] == str(path.resolve()) and body["embedded"] is True


def test_images_are_listed_by_label_a_page_at_a_time(client, db):
    with db.engine.connect() as conn:
        striped = conn.execute(sa.select(images.c.id).where(images.c.label == "striped", images.c.status == "ok")
                               .order_by(images.c.id)).scalars().all()
    pages = [client.get("/api/images", params={"label": "striped", "offset": offset, "limit": 4}).json()
             for offset in range(0, len(striped), 4)]
    assert [card["id"] for page in pages for card in page["images"]] == striped
    assert {page["total"] for page in pages} == {len(striped)}
    card = pages[0]["images"][0]
    assert card["label"] == "striped" and card["name"] == Path(card["source"]).name
    assert card["full_url"] == f"/api/images/{card['id']}/full"
    assert client.get("/api/images", params={"unlabelled": "true"}).json()["total"] == 0
    everything = client.get("/api/images", params={"limit": 1000}).json()
    assert everything["total"] == len(everything["images"]) > len(striped)


@pytest.mark.parametrize("params, reason", [
    ({"label": "striped", "unlabelled": "true"}, "give label or unlabelled, not both"),
    ({"offset": -1}, "offset: Input should be greater than or equal to 0"),
    ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
    ({"label": ""}, "label: String should have at least 1 character"),
])
def test_listing_refuses_bad_queries_in_the_one_error_shape(client, params, reason):
    response = client.get("/api/images", params=params)
    assert response.status_code == 422 and response.json() == {"error": reason}


@pytest.mark.parametrize("source, name", [
    ("/data/photos/shirt 1.jpg", "shirt 1.jpg"),
    ("https://shop.example/img/il_570xN.jpg?sig=secret", "il_570xN.jpg"),
    ("https://shop.example/a%20b.png", "a b.png"),
    ("https://shop.example/", "https://shop.example/"),
])
def test_a_card_names_the_file_of_its_source(source, name):
    assert file_name(source) == name


# ---------------------------------------------------------------- duplicates and collection

def test_duplicate_groups_are_the_latest_dedupe_run(client, db):
    body = client.get("/api/duplicates").json()
    groups = duplicate_groups_report(db)
    assert groups, "the sample set plants near-copies"
    assert body["groups_total"] == len(groups) and body["run"]["id"] == groups[0].run_id
    for group, answered in zip(groups, body["groups"]):
        assert answered["keeper"] == group.keeper.image_id == answered["members"][0]["image_id"]
        assert [m["image_id"] for m in answered["members"]] == [m.image_id for m in group.members]
        assert [m["is_keeper"] for m in answered["members"]] == [True] + [False] * (len(group.members) - 1)
        assert answered["size"] == len(group.members) >= 2
    assert client.get("/api/duplicates", params={"offset": len(groups)}).json()["groups"] == []
    response = client.get("/api/duplicates", params={"run_id": 999})
    assert (response.status_code, response.json()) == (404, {"error": "no dedupe run with id 999"})


def test_duplicates_page_marks_keepers(client, db):
    groups = duplicate_groups_report(db)
    page = client.get("/duplicates").text
    assert page.count('<figure class="keeper"') == len(groups)
    assert page.count('<figure class="duplicate"') == sum(len(g.duplicates) for g in groups)
    for group in groups:
        assert f'id="group-{group.group_id}" data-size="{len(group.members)}"' in page


def test_collection_page_shows_counts_plot_and_evaluation(client, samples):
    response = client.get("/collection")
    assert response.status_code == 200
    page = response.text
    for label in LABELS:
        assert f"<tr><td>{label}</td><td class=\"num\">{samples.per_label[label]}</td>" in page
    assert 'src="/api/plots/unique-counts.png"' in page
    assert "Evaluation #" in page and "<th class=\"num\">top1</th>" in page
    plot = client.get("/api/plots/unique-counts.png")
    assert plot.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(plot.content)).size[0] > 300


# ---------------------------------------------------------------- pages

def test_search_page_by_id_links_each_result(client, db, samples):
    query_id = stored(db, original(samples, "striped", 3))
    page = client.get("/", params={"id": query_id}).text
    expected = [m.image_id for m in similar_images(db, query_id)]
    assert [int(part.split('"')[0]) for part in page.split('data-image-id="')[2:12]] == expected
    for image_id in expected:
        assert f'<a href="/?id={image_id}"' in page


def test_search_page_filters_by_label_and_keeps_label_and_k_in_its_links(client, db, samples):
    query_id = stored(db, original(samples, "dotted", 1))
    page = client.get("/", params={"id": query_id, "k": 3, "label": "striped"}).text
    expected = [m.image_id for m in similar_images(db, query_id, k=3, label="striped")]
    assert [int(part.split('"')[0]) for part in page.split('data-image-id="')[2:]] == expected
    for image_id in expected:
        assert f'href="/?id={image_id}&amp;k=3&amp;label=striped"' in page  # "similar to this"
        assert f'href="/images/{image_id}"' in page  # the full-size view
    assert '<option value="striped" selected>' in page and f'data-option="k" min="1" max="{MAX_K}" value="3"' in page


def test_browse_page_pages_through_a_label_with_cards(client, db):
    first = client.get("/browse", params={"label": "leopard"}).text
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.source).where(images.c.label == "leopard")
                            .order_by(images.c.id)).all()
    for image_id, source in rows:
        assert f'data-image-id="{image_id}"' in first and f">{Path(source).name}</a>" in first
    assert 'class="chip active">leopard' in first and f"of {len(rows)} with label" in first
    assert client.get("/browse", params={"offset": 10**6}).status_code == 200
    response = client.get("/browse", params={"label": "leopard", "unlabelled": "true"})
    assert response.status_code == 422 and "give label or unlabelled, not both" in response.text


def test_full_size_page_shows_what_the_image_is(client, db, samples):
    path = original(samples, "striped", 2)
    image_id = stored(db, path)
    page = client.get(f"/images/{image_id}").text
    assert f'src="/api/images/{image_id}/full"' in page and f'href="/?id={image_id}"' in page
    assert path.name in page and str(path.resolve()) in page and hashlib.sha256(path.read_bytes()).hexdigest() in page
    response = client.get("/images/987654")
    assert response.status_code == 404 and "no image with id 987654" in response.text


def test_api_docs_come_from_this_server(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "//" not in page.text.replace("http://www.w3.org", "")  # no other host named
    assert "script-src 'self' 'unsafe-inline'" in page.headers["content-security-policy"]
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/redoc").json() == {"error": "Not Found"}


def test_search_page_shows_errors_with_their_status(client):
    response = client.get("/", params={"id": "abc"})
    assert response.status_code == 422 and 'role="alert"' in response.text and "id: " in response.text
    response = client.get("/", params={"id": 987654})
    assert response.status_code == 404 and "no image with id 987654" in response.text
    response = client.post("/", files={"file": ("notes.txt", b"plain words", "text/plain")})
    assert response.status_code == 415 and "not an image: text" in response.text


def test_pages_send_a_content_security_policy(client):
    for route in ("/", "/duplicates", "/collection", "/browse", "/images/1"):
        response = client.get(route)
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "<script>" not in response.text  # no inline script: the policy would block it


def test_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/similar", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail", "/api/duplicates",
            "/api/health"} <= set(spec["paths"])
    body = spec["paths"]["/api/similar"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}


def test_the_database_url_is_never_shown(client, db):
    url_parts = [str(Path(db.url.database).resolve()), Path(db.url.database).name]
    for route in ("/api/health", "/collection", "/", "/duplicates"):
        text = client.get(route).text
        assert not any(part in text for part in url_parts), route


def test_logged_query_strings_and_passwords_are_masked(client):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))
    handler = Keep()
    access, errors = logging.getLogger("uvicorn.access"), logging.getLogger("uvicorn.error")
    level = access.level
    access.addHandler(handler), errors.addHandler(handler), access.setLevel(logging.INFO)
    try:
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/?url=http%3A%2F%2Fu%3Ahunter2%40h", "1.1", 200)
        errors.error("cannot reach postgresql://app:%s@db.internal/images", "hunter2")
    finally:
        access.removeHandler(handler), errors.removeHandler(handler), access.setLevel(level)
    assert records == ['127.0.0.1:5 - "GET /?… HTTP/1.1" 200',
                       "cannot reach postgresql://app:***@db.internal/images"]


def test_concurrent_requests_get_the_same_answers(client, db, samples):
    paths = [original(samples, label, n) for label in LABELS for n in (1, 2)]
    uploads = [changed_copy(path) for path in paths]
    ids = [stored(db, path) for path in paths]

    def ask(number: int) -> list[int]:
        if number % 2:
            return result_ids(client.post("/api/similar", json={"id": ids[number % len(ids)]}))
        return result_ids(client.post("/api/similar", files={"file": ("q.jpg", uploads[number % len(uploads)])}))

    expected = [ask(n) for n in range(12)]
    answers: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, ask(n))) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers[n] for n in range(12)] == expected


# ---------------------------------------------------------------- PostgreSQL

def test_the_app_works_on_postgresql(pg_url, built, tmp_path):
    sqlite_db, samples = built
    pg_db, _ = build_collection(tmp_path, pg_url, samples, full=False)
    try:
        path = original(samples, "dotted", 5)
        with running_server(create_app(pg_db)) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
            health = http.get("/api/health").json()
            assert health["database"] == "postgresql" and health["indexed"] == health["images"]
            by_upload = http.post("/api/similar", files={"file": (path.name, changed_copy(path))})
            query_id = stored(pg_db, path)
            by_id = http.get(f"/api/images/{query_id}/similar")
            assert pg_url.split("@")[-1] not in http.get("/collection").text
            # The largest id the API takes is a plain 404 here too (the id column is narrower).
            largest = [http.get("/api/images/9223372036854775807"), http.post("/api/similar", json={"id": 2**63 - 1})]
            dotted = http.get("/api/images", params={"label": "dotted", "limit": 1000}).json()
            beyond = http.get("/api/images", params={"offset": 2**63 - 1}).json()
            pages = [http.get(route).status_code for route in
                     ("/browse?label=dotted", f"/images/{query_id}", "/images/9223372036854775807")]
        assert by_upload.status_code == by_id.status_code == 200
        assert pages == [200, 200, 404] and beyond["images"] == [] and beyond["total"] == health["images"]
        assert sorted(c["name"] for c in dotted["images"]) == sorted(
            c.name for c in browse_images(sqlite_db, "dotted", limit=1000).images)
        assert [r.status_code for r in largest] == [404, 404], [r.text for r in largest]
        assert_ranked(by_upload.json(), 10)
        assert query_id not in result_ids(by_id)
        # Ids differ between the databases (loading is concurrent); the images found must not.
        on_sqlite = similar_images(sqlite_db, changed_copy(path), k=10)
        assert [r["source"] for r in by_upload.json()["results"]] == [m.source for m in on_sqlite]
    finally:
        pg_db.close()
