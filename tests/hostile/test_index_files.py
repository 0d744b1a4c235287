"""Hostile index folders: forged headers, garbage files and an unwritable place are never trusted and
never stop a search; the database answers as it would without the index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa

from lookalike.db import Database, embeddings, feature_models, images, now, vector_bytes
from lookalike.index import _header_bytes, _read_header, index_dir, open_index
from lookalike.search import similar_images

DIM = 8


def seeded(url: str, store) -> tuple[Database, int, np.ndarray]:
    db = Database(url, store)
    vectors = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float32)
    with db.begin() as conn:
        model = conn.execute(sa.insert(feature_models).values(
            name="efficientnet-lite0", weights_sha256="1" * 64, dim=DIM, input_size=1, preprocessing="none",
            created_at=now()).returning(feature_models.c.id)).scalar_one()
        conn.execute(sa.insert(images), [dict(id=i, sha256=f"{i:064x}", source=f"{i}.jpg", byte_size=1, status="ok",
                                              loaded_at=now()) for i in range(1, 41)])
        conn.execute(sa.insert(embeddings), [dict(image_id=i, model_id=model, vector=vector_bytes(vectors[i - 1]))
                                             for i in range(1, 41)])
    return db, model, vectors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forged", [{"epoch": "../../../etc/passwd"}, {"rows": -5}, {"rows": 10**15},
                                    {"generation": True}, {"dim": "8"}])
def test_a_forged_header_with_a_valid_checksum_is_rebuilt_not_followed(sqlite_url, tmp_path, forged):
    db, model, vectors = seeded(sqlite_url, tmp_path / "store")
    with db:
        expected = open_index(db, model).search(vectors[0], 5, exclude={1})[0].tolist()
        folder = index_dir(db) / f"model-{model}"
        header = _read_header(folder)
        body = json.loads(_header_bytes(header))["header"] | forged
        from lookalike.index import Header
        forged_header = Header.__new__(Header)
        forged_header.__dict__.update(body)
        (folder / "header.json").write_bytes(_header_bytes(forged_header))   # a checksum that matches
        assert _read_header(folder) is None or forged == {"rows": 10**15}
        reopened = open_index(db, model)
        assert reopened.search(vectors[0], 5, exclude={1})[0].tolist() == expected
        assert _read_header(folder).rows == 40


@pytest.mark.timeout(60)
def test_garbage_in_every_file_is_rebuilt(sqlite_url, tmp_path):
    db, model, vectors = seeded(sqlite_url, tmp_path / "store")
    with db:
        expected = open_index(db, model).search(vectors[2], 5, exclude={3})[0].tolist()
        folder = index_dir(db) / f"model-{model}"
        for path in folder.iterdir():
            if path.name != "lock":
                path.write_bytes(b"\x00\xff" * 1000)
        assert open_index(db, model).search(vectors[2], 5, exclude={3})[0].tolist() == expected


@pytest.mark.timeout(60)
def test_an_index_place_that_cannot_be_a_folder_still_searches(sqlite_url, tmp_path, caplog):
    db, _model, _vectors = seeded(sqlite_url, tmp_path / "store")
    with db:
        index_dir(db).write_text("not a folder")   # mkdir fails, even for root
        found = similar_images(db, 1, k=5)
        assert len(found) == 5 and 1 not in [m.image_id for m in found]
        assert "indexing in a temporary folder" in caplog.text
        assert index_dir(db).read_text() == "not a folder"
