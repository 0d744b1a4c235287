"""The hash step and the dedupe commands end to end: real sample images, SQLite and PostgreSQL, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import dhash
import imagehash
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.db import Database, duplicate_groups, hashed_images, image_hashes, images
from lookalike.hashing import HASHER_VERSION, hash_images
from lookalike.ingest import load_images
from lookalike.samples import render_samples
from support.cli import Result, lookalike


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return render_samples(tmp_path_factory.mktemp("samples"), per_label=30, seed=3, copy_share=0.2)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hash.db"
    return request.getfixturevalue("pg_url")


def cli(db_url: str, *args: str, tmp_path: Path) -> Result:
    # In this process: each command would otherwise pay the model's imports again (seconds each).
    return lookalike("--db", db_url, "--store", tmp_path / "store", "-q", *args)


def test_hash_step_stores_the_reference_hashes_once(sample_set, db_url, tmp_path):
    with Database(db_url, tmp_path / "store") as db:
        load_images(db, sample_set.manifest, progress=False)
        first = hash_images(db, progress=False)
        assert first.hashed == sample_set.images and not first.failed
        again = hash_images(db, progress=False)
        assert (again.hashed, again.already) == (0, sample_set.images)   # incremental

        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(images.c.source, image_hashes.c.kind, image_hashes.c.size,
                                          image_hashes.c.hex, image_hashes.c.value, image_hashes.c.hasher)
                                .join(images, images.c.id == image_hashes.c.image_id)).all()
            view = dict(conn.execute(sa.text("SELECT image_id, dhash_hex_3 FROM image_dhash")).all())
            hex3 = dict(conn.execute(sa.select(image_hashes.c.image_id, image_hashes.c.hex)
                                     .where(image_hashes.c.kind == "dhash_rowcol", image_hashes.c.size == 3)).all())
        assert len(rows) == sample_set.images * (8 + 4)     # dHash 1..8, a/d/p/wHash at size 8
        assert {r.hasher for r in rows} == {HASHER_VERSION}
        assert view == hex3

        # The reference packages, on the files as they decode them, for a spread of images.
        stored = {(r.source, r.kind, r.size): r for r in rows}
        sources = sorted({r.source for r in rows})[::7]
        for source in sources:
            with Image.open(source) as img:
                img.load()
                for size in (1, 3, 8):
                    expected = dhash.format_hex(*dhash.dhash_row_col(img, size=size), size=size)
                    assert stored[source, "dhash_rowcol", size].hex == expected
                for kind, reference in (("ahash", imagehash.average_hash), ("dhash", imagehash.dhash),
                                        ("phash", imagehash.phash), ("whash", imagehash.whash)):
                    row = stored[source, kind, 8]
                    assert row.hex == str(reference(img))
                    unsigned = int(row.hex, 16)
                    assert row.value == (unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned)


def test_an_image_missing_from_the_store_fails_alone_and_is_hashed_once_back(sample_set, tmp_path):
    with Database(f"sqlite:///{tmp_path}/m.db", tmp_path / "store") as db:
        load_images(db, sample_set.manifest, progress=False)
        with db.engine.connect() as conn:
            sha = conn.execute(sa.select(images.c.sha256).order_by(images.c.id).limit(1)).scalar_one()
        path = db.store.path(sha)
        kept = path.read_bytes()
        path.unlink()
        summary = hash_images(db, progress=False)
        assert summary.failed == {"missing from the image store": 1}
        assert summary.hashed == sample_set.images - 1
        path.write_bytes(kept)
        assert hash_images(db, progress=False).hashed == 1
        with db.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(hashed_images)).scalar() == sample_set.images


def ground_truth_pairs(sample_set) -> set[frozenset[str]]:
    with open(sample_set.ground_truth, newline="") as f:
        return {frozenset((str(sample_set.root / row["copy"]), str(sample_set.root / row["original"])))
                for row in csv.DictReader(f)}


def grouped_pairs(db: Database) -> set[frozenset[str]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(duplicate_groups.c.group_id, images.c.source)
                            .join(images, images.c.id == duplicate_groups.c.image_id)
                            .where(duplicate_groups.c.run_id == sa.select(sa.func.max(duplicate_groups.c.run_id))
                                   .scalar_subquery())).all()
    groups: dict[int, list[str]] = {}
    for group_id, source in rows:
        groups.setdefault(group_id, []).append(source)
    return {frozenset((a, b)) for members in groups.values() for a in members for b in members if a < b}


def test_cli_dedupe_finds_the_planted_copies(sample_set, tmp_path):
    # SQLite only: the verified rule on PostgreSQL is test_dedupe_verified's (both databases), the
    # report, uniques and is-duplicate there test_dedupe's, and the CLI on PostgreSQL the exact-rule test below.
    db_url = f"sqlite:///{tmp_path}/hash.db"
    assert cli(db_url, "load", str(sample_set.manifest), tmp_path=tmp_path).code == 0
    hashed = cli(db_url, "hash", tmp_path=tmp_path)
    assert hashed.code == 0 and f"{sample_set.images} hashed" in hashed.out

    refused = cli(db_url, "dedupe", tmp_path=tmp_path)   # the default (verified) rule needs embeddings
    assert refused.code != 0 and "run `lookalike featurize` first" in refused.err
    assert cli(db_url, "featurize", tmp_path=tmp_path).code == 0
    deduped = cli(db_url, "dedupe", "--html", str(tmp_path / "groups.html"), tmp_path=tmp_path)
    assert deduped.code == 0, deduped.err
    assert "verified rule" in deduped.out and "checked by geometry" in deduped.out
    with Database(db_url, tmp_path / "store") as db:
        found, truth = grouped_pairs(db), ground_truth_pairs(sample_set)
    # Copies of one original are near each other too, so every pair within a planted family counts.
    families: dict[str, set[str]] = {}
    for pair in truth:
        copy, original = sorted(pair, key=lambda p: "_copy" not in p)
        families.setdefault(original, {original}).add(copy)
    true_pairs = {frozenset((a, b)) for fam in families.values() for a in fam for b in fam if a < b}
    precision = len(found & true_pairs) / len(found)
    recall = len(found & true_pairs) / len(true_pairs)
    # The copies are mirrored, cropped, rotated, squashed…: see bench/bench_dedupe_quality.py for every rule.
    assert precision >= 0.9 and recall >= 0.8, (precision, recall)

    page = (tmp_path / "groups.html").read_text()
    groups = int(deduped.out.split(" groups,")[0].split()[-1])
    assert groups > 0 and page.count("<h2>Group") == groups and page.count('class="keeper"') == groups
    assert page.count("<img src=\"groups_thumbnails/") >= 2 * groups   # thumbnail files beside the page

    listed = cli(db_url, "duplicates", tmp_path=tmp_path)
    assert listed.code == 0 and listed.out.count("  keep  ") == page.count("<h2>Group")

    uniques = cli(db_url, "uniques", "--plot", str(tmp_path / "uniques.png"), tmp_path=tmp_path)
    assert uniques.code == 0, uniques.err
    total = next(line for line in uniques.out.splitlines() if line.startswith("total")).split()
    counts = [int(n) for n in total[2:]]   # sizes 8..1; size 1 is 2 bits: at most 4 unique per label, 3 labels
    assert int(total[1]) == sample_set.images and counts[0] >= sample_set.images - sample_set.copies
    assert counts[-1] <= 12 and counts[0] > counts[3] > counts[-1]
    with Image.open(tmp_path / "uniques.png") as plot:
        assert plot.format == "PNG" and plot.width > 300

    with open(sample_set.ground_truth, newline="") as f:   # a mirrored copy first: hashes never found those
        copies = sorted(csv.DictReader(f), key=lambda row: "mirror" not in row["transform"])
    for row in copies[:2]:
        hit = cli(db_url, "is-duplicate", str(sample_set.root / row["copy"]), tmp_path=tmp_path)
        # The stored original is named by its path (the copy itself is stored too, and matches as well).
        assert hit.code == 0 and "duplicate: " in hit.out, (row, hit.out)
        assert Path(row["original"]).name in hit.out, (row, hit.out)
    fresh = render_samples(tmp_path / "fresh", per_label=1, seed=99, copy_share=0)
    miss = cli(db_url, "is-duplicate", str(next((fresh.root / "striped").glob("*.jpg"))), tmp_path=tmp_path)
    assert miss.code == 1 and "not a duplicate" in miss.out


def test_cli_exact_rule_gives_the_same_groups_on_sqlite_and_postgresql(sample_set, pg_url, tmp_path):
    outcomes = []
    for url in (f"sqlite:///{tmp_path}/exact.db", pg_url):
        for args in (("load", str(sample_set.manifest)), ("hash",),
                     ("dedupe", "--rule", "exact", "--hash", "dhash_rowcol", "--size", "3", "--per-label")):
            done = cli(url, *args, tmp_path=tmp_path)
            assert done.code == 0, done.err
        with Database(url, tmp_path / "store") as db:
            outcomes.append(grouped_pairs(db))
    assert outcomes[0] == outcomes[1] and outcomes[0]


def test_cli_bad_dedupe_parameters_are_clear_errors(tmp_path):
    url = f"sqlite:///{tmp_path}/bad.db"
    assert cli(url, "db", "init", tmp_path=tmp_path).code == 0   # dedupe opens only a database that exists
    for args, message in ((("dedupe", "--rule", "exact", "--max-distance", "4"), "exact rule takes no maximum distance"),
                          (("dedupe", "--rule", "near", "--max-distance", "-1"), "must be between 0 and 127 bits")):
        done = cli(url, *args, tmp_path=tmp_path)
        assert done.code == 2 and message in done.err
