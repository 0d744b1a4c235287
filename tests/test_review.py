"""Duplicate review that sticks: decisions stored with who and when, honoured by every later dedupe run, on
SQLite and PostgreSQL; `duplicates --json/--csv`, sorting and pages; `duplicates removable` against the keeper
rule; the HTML report before a closed pipe; the web page's buttons and the API calling the same step."""

from __future__ import annotations

import csv
import getpass
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image, ImageFilter

from lookalike.db import SCHEMA_VERSION, Database, duplicate_groups, images, settings, unique_images
from lookalike.dedupe import dedupe_images, keeper_groups, keeper_key
from lookalike.hashing import hash_images
from lookalike.ingest import load_images
from lookalike.reports import duplicate_groups_report
from lookalike.review import Review, list_decisions, removable_images, review_group
from lookalike.steps import REQUIRED, REVIEW_ACTIONS
from lookalike.web.app import create_app, running_server
from support.cli import lookalike

REVIEW_MIGRATION = 4   # the schema version that added duplicate_decisions


def textured(seed: int, size=(96, 72)) -> Image.Image:
    """A picture with structure at every scale: smoothed random blocks."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def write_pictures(folder: Path) -> None:
    """Three pictures as PNG; two smaller JPEG copies of the first, one of the second."""
    folder.mkdir(parents=True)
    for k in range(3):
        picture = textured(k)
        picture.save(folder / f"orig{k}.png")
        if k < 2:
            picture.resize((80, 60), Image.Resampling.LANCZOS).save(folder / f"orig{k}_small.jpg", quality=70)
    textured(0).resize((88, 66), Image.Resampling.LANCZOS).save(folder / "orig0_mid.jpg", quality=85)


def load_collection(db: Database, root: Path) -> dict[str, int]:
    """Load and hash the pictures with the real steps; image id by file stem."""
    write_pictures(root / "pictures" / "shirts")
    load_images(db, str(root / "pictures"), progress=False)
    hash_images(db, progress=False)
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.source)).all()
    return {Path(source).stem: image_id for image_id, source in rows}


@pytest.fixture
def collection(db, tmp_path) -> tuple[Database, dict[str, int]]:
    return db, load_collection(db, tmp_path)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A SQLite collection loaded and hashed once; each test gets a copy of its file and store."""
    root = tmp_path_factory.mktemp("review")
    with Database(f"sqlite:///{root}/t.db", root / "store") as db:
        ids = load_collection(db, root)
    return root, ids


@pytest.fixture
def sqlite_collection(loaded, tmp_path) -> tuple[Database, dict[str, int], str]:
    root, ids = loaded
    shutil.copyfile(root / "t.db", tmp_path / "t.db")
    shutil.copytree(root / "store", tmp_path / "store")
    url = f"sqlite:///{tmp_path}/t.db"
    with Database(url, tmp_path / "store") as db:
        yield db, ids, url


def groups_of(db: Database) -> dict[int, list[int]]:
    """Keeper id -> the group's image ids (keeper first, then by id) in the latest run."""
    return {g.keeper.image_id: [g.keeper.image_id] + sorted(m.image_id for m in g.duplicates)
            for g in duplicate_groups_report(db, sort="id")}


def verified_by(db: Database) -> dict[int, str | None]:
    return {m.image_id: m.verified_by for g in duplicate_groups_report(db) for m in g.members}


def cli(url: str, db: Database, *argv) -> object:
    return lookalike(*argv, "--db", url, "--store", db.store.root)


# ---- decisions survive re-runs -------------------------------------------------------------

