"""Similarity spaces fitted on the collection (lookalike.spaces), SQLite and PostgreSQL: fit, the default chosen
by evaluate, incremental projection of new images, and the checksum on stored parameters."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import sqlalchemy as sa

from lookalike.db import (Database, embeddings, feature_models, images, load_embeddings, now, similarity_spaces,
                          space_vectors, vector_bytes)
from lookalike.errors import Precondition
from lookalike.evaluate import evaluate_model
from lookalike.search import similar_images
from lookalike.spaces import fit_spaces
from lookalike.split import split_images

from support.cli import lookalike
from test_evaluate import add_collection, clusters


def space_rows(db) -> dict[str, tuple[int, int]]:
    """name -> (space id, stored vectors)."""
    with db.engine.connect() as conn:
        return {name: (space_id, conn.execute(sa.select(sa.func.count()).where(
                    space_vectors.c.space_id == space_id)).scalar())
                for space_id, name in conn.execute(sa.select(similarity_spaces.c.id, similarity_spaces.c.name))}


def test_unlabelled_collection_gets_the_label_free_space(db):
    add_collection(db, [None] * 40, np.random.default_rng(3).normal(size=(40, 16)))
    summary = fit_spaces(db)
    assert list(summary.fitted) == ["pca"] and summary.skipped == {"learned": "no train split with two or more labels"}
    assert summary.projected == 40 and space_rows(db)["pca"][1] == 40
    matches = similar_images(db, 1, k=5)
    assert {m.space for m in matches} == {"pca"} and 1 not in {m.image_id for m in matches}
    assert similar_images(db, 1, k=5, space="embeddings")[0].space == "embeddings"
    with pytest.raises(Precondition, match="no learned space fitted on efficientnet-lite0 embeddings: run "
                                           "`lookalike fit`"):
        similar_images(db, 1, k=5, space="learned")


def test_evaluate_records_the_best_space_and_searches_use_it(db):
    # Clusters in 24 dimensions that the raw cosine only partly separates; the learned space does.
    labels, vectors = clusters(40, 3, 24, separation=1.0, seed=5)
    add_collection(db, labels, vectors)
    split_images(db)
    summary = fit_spaces(db)
    assert list(summary.fitted) == ["pca", "learned"] and summary.fitted["learned"]["labels"] == 3
    evaluation = evaluate_model(db, queries_per_label=10, negatives_per_query=20)
    assert evaluation.default_space == "learned"
    learned, raw = (evaluation.value(space, "cosine", "top1") for space in ("learned", "embeddings"))
    assert learned >= 0.9 and learned > raw
    assert "  default space: learned (best top1, cosine), used where --space is auto" in evaluation.lines()
    matches = similar_images(db, 1, k=10)
    assert {m.space for m in matches} == {"learned"}
    assert len({f"{m.similarity:.4f}" for m in matches}) == 10   # the look part orders a label's images
    with db.engine.connect() as conn:
        label_of = dict(conn.execute(sa.select(images.c.id, images.c.label)).all())
    assert sum(label_of[m.image_id] == label_of[1] for m in matches) >= 8
    # --json: every space's table, the default marked.
    done = lookalike("--db", db.url.render_as_string(hide_password=False), "--store", db.store.root, "evaluate",
                     "--queries-per-label", 10, "--negatives", 20, "--json")
    assert done.code == 0, done.err
    table = json.loads(done.out)
    assert table["default_space"] == "learned" and set(table["spaces"]) == {"embeddings", "pca", "learned"}
    assert [name for name, space in table["spaces"].items() if space["default"]] == ["learned"]
    assert table["spaces"]["learned"]["cosine"]["top1"] == evaluation.value("learned", "cosine", "top1")


def test_new_images_are_projected_with_the_stored_parameters(db):
    labels, vectors = clusters(30, 2, 16, separation=1.0, seed=9)
    add_collection(db, labels, vectors)
    split_images(db)
    fit_spaces(db)
    before = space_rows(db)
    # A row written by raw SQL, as another writer would: the search projects it without a refit.
    with db.begin() as conn:
        model_id = conn.execute(sa.select(embeddings.c.model_id).limit(1)).scalar()
        new_id = conn.execute(sa.insert(images).values(
            sha256=hashlib.sha256(b"new").hexdigest(), label="label0", source="synthetic/new", byte_size=100,
            status="ok", loaded_at=now()).returning(images.c.id)).scalar_one()
        twin = vectors[0] / np.linalg.norm(vectors[0])
        conn.execute(sa.insert(embeddings).values(image_id=new_id, model_id=model_id, vector=vector_bytes(twin)))
    for space in ("pca", "learned"):
        assert similar_images(db, 1, k=1, space=space)[0].image_id == new_id   # its twin, found at once
        assert similar_images(db, new_id, k=1, space=space)[0].image_id == 1
    assert space_rows(db) == before   # searching wrote nothing and refitted nothing
    from lookalike.spaces import project_fitted
    assert project_fitted(db, model_id) == 2
    after = space_rows(db)
    assert {name: (i, n - 1) for name, (i, n) in after.items()} == before


def test_tampered_parameters_are_refused(db):
    add_collection(db, [None] * 10, np.random.default_rng(1).normal(size=(10, 8)))
    fit_spaces(db)
    with db.begin() as conn:
        conn.execute(sa.update(similarity_spaces).values(checksum="0" * 64))
    with pytest.raises(Precondition, match="the stored pca space's parameters fail their checksum: run "
                                           "`lookalike fit` again"):
        similar_images(db, 1, k=3)


def test_parameters_changed_under_their_checksum_are_refused_by_the_quick_cli_path_too(sqlite_url, tmp_path):
    """The CLI answers `similar ID` from a current folder without SQLAlchemy (lookalike.quick): it still
    hashes a space's stored parameters before trusting the folder built from them."""
    with Database(sqlite_url, tmp_path / "store") as db:
        add_collection(db, [None] * 10, np.random.default_rng(2).normal(size=(10, 8)))
        fit_spaces(db)   # builds the pca folder: current, so the quick path would answer
        with db.begin() as conn:
            params = conn.execute(sa.select(similarity_spaces.c.params)).scalar_one()
            conn.execute(sa.update(similarity_spaces).values(params=params[:-1] + bytes([params[-1] ^ 1])))
    refused = lookalike("similar", "1", "--top", "3", "--db", sqlite_url)
    assert refused.code != 0 and "the stored pca space's parameters fail their checksum" in refused.err


