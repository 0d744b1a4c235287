"""`lookalike inspect` (lookalike.quality): planted blurry, dark, bright, low-information, odd-aspect and tiny
images are flagged, real photographs are not, a file that cannot be read gets a row saying why, a re-run
does nothing twice, and the CLI, the API and the page list the same images. On SQLite and PostgreSQL.

The real photographs are the ones scikit-learn and matplotlib ship (installed with requirements.txt),
and the rendered garments in tests/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import pytest
import sklearn
import sqlalchemy as sa
from PIL import Image, ImageEnhance, ImageFilter

from lookalike.db import Database, images, runs
from lookalike.db.schema import image_quality
from lookalike.ingest import load_images
from lookalike.quality import FLAGS, METHOD, THRESHOLDS, inspect_images, quality_report
from lookalike.web.app import create_app, running_server
from support.cli import lookalike

DATA = Path(__file__).parent / "data"
REAL_PHOTOS = [Path(sklearn.__file__).parent / "datasets/images/china.jpg",
               Path(sklearn.__file__).parent / "datasets/images/flower.jpg",
               Path(matplotlib.__file__).parent / "mpl-data/sample_data/grace_hopper.jpg"]
GARMENTS = sorted((DATA / "garments_cut_alike").glob("*.jpg"))[:3]


def _low_information(img: Image.Image) -> Image.Image:
    mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(axis=0))
    return Image.blend(Image.new("RGB", img.size, mean), img, 0.02)   # near-solid: 2 % of the picture left


def _tiny(img: Image.Image) -> Image.Image:
    img = img.copy()
    img.thumbnail((64, 64))
    return img


# Each plant: what it does to a photograph and the flags it must raise (nothing else).
PLANTS = {
    "blurry": (lambda img: img.filter(ImageFilter.GaussianBlur(max(img.size) / 100)), {"blurry"}),
    "dark": (lambda img: ImageEnhance.Brightness(img).enhance(0.25), {"dark"}),
    "bright": (lambda img: Image.blend(img, Image.new("RGB", img.size, "white"), 0.8), {"bright"}),
    "flat": (_low_information, {"low-information"}),
    "tiny": (_tiny, {"tiny"}),
    "strip": (lambda img: img.crop((0, 100, img.width, 100 + img.width // 4)), {"odd-aspect"}),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """A flat folder: the real photographs and garments as they are, and each plant of china.jpg and of a
    garment; with the flags each file must get."""
    folder = tmp_path_factory.mktemp("quality")
    expected: dict[str, set[str]] = {}
    for path in REAL_PHOTOS + GARMENTS:
        Image.open(path).convert("RGB").save(folder / path.name, quality=92)
        expected[path.name] = set()
    for base in (REAL_PHOTOS[0], GARMENTS[0]):
        image = Image.open(base).convert("RGB")
        for name, (plant, flags) in PLANTS.items():
            plant(image).save(folder / f"{base.stem}_{name}.jpg", quality=90)
            expected[f"{base.stem}_{name}.jpg"] = flags
    return folder, expected


def _flags_by_name(db: Database) -> dict[str, set[str]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.source, image_quality.c.flags)
                            .join(image_quality, image_quality.c.image_id == images.c.id)).all()
    return {Path(source).name: set(flags.split(",")) - {""} for source, flags in rows if flags is not None}


@pytest.mark.timeout(120)
def test_inspect_flags_planted_images_only_and_records_a_broken_one(db, planted):
    folder, expected = planted[0], dict(planted[1])
    load_images(db, str(folder))
    with db.engine.connect() as conn:   # damage one stored file after the load: inspect must say why and go on
        broken_id, sha = conn.execute(sa.select(images.c.id, images.c.sha256)
                                      .where(images.c.source.like("%grace_hopper.jpg"))).one()
    db.store.path(sha).write_bytes(db.store.path(sha).read_bytes()[:600])

    summary = inspect_images(db)

    assert summary.inspected == len(expected) and summary.already == 0
    assert sum(summary.failed.values()) == 1 and "truncated" in next(iter(summary.failed))
    found = _flags_by_name(db)
    del expected["grace_hopper.jpg"]   # the broken one
    assert found == expected
    with db.engine.connect() as conn:
        broken = conn.execute(sa.select(image_quality).where(image_quality.c.image_id == broken_id)).one()
    assert broken.status == "failed" and "truncated" in broken.reason and broken.flags is None
    assert summary.flagged == {f: sum(f in flags for flags in expected.values()) for f in FLAGS}
    # Worst first: the blurriest of the two blurred images leads, and only flagged images are listed.
    listed = quality_report(db, flag="blurry").rows
    assert [r.scores["sharpness"] for r in listed] == sorted(r.scores["sharpness"] for r in listed)
    assert all(r.scores["sharpness"] < THRESHOLDS.blurry for r in listed)
    assert {Path(r.source).name for r in quality_report(db).rows} == {n for n, f in expected.items() if f}

    # A re-run reads nothing again; --all reads every image again and replaces, never doubles, its row.
    before = _rows(db)
    again = inspect_images(db)
    assert again.inspected == 0 and again.already == len(expected) + 1   # the broken one keeps its row
    assert _rows(db) == before
    redo = inspect_images(db, all_images=True)
    assert redo.inspected == len(expected) + 1
    assert [r[:-1] for r in _rows(db)] == [r[:-1] for r in before]   # the same scores, a new time
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(runs).where(runs.c.step == "inspect")).scalar() == 3


def _rows(db: Database) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(
            image_quality.c.image_id, image_quality.c.status, image_quality.c.flags, image_quality.c.sharpness,
            image_quality.c.entropy, image_quality.c.method, image_quality.c.inspected_at)
            .order_by(image_quality.c.image_id)).all()]


@pytest.mark.timeout(120)
def test_an_image_inspected_by_another_method_is_inspected_again(tmp_path, planted):
    folder, expected = planted
    with Database(f"sqlite:///{tmp_path}/q.db", tmp_path / "store") as db:
        load_images(db, str(folder))
        inspect_images(db)
        with db.begin() as conn:
            conn.execute(sa.update(image_quality).where(image_quality.c.image_id == 1).values(method="quality-0"))
        assert inspect_images(db).inspected == 1
        with db.engine.connect() as conn:
            assert conn.execute(sa.select(image_quality.c.method).where(image_quality.c.image_id == 1)).scalar() \
                == METHOD


@pytest.mark.timeout(120)
def test_cli_api_and_page_list_the_same_images(tmp_path, planted):
    folder, expected = planted
    url = f"sqlite:///{tmp_path}/q.db"
    with Database(url, tmp_path / "store") as db:
        load_images(db, str(folder))
    first = lookalike("inspect", "--db", url, "--json")
    assert first.code == 0, first.err
    assert "inspect: 18 inspected" in first.err
    cli_any = {r["image_id"] for r in json.loads(first.out)}
    cli = {flag: [r["image_id"] for r in json.loads(lookalike("inspect", "--db", url, "--json", "--flag", flag).out)]
           for flag in FLAGS}
    csv_lines = lookalike("inspect", "--db", url, "--csv", "--flag", "dark").out.splitlines()
    assert csv_lines[0].startswith("image_id,label,source,width,height,flags,sharpness")
    assert [int(line.split(",")[0]) for line in csv_lines[1:]] == cli["dark"]
    text = lookalike("inspect", "--db", url, "--flag", "tiny")
    assert text.code == 0 and "china_tiny.jpg" in text.out and "flagged: blurry 2, dark 2" in text.out
    assert lookalike("inspect", "--db", url, "--flag", "sharp").code == 2   # argparse: not a flag

    with Database(url) as db, running_server(create_app(db, warm=False)) as base, \
            httpx.Client(base_url=base, timeout=60) as http:
        api_any = http.get("/api/quality", params={"limit": 1000}).json()
        assert {r["image_id"] for r in api_any["images"]} == cli_any and api_any["total"] == len(cli_any)
        for flag in FLAGS:
            body = http.get("/api/quality", params={"flag": flag}).json()
            assert [r["image_id"] for r in body["images"]] == cli[flag], flag
            assert all(flag in r["flags"] for r in body["images"])
        page = http.get("/api/quality", params={"limit": 2, "offset": 2}).json()
        assert [r["image_id"] for r in page["images"]] == sorted(cli_any)[2:4] and page["total"] == len(cli_any)
        bad = http.get("/api/quality", params={"flag": "sharp"})
        assert bad.status_code == 422 and set(bad.json()) == {"error"}
        assert http.get("/api/quality", params={"limit": 0}).status_code == 422

        html = http.get("/quality", params={"flag": "blurry"})
        assert html.status_code == 200 and "worst first" in html.text
        assert [f'data-image-id="{i}"' in html.text for i in cli["blurry"]] == [True] * len(cli["blurry"])
        assert 'href="/quality"' in http.get("/quality").text   # the nav link; "any flag" lists them all
        assert http.get("/quality", params={"flag": ""}).status_code == 200
        assert http.get("/quality", params={"flag": "<script>"}).status_code == 422
