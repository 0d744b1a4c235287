"""The catalogue manager's flow in a real headless Chromium (issue 14's done-when), against real uvicorn.

An unlabelled folder of product photos (rendered garments renamed ``sku-NNNN``, with planted near-copies)
is loaded and run through the CLI; a duplicate group is split with the page's "Not a duplicate" button and
stays split after dedupe runs again; an upload is searched with a label filter; every page fits a 390 px
phone screen. Kept small for time: 15 images, and the near rule (hashes only), which finds the copies here.
Screenshots land in test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from lookalike.db import Database
from lookalike.samples import render_samples
from lookalike.web.app import create_app, running_server
from support.catalogue import flat_folder
from support.cli import lookalike
from test_web_browser import ARTIFACTS
from test_web_browser import browser  # noqa: F401 (a fixture: the module's Chromium)

pytestmark = pytest.mark.timeout(240)
PHONE = {"width": 390, "height": 844}
LABEL = "leopard"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str], Path, Path]]:
    """The unlabelled folder loaded and run (CLI), served on a free 127.0.0.1 port: (base URL, --db, folder,
    a small labelled manifest to load later)."""
    root = tmp_path_factory.mktemp("catalogue")
    rendered = render_samples(root / "render", per_label=3, seed=5, copy_share=0.67)
    folder = flat_folder(rendered.root, root / "catalogue", "sku-{:04d}")
    labelled = render_samples(root / "labelled", per_label=2, seed=6, copy_share=0).manifest
    db_args = ["--db", f"sqlite:///{root}/catalogue.db"]
    for argv in (["load", folder], ["run", "--rule", "near", "-q"]):
        done = lookalike(*argv, *db_args)
        assert done.code == 0, done.err
    db = Database(db_args[1])
    try:
        with running_server(create_app(db)) as base_url:
            yield base_url, db_args, folder, labelled
    finally:
        db.close()


@pytest.fixture
def desktop(browser):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


def groups_on_page(page) -> dict[int, list[int]]:
    """Each group shown: its id and its members' image ids, keeper first."""
    return {int(group.get_attribute("id").removeprefix("group-")):
            [int(f.get_attribute("data-image-id")) for f in group.locator("figure").all()]
            for group in page.locator("section.group").all()}


def card_ids(page, selector: str = "#results li.result") -> list[int]:
    return [int(card.get_attribute("data-image-id")) for card in page.locator(selector).all()]


def test_load_run_review_rerun_search_and_a_phone_screen(desktop, browser, catalogue):  # noqa: F811
    base_url, db_args, folder, labelled = catalogue
    page = desktop
    ARTIFACTS.mkdir(exist_ok=True)

    # Duplicates: every card names its file; mark one member of the first group "not a duplicate".
    page.goto(base_url + "/duplicates")
    groups = groups_on_page(page)
    assert groups, "the planted near-copies make at least one group"
    group_id, (keeper, member, *_) = next(iter(groups.items()))
    figure = page.locator(f"#group-{group_id} figure[data-image-id='{member}']")
    assert figure.locator(".name").inner_text().startswith("sku-")
    assert str(folder) in figure.locator(".source").inner_text()
    assert figure.locator("a", has_text="full size").get_attribute("href") == f"/images/{member}"
    page.screenshot(path=str(ARTIFACTS / "catalogue-duplicates.png"), full_page=True)
    with page.expect_navigation():
        figure.locator(f"button[value='not_duplicate:{member}']").click()
    assert not any(keeper in ids and member in ids for ids in groups_on_page(page).values())

    # Dedupe again from the CLI: the decision holds.
    done = lookalike("dedupe", "--rule", "near", *db_args)
    assert done.code == 0, done.err
    page.reload()
    after = groups_on_page(page)
    assert after and not any(keeper in ids and member in ids for ids in after.values())

    # The catalogue has no labels; a second supplier's feed does (a labelled manifest), so a label filter
    # has something to choose. Its images are embedded while the server runs.
    for argv in (["load", labelled], ["featurize", "-q"]):
        done = lookalike(*argv, *db_args)
        assert done.code == 0, done.err
    page.goto(base_url + "/")
    page.select_option("#opt-label", LABEL)
    page.fill("#opt-k", "5")
    with page.expect_navigation():
        page.set_input_files("#file", str(folder / "sku-0000.jpg"))  # an unlabelled photo as the query
    leopards = 2  # the labelled feed has two
    assert page.locator("#results .result .chip").all_inner_texts() == [LABEL] * leopards
    assert page.locator("#opt-label").input_value() == LABEL and page.locator("#opt-k").input_value() == "5"
    page.screenshot(path=str(ARTIFACTS / "catalogue-search-label.png"), full_page=True)

    # "similar to this" keeps the filter and k in the address, so the results page can be linked.
    first = card_ids(page)[0]
    with page.expect_navigation():
        page.locator(f"#results li[data-image-id='{first}'] .links a", has_text="similar to this").click()
    assert parse_qs(urlsplit(page.url).query) == {"id": [str(first)], "k": ["5"], "label": [LABEL]}
    assert page.locator("#results .result .chip").all_inner_texts() == [LABEL] * (leopards - 1)
    results_url = page.url

    # Browse by label, then each page on a phone: no sideways scrolling, the whole navigation on screen.
    page.goto(base_url + "/browse")
    with page.expect_navigation():
        page.locator("#labels a", has_text=LABEL).click()
    assert page.locator("#images .result .chip").all_inner_texts() == [LABEL] * leopards
    phone = browser.new_context(viewport=PHONE)
    try:
        tab = phone.new_page()
        tab.set_default_timeout(30_000)
        for name, route in [("search", "/"), ("results", results_url.removeprefix(base_url)),
                            ("duplicates", "/duplicates"), ("browse", "/browse"),
                            ("browse-label", f"/browse?label={LABEL}"), ("collection", "/collection"),
                            ("image", f"/images/{member}"), ("quality", "/quality")]:
            tab.goto(base_url + route)  # waits for the load event: styles and eager images are in
            assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
            for link in tab.locator("header nav a").all():
                box = link.bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (name, link.inner_text())
            tab.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)
    finally:
        phone.close()


def test_keys_move_through_results_and_open_similar(desktop, catalogue):
    base_url, _, _, _ = catalogue
    page = desktop
    page.goto(base_url + "/?id=1&k=4")
    ids = card_ids(page)
    assert len(ids) == 4

    def focused() -> str | None:
        return page.evaluate("document.activeElement.closest('[data-card]')?.dataset.imageId ?? null")

    page.keyboard.press("j")
    assert focused() == str(ids[0])
    page.keyboard.press("j")
    page.keyboard.press("ArrowRight")
    assert focused() == str(ids[2])
    page.keyboard.press("k")
    assert focused() == str(ids[1])
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "query-box"
    page.keyboard.type("j")  # typed into the box, not a move
    assert page.locator("#query-box").input_value() == "j"
    page.locator("#results li.result a.similar").nth(1).focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert parse_qs(urlsplit(page.url).query) == {"id": [str(ids[1])], "k": ["4"]}


def test_api_docs_load_with_no_request_leaving_the_machine(desktop, catalogue):
    base_url, _, _, _ = catalogue
    page = desktop
    refused: list[str] = []

    def local_only(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost", "::1"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.goto(base_url + "/docs")
    paths = page.locator(".opblock-summary-path")
    paths.first.wait_for()
    shown = set(paths.all_inner_texts())
    assert {"/api/similar", "/api/images", "/api/duplicates", "/api/health"} <= {p.replace("\u200b", "") for p in shown}
    assert refused == [] and problems == []