def test_a_decision_survives_a_rerun(collection):
    db, ids = collection
    dedupe_images(db, rule="near")
    assert groups_of(db) == {ids["orig0"]: [ids["orig0"], *sorted([ids["orig0_mid"], ids["orig0_small"]])],
                             ids["orig1"]: [ids["orig1"], ids["orig1_small"]]}

    outcome = review_group(db, ids["orig0"], not_duplicate=ids["orig0_small"], by="ana", note="other print")
    assert (outcome.recorded, outcome.group, outcome.decided_by) == (2, ids["orig0"], "ana")
    review_group(db, ids["orig0"], keep=ids["orig0_mid"], by="ana")
    review_group(db, ids["orig1"], confirm=True, by="bo")
    expected = {ids["orig0_mid"]: [ids["orig0_mid"], ids["orig0"]], ids["orig1"]: [ids["orig1"], ids["orig1_small"]]}
    assert groups_of(db) == expected   # applied to the latest run at once

    for radius in (10, 12):   # the same run redone in place, then a new run
        summary = dedupe_images(db, rule="near", max_distance=radius)
        assert groups_of(db) == expected, f"radius {radius}"
        assert (summary.groups, summary.duplicates) == (2, 2)
        decided = verified_by(db)
        assert decided[ids["orig0_mid"]] == "review" and decided[ids["orig1_small"]] == "review"
        assert ids["orig0_small"] not in decided
    with db.engine.connect() as conn:
        unique = set(conn.execute(sa.select(unique_images.c.id)).scalars())
    assert unique == set(ids.values()) - {ids["orig0"], ids["orig1_small"]}
    assert {r.image_id: r.keeper_id for r in removable_images(db)} == {ids["orig0"]: ids["orig0_mid"],
                                                                       ids["orig1_small"]: ids["orig1"]}
    found = [(d.decision, d.image_id, d.other_id, d.decided_by, d.note) for d in list_decisions(db)]
    assert sorted(found[:2]) == sorted([("not_duplicate", ids["orig0_small"], ids["orig0"], "ana", "other print"),
                                        ("not_duplicate", ids["orig0_small"], ids["orig0_mid"], "ana", "other print")])
    assert found[2:] == [("keep_this", ids["orig0_mid"], None, "ana", None),
                         ("confirmed", ids["orig1_small"], ids["orig1"], "bo", None)]
    assert all(d.decided_at and d.run_id for d in list_decisions(db))


def test_not_duplicate_splits_a_group_and_a_later_decision_wins(sqlite_collection):
    db, ids, _ = sqlite_collection
    dedupe_images(db, rule="near")
    # The keeper is not a copy of the others: no group is left; the others may group again in a new run.
    assert review_group(db, ids["orig1"], not_duplicate=ids["orig1"]).group is None
    assert ids["orig1"] not in groups_of(db)
    dedupe_images(db, rule="near")
    assert ids["orig1"] not in groups_of(db) and ids["orig1_small"] not in verified_by(db)
    # A member that is not a copy leaves its group; the group stays split after dedupe again.
    review_group(db, ids["orig0"], not_duplicate=ids["orig0_mid"])
    dedupe_images(db, rule="near")
    assert groups_of(db) == {ids["orig0"]: [ids["orig0"], ids["orig0_small"]]}
    # Confirming the pair later puts it back together (the latest decision on a pair is in force), and
    # the copy it is still not a duplicate of may not join that group.
    with db.begin() as conn:   # a confirmation recorded on the old group (as a person would have, earlier)
        conn.execute(sa.text("INSERT INTO duplicate_decisions (decision, image_id, other_id, decided_by, decided_at) "
                             "VALUES ('confirmed', :a, :b, 'cy', CURRENT_TIMESTAMP)"),
                     {"a": ids["orig0_mid"], "b": ids["orig0"]})
    dedupe_images(db, rule="near")
    assert groups_of(db) == {ids["orig0"]: [ids["orig0"], ids["orig0_mid"]]}