def test_fit_needs_embeddings(db):
    with pytest.raises(LookupError):   # no feature model at all: the featurize hint
        fit_spaces(db)


def test_embeddings_load_by_more_ids_than_one_statement_may_bind(sqlite_url, tmp_path):
    # SQLite binds at most 32,766 values in a statement: fit loads up to 50,000 sampled ids at once.
    n = 33_000
    vectors = np.random.default_rng(4).normal(size=(n, 4)).astype(np.float32)
    with Database(sqlite_url, tmp_path / "store") as db:
        with db.begin() as conn:   # in bulk: row by row would take most of a minute
            model_id = conn.execute(sa.insert(feature_models).values(
                name="efficientnet-lite0", weights_sha256="0" * 64, dim=4, input_size=224, preprocessing="synthetic",
                created_at=now()).returning(feature_models.c.id)).scalar_one()
            conn.execute(sa.insert(images), [{"id": i + 1, "sha256": f"{i:064x}", "source": f"synthetic/{i}",
                                              "byte_size": 1, "status": "ok", "loaded_at": now()} for i in range(n)])
            conn.execute(sa.insert(embeddings), [{"image_id": i + 1, "model_id": model_id,
                                                  "vector": vector_bytes(vectors[i])} for i in range(n)])
        with db.engine.connect() as conn:
            ids, matrix = load_embeddings(conn, model_id, np.arange(n, 0, -1))   # every id, in reverse
    assert ids.tolist() == list(range(1, n + 1)) and np.array_equal(matrix, vectors)


