"""The pages in a real headless Chromium (Debian's, driven by Playwright) against real uvicorn.

Skipped when Chromium or Playwright is missing, except under CI (env ``CI`` set), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from lookalike.db import Database, images
from lookalike.reports import duplicate_groups_report
from lookalike.samples import SampleSet
from lookalike.web.app import create_app, running_server
from test_web_api import build_collection, original, stored

CHROMIUM = "/usr/bin/chromium"
# The machine has no internet: without these Chromium waits on connections it makes at start-up.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
UPLOAD_LIMIT = 2**20  # small, so the oversized-file check needs no large buffer


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (required under CI)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        _missing("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                              else shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Database, SampleSet]]:
    db, samples = build_collection(tmp_path_factory.mktemp("web-browser"))
    try:
        with running_server(create_app(db, max_upload_bytes=UPLOAD_LIMIT)) as base_url:
            yield base_url, db, samples
    finally:
        db.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    problems: list[str] = []  # a blocked script, style or image (e.g. by the content security policy) lands here
    tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.problems = problems
    yield tab
    context.close()


def result_ids(page) -> list[int]:
    return [int(card.get_attribute("data-image-id")) for card in page.locator("#results li.result").all()]


def test_upload_then_click_a_result(page, site):
    base_url, db, samples = site
    path = original(samples, "leopard", 2)
    query_id = stored(db, path)
    page.goto(base_url + "/")
    with page.expect_navigation():
        page.set_input_files("#file", str(path))  # choosing a file submits it
    page.wait_for_load_state("networkidle")
    assert len(result_ids(page)) == 10
    assert query_id not in result_ids(page)
    query = page.locator("#query")
    assert query.get_attribute("data-kind") == "upload"
    assert path.name in query.inner_text() and f"#{query_id}" in query.inner_text()
    assert page.locator("#query img").evaluate("img => img.naturalWidth") > 0
    for image in page.locator("#results img").all():  # every thumbnail really loaded
        assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)

    chosen = result_ids(page)[0]
    with page.expect_navigation():
        page.locator(f'#results li[data-image-id="{chosen}"] a.similar').click()
    page.wait_for_load_state("networkidle")
    assert re.search(rf"/\?id={chosen}$", page.url)
    assert page.locator("#query").get_attribute("data-image-id") == str(chosen)
    assert f"#{chosen}" in page.locator("#query").inner_text()
    assert len(result_ids(page)) == 10 and chosen not in result_ids(page)
    assert page.title().startswith(f"Similar to image {chosen}")
    assert page.problems == []


def test_picking_a_stored_image_searches_from_it(page, site):
    base_url, _, _ = site
    page.goto(base_url + "/")
    picks = page.locator("#picks a")
    assert picks.count() > 10
    picked = int(picks.first.get_attribute("href").removeprefix("/?id="))
    with page.expect_navigation():
        picks.first.click()
    assert page.url == f"{base_url}/?id={picked}"
    assert len(result_ids(page)) == 10 and picked not in result_ids(page)
    page.goto(base_url + "/")
    page.fill("#id-form input[name=id]", str(picked))
    with page.expect_navigation():
        page.click("#id-form button")
    assert page.url == f"{base_url}/?id={picked}&k=10"
    assert page.locator("#query").get_attribute("data-image-id") == str(picked)
    assert page.problems == []


def test_bad_files_are_explained(page, site, tmp_path):
    base_url, _, _ = site
    page.goto(base_url + "/")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (UPLOAD_LIMIT + 1))
    page.set_input_files("#file", str(big))  # refused in the page, before any upload
    assert "the limit is 1 MB" in page.locator("#error").inner_text()
    assert page.url == base_url + "/"
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with page.expect_navigation() as navigation:
        page.set_input_files("#file", str(text))
    assert navigation.value.status == 415
    assert "not an image: text" in page.locator("#error").inner_text()


def test_duplicates_and_collection_pages(page, site):
    base_url, db, _ = site
    groups = duplicate_groups_report(db)
    page.goto(base_url + "/duplicates")
    page.wait_for_load_state("networkidle")
    assert page.locator("figure.keeper").count() == len(groups) > 0
    assert page.locator("figure.keeper .badge").all_inner_texts() == ["keeper"] * len(groups)
    for image in page.locator("figure img").all():
        assert image.evaluate("img => img.complete && img.naturalWidth > 0")
    page.goto(base_url + "/collection")
    page.wait_for_load_state("networkidle")
    assert page.locator("img.plot").evaluate("img => img.naturalWidth") > 300
    with db.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
    assert page.locator("#labels tfoot").inner_text().split()[:2] == ["total", str(count)]
    assert page.locator("#evaluation table tbody tr").count() >= 2
    assert page.problems == []
