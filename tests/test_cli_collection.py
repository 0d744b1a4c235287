"""The collection commands, in process: samples, load, status, hash, dedupe, duplicates, uniques,
is-duplicate, export, store check. One small rendered corpus for the module; the near rule, as
dedupe itself is not what is tested here."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from support.cli import lookalike

PER_LABEL = 6   # 18 images and their planted copies


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_collection")
    rendered = lookalike("samples", root / "samples", "--per-label", PER_LABEL, "--seed", 1,
                         "--sheet", root / "sheet.png")
    assert rendered.code == 0, rendered.err
    db = ["--db", f"sqlite:///{root}/c.db"]
    loaded = lookalike("load", root / "samples", *db)
    hashed = lookalike("hash", *db)
    deduped = lookalike("dedupe", "--rule", "near", "--html", root / "groups.html", *db)
    return root, db, rendered, loaded, hashed, deduped


def test_samples_renders_the_set_with_its_manifest_and_sheet(corpus):
    root, _db, rendered, *_ = corpus
    assert rendered.out.startswith("rendered ") and "dotted: " in rendered.out
    with open(root / "samples" / "manifest.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    images = int(rendered.out.split()[1])
    assert len(rows) == images >= 3 * PER_LABEL
    assert Image.open(root / "sheet.png").size[0] > 0


def test_load_hash_and_status(corpus):
    root, db, rendered, loaded, hashed, _ = corpus
    images = int(rendered.out.split()[1])
    assert loaded.code == 0 and loaded.out.startswith(f"loaded {images} new images"), loaded.err
    assert hashed.code == 0 and hashed.out.startswith(f"hash: {images} hashed"), hashed.err
    status = lookalike("status", *db)
    assert status.code == 0 and f"hashed:   {images} of {images} ok images" in status.out
    assert "dotted " in status.out and "leopard " in status.out and "striped " in status.out
    again = lookalike("load", root / "samples", *db)   # nothing new: skipped, not doubled
    assert again.code == 0 and "loaded 0 new images" in again.out


def test_dedupe_duplicates_and_uniques(corpus):
    root, db, *_, deduped = corpus
    assert deduped.code == 0 and deduped.out.startswith("dedupe run 1: near rule"), deduped.err
    assert "<html" in (root / "groups.html").read_text().lower()
    listed = lookalike("duplicates", *db)
    assert listed.code == 0 and listed.out.startswith("group ") and "keep" in listed.out
    uniques = lookalike("uniques", "--plot", root / "uniques.png", *db)
    assert uniques.code == 0 and "size 8" in uniques.out and (root / "uniques.png").stat().st_size > 0


def test_is_duplicate_answers_yes_for_a_planted_copy_and_no_for_a_new_image(corpus, tmp_path):
    root, db, *_ = corpus
    copy = next((root / "samples").rglob("*_copy*.jpg"))
    found = lookalike("is-duplicate", copy, "--rule", "near", *db)
    assert found.code == 0 and "duplicate: a copy of" in found.out, found.out + found.err
    stranger = tmp_path / "stranger.png"
    Image.radial_gradient("L").convert("RGB").save(stranger)
    missed = lookalike("is-duplicate", stranger, "--rule", "near", "--max-distance", 0, *db)
    assert missed.code == 1 and missed.out.startswith("not a duplicate")


def test_export_needs_a_split_and_store_check_is_clean(corpus):
    root, db, *_ = corpus
    refused = lookalike("export", root / "out", "--dry-run", "--layout", "train-test", *db)
    assert refused.code == 2 and "run `lookalike split` first" in refused.err
    checked = lookalike("store", "check", *db)
    assert checked.code == 0 and "orphans:        0" in checked.out


def test_similar_by_path_needs_embeddings_first(corpus):
    root, db, *_ = corpus
    first = next((root / "samples").rglob("*.jpg"))
    refused = lookalike("similar", first, "--json", *db)
    assert refused.code == 2 and refused.out == "" and "featurize" in refused.err
    with pytest.raises(json.JSONDecodeError):
        json.loads(refused.out)