def test_keep_this_changes_the_keeper_and_what_is_removable(sqlite_collection):
    db, ids, url = sqlite_collection
    dedupe_images(db, rule="near")
    assert review_group(db, ids["orig1"], keep=ids["orig1_small"], by="ana").group == ids["orig1_small"]
    removable = {r.image_id: r.keeper_id for r in removable_images(db)}
    assert removable[ids["orig1"]] == ids["orig1_small"] and ids["orig1_small"] not in removable
    dedupe_images(db, rule="near", max_distance=11)
    assert groups_of(db)[ids["orig1_small"]] == [ids["orig1_small"], ids["orig1"]]
    assert verified_by(db)[ids["orig1_small"]] == "review"
    # The CLI prints who (the OS user by default) and the keeper moves back when asked.
    result = cli(url, db, "duplicates", "review", ids["orig1_small"], "--keep", ids["orig1"])
    assert result.code == 0 and f"keep image {ids['orig1']}" in result.out
    assert list_decisions(db)[-1].decided_by == getpass.getuser()
    dedupe_images(db, rule="near")
    assert groups_of(db)[ids["orig1"]] == [ids["orig1"], ids["orig1_small"]]


def test_the_exact_rule_applies_decisions_after_its_sql_grouping(sqlite_collection):
    db, ids, _ = sqlite_collection
    dedupe_images(db, rule="exact")
    assert groups_of(db) == {ids["orig0"]: [ids["orig0"], ids["orig0_small"]],
                             ids["orig1"]: [ids["orig1"], ids["orig1_small"]]}
    review_group(db, ids["orig0"], keep=ids["orig0_small"])
    review_group(db, ids["orig1"], not_duplicate=ids["orig1_small"])
    dedupe_images(db, rule="exact")
    assert groups_of(db) == {ids["orig0_small"]: [ids["orig0_small"], ids["orig0"]]}
    assert verified_by(db) == {ids["orig0_small"]: "review", ids["orig0"]: None}


def test_keeper_groups_honour_decisions_without_chaining_otherwise():
    Row = namedtuple("Row", "id width height byte_size format")
    rows = [Row(k + 1, 100 - k, 100, 1000, "PNG") for k in range(4)]   # keeper order: row 0, 1, 2, 3
    first, second = np.array([0, 0, 1, 2]), np.array([1, 2, 3, 3])    # 0~1, 0~2, 1~3, 2~3
    assert keeper_groups(rows, first, second).tolist() == [0, 0, 0, -1]
    # 1 and 2 are not duplicates: 2 cannot join the group that holds 1.
    apart = Review(apart=frozenset({(2, 3)}))
    assert keeper_groups(rows, first, second, review=apart).tolist() == [0, 0, 2, 2]
    # 4 confirmed with 2: it joins 2's group although it does not match the keeper.
    together = Review(together=frozenset({(2, 4)}))
    assert keeper_groups(rows, first, second, review=together).tolist() == [0, 0, 0, 0]
    # Two images to keep in one group: the later decision wins.
    keep = Review(keep={2: 7, 3: 9})
    assert keeper_groups(rows, first, second, review=keep).tolist() == [2, 2, 2, -1]


# ---- the CLI -------------------------------------------------------------------------------

def test_review_actions_take_the_registry_defaults():
    for step in REVIEW_ACTIONS.values():
        module, name = step.function.rsplit(".", 1)
        signature = inspect.signature(getattr(importlib.import_module(f"lookalike.{module}"), name)).parameters
        for param in step.params:
            expected = inspect.Parameter.empty if param.default is REQUIRED else param.default
            assert signature[param.name].default == expected, (step.name, param.name)
        assert lookalike("duplicates", step.name, "--help").code == 0