def brute_force(db, space, query_id: int, k: int) -> list[int]:
    """The k nearest images in ``space``, every embedding projected here (the old load-everything path)."""
    with db.engine.connect() as conn:
        ids, vectors = load_embeddings(conn, space.feature_model_id, None)
    projected = space.project(vectors)
    distance = 1.0 - projected @ projected[list(ids).index(query_id)]
    order = [i for i in np.lexsort((ids, distance)) if ids[i] != query_id]
    return ids[order[:k]].tolist()


def test_a_space_is_searched_from_its_own_index_folder_that_follows_every_writer(db):
    from lookalike.index import _caught_up_in_memory, _open_files, generation, index_dir, model_dir, open_index
    from lookalike.projection import load_space
    labels, vectors = clusters(40, 2, 16, separation=1.0, seed=11)
    add_collection(db, labels, vectors)
    split_images(db)
    fitted = fit_spaces(db)
    with db.engine.connect() as conn:
        model_id = conn.execute(sa.select(embeddings.c.model_id).limit(1)).scalar()
        spaces = {name: load_space(conn, name, model_id) for name in ("pca", "learned")}
    folders = {name: model_dir(db, model_id, space=space) for name, space in spaces.items()}
    # fit built both folders, and says so
    assert all(f"index {folder} (efficientnet-lite0, {name} space): exact, 80 vectors" in "\n".join(fitted.lines())
               for name, folder in folders.items())
    headers = {name: _open_files(folder).header for name, folder in folders.items()}
    assert {name: (h.space_id, h.dim) for name, h in headers.items()} == {
        name: (space.id, space.dim) for name, space in spaces.items()}
    for name, space in spaces.items():
        assert [m.image_id for m in similar_images(db, 5, k=10, space=name)] == brute_force(db, space, 5, 10)

    # Rows written and removed by raw SQL are caught up in the folder (appended; no rebuild), on any search.
    stale = open_index(db, model_id, space=spaces["pca"])
    with db.begin() as conn:
        new_id = conn.execute(sa.insert(images).values(
            sha256=hashlib.sha256(b"twin").hexdigest(), label="label0", source="synthetic/twin", byte_size=100,
            status="ok", loaded_at=now()).returning(images.c.id)).scalar_one()
        conn.exec_driver_sql("DELETE FROM embeddings WHERE image_id = 7")
    with db.begin() as conn:
        conn.execute(sa.insert(embeddings).values(image_id=new_id, model_id=model_id,
                                                  vector=vector_bytes(vectors[0] / np.linalg.norm(vectors[0]))))
    for name, space in spaces.items():
        assert similar_images(db, 1, k=1, space=name)[0].image_id == new_id
        assert 7 not in {m.image_id for m in similar_images(db, 8, k=79, space=name)}
        assert [m.image_id for m in similar_images(db, 5, k=10, space=name)] == brute_force(db, space, 5, 10)
        caught_up = _open_files(folders[name]).header
        assert (caught_up.epoch, caught_up.rows, caught_up.live) == (headers[name].epoch, 81, 80)
    # A reader that may not write (a PL/Python backend) applies the same changes in its own memory.
    with db.engine.connect() as conn:
        current = generation(conn, model_id)[0]
    in_memory = _caught_up_in_memory(db, stale, current, spaces["pca"])
    on_disk = open_index(db, model_id, space=spaces["pca"])
    query = on_disk.vector(new_id)
    assert in_memory.search(query, 10)[0].tolist() == on_disk.search(query, 10)[0].tolist()

    # A refit is a new space row: a new folder, the old one gone.
    fit_spaces(db, seed=3)
    with db.engine.connect() as conn:
        refitted = {name: load_space(conn, name, model_id) for name in ("pca", "learned")}
    assert sorted(p.name for p in index_dir(db).iterdir()) == sorted(
        [f"model-{model_id}"] + [model_dir(db, model_id, space=space).name for space in refitted.values()])
