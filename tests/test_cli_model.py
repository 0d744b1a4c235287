"""The model commands, in process: featurize, split, train, evaluate, query add, rank, similar, run.

One small rendered corpus, loaded, hashed and deduped (near rule) once, featurized once."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from support.cli import lookalike


@pytest.fixture(scope="module")
def model_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_model")
    assert lookalike("samples", root / "samples", "--per-label", 6, "--seed", 4).code == 0
    db = ["--db", f"sqlite:///{root}/m.db"]
    for step in (["load", root / "samples"], ["hash"], ["dedupe", "--rule", "near"]):
        done = lookalike(*step, *db)
        assert done.code == 0, done.err
    featurized = lookalike("featurize", "--batch-size", 8, *db)
    split = lookalike("split", "--test-ratio", 0.3, *db)
    trained = lookalike("train", *db)
    return root, db, featurized, split, trained


def test_featurize_split_and_train(model_db):
    _root, db, featurized, split, trained = model_db
    assert featurized.code == 0 and featurized.out.startswith("featurize (efficientnet-lite0): "), featurized.err
    assert " embedded " in featurized.out and ", 0 failed" in featurized.out
    assert split.code == 0 and split.out.startswith("split (seed 0, test ratio 0.3): "), split.err
    assert trained.code == 0 and trained.out.startswith("train (efficientnet-lite0): trained model 1"), trained.err
    again = lookalike("featurize", *db)  # only missing work
    assert again.code == 0 and " 0 embedded " in again.out


def test_evaluate_writes_its_table_and_plot(model_db):
    root, db, *_ = model_db
    evaluated = lookalike("evaluate", "--queries-per-label", 3, "--negatives", 10, "--plot", root / "eval.png", *db)
    assert evaluated.code == 0 and evaluated.out.startswith("evaluate (efficientnet-lite0, classifier 1)"), \
        evaluated.err
    assert "embeddings cosine" in evaluated.out and "scores" in evaluated.out
    assert Image.open(root / "eval.png").size[0] > 0


def test_query_add_then_rank(model_db):
    root, db, *_ = model_db
    # A file no stored image equals (the first dotted sample, mirrored): with loads running concurrently,
    # image 1 may be any sample, and a query equal to image 1 would be the same query.
    path = root / "query.png"
    Image.open(sorted((root / "samples" / "dotted").glob("*.jpg"))[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    added = lookalike("query", "add", 1, path, *db)
    assert added.code == 0 and added.out.startswith("2 queries in query_images"), added.err
    ranked = lookalike("rank", "--top", 5, *db)
    assert ranked.code == 0 and "top 5 in embeddings space for 2 queries → 10 rows" in ranked.out, ranked.err
    unknown = lookalike("query", "add", 999999, *db)
    assert unknown.code == 2 and unknown.err.strip() == "error: no image with id 999999"


def test_similar_by_id_and_by_path_as_text_json_and_sheet(model_db):
    root, db, *_ = model_db
    table = lookalike("similar", 2, "--top", 3, *db)
    assert table.code == 0 and table.out.splitlines()[0].split()[:3] == ["rank", "image", "label"], table.err
    assert len(table.out.splitlines()) == 5 and table.out.splitlines()[-1] == "space: embeddings (auto)"
    path = sorted((root / "samples" / "striped").glob("*.jpg"))[0]
    as_json = lookalike("similar", path, "--top", 4, "--json", "--label", "striped", "--sheet", root / "s.png", *db)
    assert as_json.code == 0, as_json.err
    found = json.loads(as_json.out)
    assert [m["rank"] for m in found] == [1, 2, 3, 4] and {m["label"] for m in found} == {"striped"}
    assert "contact sheet:" in as_json.err and Image.open(root / "s.png").size[0] > 0
    bad_k = lookalike("similar", 2, "--top", 0, *db)
    assert bad_k.code == 2 and "--top must be between 1 and 1000, not 0" in bad_k.err and bad_k.out == ""


def test_run_does_the_remaining_steps(model_db):
    _root, db, *_ = model_db
    ran = lookalike("run", "--rule", "near", "--queries-per-label", 3, "--negatives", 10, *db)
    assert ran.code == 0, ran.err
    for step in ("hash", "dedupe", "featurize", "split", "train", "evaluate", "rank"):
        assert f"[{step}]" in ran.out, (step, ran.out)


def test_export_writes_the_split_unique_images(model_db):
    root, db, *_ = model_db
    planned = lookalike("export", root / "out", "--dry-run", *db)
    assert planned.code == 0 and not (root / "out" / "manifest.csv").exists(), planned.err
    exported = lookalike("export", root / "out", *db)
    assert exported.code == 0, exported.err
    written = {p.relative_to(root / "out").parts[0] for p in (root / "out").rglob("*.jpg")}
    assert written == {"Train", "Test"} and (root / "out" / "manifest.csv").is_file()