def test_removable_json_matches_the_keeper_rule(sqlite_collection):
    db, ids, url = sqlite_collection
    dedupe_images(db, rule="near")
    result = cli(url, db, "duplicates", "removable", "--json")
    assert result.code == 0, result.err
    found = json.loads(result.out)
    with db.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(images))}
        unique = set(conn.execute(sa.select(unique_images.c.id)).scalars())
    assert {r["image_id"] for r in found} == set(rows) - unique == {ids["orig0_mid"], ids["orig0_small"],
                                                                     ids["orig1_small"]}
    key = {i: keeper_key(r.width, r.height, r.byte_size, r.format, i) for i, r in rows.items()}
    for r in found:
        assert key[r["keeper_id"]] < key[r["image_id"]]   # its keeper comes first in the keeper order
        assert r["group_id"] == r["keeper_id"] and r["keeper_id"] in unique
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == r["sha256"]
        assert Path(r["source"]).is_file() and r["sources"] == [r["source"]]
    # Plain output: store path, tab, source; a script reads it line by line. Nothing was deleted.
    lines = cli(url, db, "duplicates", "removable").out.splitlines()
    assert sorted(lines) == sorted(f"{r['path']}\t{r['source']}" for r in found)
    assert all(Path(r["path"]).is_file() and Path(r["source"]).is_file() for r in found)


def test_duplicates_json_and_csv_sorted_and_paged(sqlite_collection):
    db, ids, url = sqlite_collection
    dedupe_images(db, rule="near")
    first = json.loads(cli(url, db, "duplicates", "--json", "--limit", "1").out)
    assert (first["groups_total"], first["sort"], len(first["groups"])) == (2, "size", 1)
    group = first["groups"][0]
    assert (group["group_id"], group["size"], group["keeper"]) == (ids["orig0"], 3, ids["orig0"])
    member = group["members"][1]
    assert {"image_id", "is_keeper", "distance", "score", "verified_by", "path", "source", "sources"} <= set(member)
    assert Path(member["path"]).is_file() and member["source"].endswith(".jpg")
    second = json.loads(cli(url, db, "duplicates", "--json", "--limit", "1", "--offset", "1").out)
    assert [g["group_id"] for g in second["groups"]] == [ids["orig1"]]
    by_id = json.loads(cli(url, db, "duplicates", "--json", "--sort", "id").out)
    assert [g["group_id"] for g in by_id["groups"]] == sorted([ids["orig0"], ids["orig1"]])

    rows = list(csv.DictReader(io.StringIO(cli(url, db, "duplicates", "--csv").out)))
    assert len(rows) == 5 and [r["is_keeper"] for r in rows[:3]] == ["True", "False", "False"]
    assert {r["group_id"] for r in rows} == {str(ids["orig0"]), str(ids["orig1"])}
    assert all(Path(r["path"]).is_file() for r in rows)

    # Doubt: the widest distance first under a hash rule; a group confirmed in full goes last.
    doubt = [g.group_id for g in duplicate_groups_report(db, sort="doubt")]
    review_group(db, doubt[0], confirm=True)
    assert [g.group_id for g in duplicate_groups_report(db, sort="doubt")] == doubt[1:] + doubt[:1]
    text = cli(url, db, "duplicates", "--sort", "doubt").out
    assert text.index(f"group {doubt[1]} ") < text.index(f"group {doubt[0]} ") and "review" in text


BAD_REVIEWS = [
    (["review", "999999", "--confirm"], "no group 999999 in the latest dedupe run"),
    (["review", "{orig0}", "--keep", "{orig1}"], "image {orig1} is not in group {orig0}"),
    (["review", "{orig0}"], "give exactly one decision"),
    (["review", "{orig0}", "--confirm", "--keep", "{orig0}"], "give exactly one decision"),
    (["review", "{orig0}", "--confirm", "--by", "x" * 65], "by must be at most 64 characters"),
    (["review", "{orig0}", "--confirm", "--by", "ana\x1b[2J"], "by must be one line of text"),
    (["review", "{orig0}", "--confirm", "--note", "a\nb"], "note must be one line of text"),
]


def test_review_refuses_bad_input_with_one_line(sqlite_collection):
    db, ids, url = sqlite_collection
    dedupe_images(db, rule="near")
    for argv, message in BAD_REVIEWS:
        result = cli(url, db, "duplicates", *[a.format(**ids) for a in argv])
        assert result.code == 2 and result.err.startswith("error: ") and result.err.count("\n") == 1, result
        assert message.format(**ids) in result.err
    assert list_decisions(db) == []


