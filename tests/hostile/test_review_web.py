"""Hostile review requests: the page's form and the JSON API refuse malformed, out-of-range, oversized and
cross-site decisions with one-line errors in the app's one error shape, and record nothing."""

from __future__ import annotations

import httpx
import pytest

from lookalike.db import Database
from lookalike.dedupe import dedupe_images
from lookalike.review import list_decisions
from lookalike.web.app import create_app, running_server
from test_review import load_collection

HUGE = str(2**63)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_hostile")
    with Database(f"sqlite:///{root}/t.db", root / "store") as db:
        ids = load_collection(db, root)
        dedupe_images(db, rule="near")
        with running_server(create_app(db, warm=False)) as base_url, \
                httpx.Client(base_url=base_url, timeout=30, follow_redirects=False) as http:
            yield http, db, ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fields", [
    {"group_id": "", "action": "confirmed"},
    {"group_id": "abc", "action": "confirmed"},
    {"group_id": "-1", "action": "confirmed"},
    {"group_id": HUGE, "action": "confirmed"},
    {"group_id": "9" * 400, "action": "confirmed"},
    {"group_id": "{orig0}", "action": ""},
    {"group_id": "{orig0}", "action": "keep_this:"},
    {"group_id": "{orig0}", "action": "keep_this:abc"},
    {"group_id": "{orig0}", "action": f"keep_this:{HUGE}"},
    {"group_id": "{orig0}", "action": "not_duplicate:-1"},
    {"group_id": "{orig0}", "action": "x" * 10_000},
    {"group_id": "{orig0}", "action": "confirmed", "note": "n" * 5000},
    {"group_id": "{orig0}", "action": "confirmed", "by": "ana\r\nSet-Cookie: x=1"},
    {"group_id": "{orig0}", "action": "keep_this:abc", "page": "-3", "sort": "<script>"},
])
def test_the_form_refuses_bad_fields(site, fields):
    http, db, ids = site
    data = {key: value.format(**ids) for key, value in fields.items()}
    response = http.post("/duplicates/review", data=data)
    assert response.status_code in (404, 422), response.text
    assert 'role="alert"' in response.text and "Traceback" not in response.text and "<script>" not in response.text
    assert "Set-Cookie" not in response.headers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body", [
    {"decision": "confirmed", "extra": 1},
    {"decision": "keep_this", "image_id": True},
    {"decision": "keep_this", "image_id": 1.5},
    {"decision": "keep_this", "image_id": 2**64},
    {"decision": "not_duplicate", "image_id": 0},
    {"decision": ["confirmed"]},
    [],
    "confirmed",
])
def test_the_api_refuses_bad_bodies(site, body):
    http, db, ids = site
    response = http.post(f"/api/duplicates/{ids['orig1']}/review", json=body)
    assert response.status_code == 422 and set(response.json()) == {"error"}, response.text


@pytest.mark.timeout(60)
def test_ids_out_of_range_and_cross_site_posts_are_refused(site):
    http, db, ids = site
    for group in (HUGE, "0", "-1", "1.5"):
        response = http.post(f"/api/duplicates/{group}/review", json={"decision": "confirmed"})
        assert response.status_code == 422 and set(response.json()) == {"error"}
    response = http.post(f"/api/duplicates/{ids['orig1']}/review", json={"decision": "confirmed"},
                         headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403 and response.json() == {
        "error": "cross-site requests may not change review decisions"}
    assert http.post("/duplicates/review", content=b"\xff" * 1000,
                     headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 422
    assert list_decisions(db) == []
