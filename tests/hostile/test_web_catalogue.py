"""Hostile input to the catalogue pages (browse, the full-size view, the search page's label filter):
markup in file names, labels and metadata, SQL in a label, absurd offsets, over-long labels.

Real uvicorn on 127.0.0.1 over a real SQLite collection of three small PNGs loaded from a manifest
(no embeddings needed); every test has its own timeout.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from lookalike.db import Database
from lookalike.ingest import load_images
from lookalike.web.app import MAX_ID, MAX_LABEL, create_app, running_server

pytestmark = pytest.mark.timeout(60)
MARKUP = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
SQL = "x' OR '1'='1"


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("hostile-catalogue")
    rows = [(MARKUP, f"{MARKUP}.png", MARKUP), (SQL, f"{SQL}.png", SQL), ("", "plain.png", ""),
            ("", "broken.png", "")]
    for n, (_, name, _) in enumerate(rows[:3]):
        (root / name).write_bytes(png((60 * n, 200, 90)))
    (root / "broken.png").write_bytes(png((1, 2, 3))[:60])  # cut short: recorded as failed
    manifest = root / "manifest.tsv"
    manifest.write_text("label\tpath\tsku\n" + "".join(f"{label}\t{name}\t{sku}\n" for label, name, sku in rows))
    with Database(f"sqlite:///{root}/h.db", root / "store") as db:
        load_images(db, manifest, progress=False)
        with running_server(create_app(db, warm=False)) as base_url, \
                httpx.Client(base_url=base_url, timeout=30) as http:
            yield http


def test_markup_in_names_labels_and_metadata_is_shown_as_text(client):
    listed = client.get("/api/images", params={"label": MARKUP}).json()
    assert listed["total"] == 1 and listed["images"][0]["name"] == f"{MARKUP}.png"
    image_id = listed["images"][0]["id"]
    for route, params in [("/browse", {}), ("/browse", {"label": MARKUP}), (f"/images/{image_id}", {}),
                          ("/", {"label": MARKUP})]:
        page = client.get(route, params=params)
        assert page.status_code == 200, route
        assert MARKUP not in page.text and ESCAPED in page.text, route


def test_sql_in_a_label_is_only_a_label(client):
    assert [i["label"] for i in client.get("/api/images", params={"label": SQL}).json()["images"]] == [SQL]
    assert client.get("/api/images", params={"label": "' OR 1=1 --"}).json()["total"] == 0
    assert client.get("/api/images", params={"unlabelled": "true"}).json()["total"] == 1


@pytest.mark.parametrize("route, params, status, reason", [
    ("/api/images", {"offset": MAX_ID + 1}, 422, "offset: Input should be less than or equal to"),
    ("/api/images", {"label": "l" * (MAX_LABEL + 1)}, 422, f"label: String should have at most {MAX_LABEL}"),
    ("/api/images", {"unlabelled": "maybe"}, 422, "unlabelled: Input should be a valid boolean"),
    ("/browse", {"offset": "1e9"}, 422, "offset: Input should be a valid integer"),
    ("/images/0", {}, 422, "image_id: Input should be greater than or equal to 1"),
    ("/images/99999999999999999999", {}, 422, "image_id: Input should be less than or equal to"),
])
def test_absurd_queries_get_one_line_in_the_one_error_shape(client, route, params, status, reason):
    response = client.get(route, params=params)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and response.json()["error"].startswith(reason)


def test_an_image_that_failed_to_load_is_explained_not_shown(client):
    assert "broken.png" not in client.get("/browse").text  # only decoded images are browsed
    pages = {image_id: client.get(f"/images/{image_id}") for image_id in range(1, 5)}  # ids: load order varies
    image_id, failed = next((i, page) for i, page in pages.items() if ">broken.png</h1>" in page.text)
    assert failed.status_code == 200 and "could not be decoded" in failed.text
    assert f"/api/images/{image_id}/full" not in failed.text and "similar to this" not in failed.text


def test_the_edges_of_what_is_allowed_answer_plainly(client):
    last = client.get("/api/images", params={"offset": MAX_ID}).json()
    assert last["total"] == 3 and last["images"] == []
    assert client.get("/api/images", params={"label": "l" * MAX_LABEL}).json()["total"] == 0
    page = client.get("/browse", params={"offset": MAX_ID})
    assert page.status_code == 200 and "No images from" in page.text
    missing = client.get(f"/images/{MAX_ID}")
    assert missing.status_code == 404 and 'role="alert"' in missing.text
    too_long = client.get("/", params={"id": 1, "label": "l" * (MAX_LABEL + 1)})
    assert too_long.status_code == 422 and f"at most {MAX_LABEL} characters" in too_long.text