def test_review_before_any_dedupe_says_what_to_run(sqlite_collection):
    db, ids, url = sqlite_collection
    result = cli(url, db, "duplicates", "review", ids["orig0"], "--confirm")
    assert result.code == 2 and "run `lookalike dedupe` first" in result.err
    assert cli(url, db, "duplicates", "removable", "--json").out.strip() == "[]"


@pytest.mark.timeout(120)
def test_html_report_is_written_before_a_closed_pipe(sqlite_collection, tmp_path):
    db, ids, url = sqlite_collection
    dedupe_images(db, rule="near")
    report = tmp_path / "out" / "groups.html"
    read, write = os.pipe()
    os.close(read)   # the reader has left, as `| head` does after its lines
    try:
        done = subprocess.run([sys.executable, "-m", "lookalike.cli", "duplicates", "--db", url, "--store",
                               str(db.store.root), "--html", str(report)], stdout=write, stderr=subprocess.PIPE,
                              timeout=100, text=True)
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    page = report.read_text(encoding="utf-8")
    assert page.count('<section class="group"') == 2 and "data:image" not in page
    thumbnails = re.findall(r'<img src="(groups_thumbnails/[0-9a-f]{64}\.jpg)"', page)
    assert len(thumbnails) == 5 and all(Image.open(report.parent / t).format == "JPEG" for t in thumbnails)
    assert len(page) < 20_000


# ---- the web page and the API --------------------------------------------------------------

@pytest.fixture
def client(sqlite_collection):
    db, ids, _ = sqlite_collection
    dedupe_images(db, rule="near")
    with running_server(create_app(db, warm=False)) as base_url, \
            httpx.Client(base_url=base_url, timeout=30, follow_redirects=False) as http:
        yield http, db, ids


def test_web_buttons_record_decisions_through_the_review_step(client):
    http, db, ids = client
    page = http.get("/duplicates", params={"sort": "doubt"})
    assert page.status_code == 200
    assert page.text.count('name="action" value="confirmed"') == 2
    assert f'value="not_duplicate:{ids["orig0_small"]}"' in page.text and 'option value="doubt" selected' in page.text

    posted = http.post("/duplicates/review", data={"group_id": ids["orig0"], "sort": "doubt", "page": "1",
                                                   "action": f"not_duplicate:{ids['orig0_small']}", "by": "ana"})
    assert posted.status_code == 303 and posted.headers["location"] == f"/duplicates?sort=doubt&page=1#group-{ids['orig0']}"
    assert groups_of(db)[ids["orig0"]] == [ids["orig0"], ids["orig0_mid"]]
    posted = http.post("/duplicates/review", data={"group_id": ids["orig1"], "action": "confirmed"})
    assert posted.status_code == 303 and list_decisions(db)[-1].decided_by == "web"
    shown = http.get("/duplicates").text
    assert "by review" in shown

    wrong = http.post("/duplicates/review", data={"group_id": "999", "action": "confirmed"})
    assert wrong.status_code == 404 and "no group 999 in the latest dedupe run" in wrong.text
    wrong = http.post("/duplicates/review", data={"group_id": ids["orig0"], "action": "explode:1"})
    assert wrong.status_code == 422 and 'role="alert"' in wrong.text
    crossed = http.post("/duplicates/review", data={"group_id": ids["orig0"], "action": "confirmed"},
                        headers={"Origin": "http://evil.example"})
    assert crossed.status_code == 403
    crossed = http.post("/duplicates/review", data={"group_id": ids["orig0"], "action": "confirmed"},
                        headers={"Origin": "null", "Sec-Fetch-Site": "cross-site"})
    assert crossed.status_code == 403 and len(list_decisions(db)) == 3
    # Our own page's form post: Origin is "null" under the pages' no-referrer policy.
    own = http.post("/duplicates/review", data={"group_id": ids["orig0"], "action": "confirmed"},
                    headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 303 and len(list_decisions(db)) == 4


def test_the_api_reviews_lists_and_refuses_in_one_error_shape(client):
    http, db, ids = client
    body = http.get("/api/duplicates", params={"sort": "size"}).json()
    assert body["sort"] == "size" and [g["size"] for g in body["groups"]] == [3, 2]
    assert {"score", "verified_by"} <= set(body["groups"][0]["members"][1])
    answer = http.post(f"/api/duplicates/{ids['orig1']}/review",
                       json={"decision": "keep_this", "image_id": ids["orig1_small"], "by": "bo"})
    assert answer.status_code == 200, answer.text
    assert answer.json() | {"run_id": 0} == {"run_id": 0, "group_id": ids["orig1"], "decision": "keep_this",
                                             "image_id": ids["orig1_small"], "decided_by": "bo", "recorded": 1,
                                             "group": ids["orig1_small"]}
    removable = http.get("/api/duplicates/removable").json()
    assert {r["image_id"] for r in removable} == {ids["orig0_mid"], ids["orig0_small"], ids["orig1"]}
    assert all(r["path"] is None for r in removable)   # the server's paths are not shown
    assert [d["decided_by"] for d in http.get("/api/duplicates/decisions").json()] == ["bo"]
    for request, status, error in [
        ({"decision": "keep_this"}, 422, "image_id is required for keep_this"),
        ({"decision": "maybe", "image_id": 1}, 422, "decision"),
        ({"decision": "confirmed", "by": "  "}, 422, "by must not be empty"),
    ]:
        answer = http.post(f"/api/duplicates/{ids['orig0']}/review", json=request)
        assert answer.status_code == status and error in answer.json()["error"], answer.text
    answer = http.post("/api/duplicates/999/review", json={"decision": "confirmed"})
    assert answer.status_code == 404 and set(answer.json()) == {"error"}
    assert len(list_decisions(db)) == 1


# ---- the schema ------------------------------------------------------------------------------

def test_an_older_database_gets_the_decisions_table(db):
    with db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE duplicate_decisions")
        conn.execute(sa.update(settings).where(settings.c.key == "schema_version")
                     .values(value=str(REVIEW_MIGRATION - 1)))
    url, store = db.url.render_as_string(hide_password=False), db.store.root
    db.close()
    with Database(url, store) as again:
        with again.engine.connect() as conn:
            assert sa.inspect(conn).has_table("duplicate_decisions")
        assert again.setting("schema_version") == str(SCHEMA_VERSION)
        assert list_decisions(again) == []


# ---- the default (verified) rule ---------------------------------------------------------------

@pytest.mark.timeout(300)
def test_the_verified_rule_honours_decisions(sqlite_collection):
    from lookalike.features import featurize_images
    db, ids, _ = sqlite_collection
    featurize_images(db, progress=False)
    dedupe_images(db)
    before = groups_of(db)
    assert before[ids["orig0"]][0] == ids["orig0"] and ids["orig0_small"] in before[ids["orig0"]]
    assert all(m in ("embedding", "geometry", None) for m in verified_by(db).values())
    review_group(db, ids["orig0"], not_duplicate=ids["orig0_small"])
    review_group(db, ids["orig1"], keep=ids["orig1_small"])
    dedupe_images(db)
    after = groups_of(db)
    assert ids["orig0_small"] not in after.get(ids["orig0"], [])
    assert after[ids["orig1_small"]][0] == ids["orig1_small"] and verified_by(db)[ids["orig1_small"]] == "review"
    assert verified_by(db)[ids["orig1"]] in ("embedding", "geometry")   # the rule's check of that pair
    with db.engine.connect() as conn:
        reviewed = conn.execute(sa.select(sa.func.count()).where(duplicate_groups.c.verified_by == "review")).scalar()
    assert reviewed == 1
