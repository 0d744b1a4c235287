"""The persistent vector index (lookalike.index): the generation counter the triggers keep, incremental
catch-up of any writer's rows, torn files repaired, the same answers as the old load-everything path,
and a by-id search that imports neither torch nor an HTTP client."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa

from lookalike.db import Database, embeddings, feature_models, images, now, settings, vector_bytes
from lookalike.db.schema import embedding_changes
from lookalike.index import _caught_up_in_memory, _read_header, generation, index_dir, open_index
from lookalike.search import collection, similar_images
from lookalike.vectors import ExactIndex

DIM = 16


def add_model(db: Database, name: str = "test-model") -> int:
    with db.begin() as conn:
        return conn.execute(sa.insert(feature_models).values(
            name=name, weights_sha256="0" * 64, dim=DIM, input_size=1, preprocessing="none", created_at=now())
            .returning(feature_models.c.id)).scalar_one()


def add_images(db: Database, model_id: int, vectors: np.ndarray, start: int = 1) -> list[int]:
    """Images ``start``.. with these embeddings (label a/b alternating), through SQLAlchemy."""
    ids = list(range(start, start + len(vectors)))
    with db.begin() as conn:
        conn.execute(sa.insert(images), [dict(id=i, sha256=f"{i:064x}", source=f"img{i}.jpg", byte_size=1, status="ok",
                                              loaded_at=now(), label="ab"[i % 2]) for i in ids])
        conn.execute(sa.insert(embeddings), [dict(image_id=i, model_id=model_id, vector=vector_bytes(v))
                                             for i, v in zip(ids, vectors)])
    return ids


def raw_sql(db: Database, *statements: str) -> None:
    """Statements as another writer would send them: plain SQL on a plain connection."""
    with db.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def hexvec(vector: np.ndarray, dialect: str) -> str:
    data = vector_bytes(vector).hex()
    return f"X'{data}'" if dialect == "sqlite" else f"'\\x{data}'::bytea"


def exact_answer(db: Database, model_id: int, query: np.ndarray, k: int, exclude=()) -> list[int]:
    """The old path: every stored vector loaded into an ExactIndex."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(embeddings.c.image_id, embeddings.c.vector)
                            .where(embeddings.c.model_id == model_id).order_by(embeddings.c.image_id)).all()
    exact = ExactIndex(DIM)
    exact.add([r[0] for r in rows], np.stack([np.frombuffer(r[1], "<f4") for r in rows]))
    return exact.search(query, k, exclude=[list(exclude)])[0][0].tolist()


def test_every_write_bumps_the_generation_and_logs_the_ids(db):
    model = add_model(db)
    rng = np.random.default_rng(1)
    with db.engine.connect() as conn:
        assert generation(conn, model) == (0, 0)
    add_images(db, model, rng.normal(size=(3, DIM)))
    with db.engine.connect() as conn:
        after_orm = generation(conn, model)[0]
    assert after_orm >= 1
    # Raw SQL, a cascade from images, an update: every one is counted in its own transaction.
    raw_sql(db, "DELETE FROM embeddings WHERE image_id = 1")
    raw_sql(db, "DELETE FROM images WHERE id = 2")
    raw_sql(db, f"UPDATE embeddings SET vector = {hexvec(rng.normal(size=DIM), db.dialect)} WHERE image_id = 3")
    with db.engine.connect() as conn:
        final = generation(conn, model)[0]
        logged = conn.execute(sa.select(embedding_changes.c.generation, embedding_changes.c.image_id)
                              .where(embedding_changes.c.generation > after_orm)
                              .order_by(embedding_changes.c.generation)).all()
    assert final > after_orm
    assert [image for _g, image in logged][:2] == [1, 2] and {image for _g, image in logged} == {1, 2, 3}
    assert max(g for g, _i in logged) == final


def test_an_older_database_gets_the_counter_and_triggers_by_migration(db):
    model = add_model(db)
    add_images(db, model, np.ones((1, DIM)))
    with db.begin() as conn:
        for event in ("insert", "delete", "update"):
            conn.exec_driver_sql(f"DROP TRIGGER embeddings_generation_{event}"
                                 + (" ON embeddings" if db.dialect == "postgresql" else ""))
        conn.exec_driver_sql("DROP TABLE embedding_generations")
        conn.exec_driver_sql("DROP TABLE embedding_changes")
        conn.execute(sa.update(settings).where(settings.c.key == "schema_version").values(value="2"))
    url, store = db.url.render_as_string(hide_password=False), db.store.root
    db.close()
    with Database(url, store) as again:
        raw_sql(again, "DELETE FROM embeddings WHERE image_id = 1")
        with again.engine.connect() as conn:
            assert generation(conn, model)[0] == 1
            assert conn.execute(sa.select(embedding_changes.c.image_id)).scalars().all() == [1]


def test_the_index_answers_as_the_old_exact_path_and_catches_up_with_raw_sql(db):
    model = add_model(db)
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(60, DIM)).astype(np.float32)
    add_images(db, model, vectors)
    first = open_index(db, model, "exact")
    for q in (0, 7, 33):
        found, distances = first.search(vectors[q], 10, exclude={q + 1})
        assert found.tolist() == exact_answer(db, model, vectors[q], 10, exclude=[q + 1])
        assert np.all(np.diff(distances) >= 0) and q + 1 not in found
    epoch, rows = first.header.epoch, first.header.rows

    # Another writer: three new rows and two deleted ones, in plain SQL.
    new = rng.normal(size=(3, DIM)).astype(np.float32)
    raw_sql(db, *[f"INSERT INTO images (id, sha256, source, byte_size, status, loaded_at) "
                  f"VALUES ({100 + i}, '{100 + i:064x}', 'raw{i}', 1, 'ok', '2026-01-01')" for i in range(3)])
    raw_sql(db, *[f"INSERT INTO embeddings (image_id, model_id, vector) VALUES ({100 + i}, {model}, "
                  f"{hexvec(v, db.dialect)})" for i, v in enumerate(new)],
            "DELETE FROM embeddings WHERE image_id IN (5, 6)")
    caught = open_index(db, model, "exact")
    assert caught.header.epoch == epoch and caught.header.rows == rows + 3   # appended, not rebuilt
    assert len(caught) == 61 and {5, 6}.isdisjoint(caught.ids.tolist()) and {100, 101, 102} <= set(caught.ids)
    assert caught.search(new[1], 1)[0].tolist() == [101]
    for q in (0, 20):
        assert caught.search(vectors[q], 10, exclude={q + 1})[0].tolist() == \
            exact_answer(db, model, vectors[q], 10, exclude=[q + 1])


def test_a_removed_image_leaves_the_search_and_the_cached_collection(db):
    model = add_model(db, "efficientnet-lite0")
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(30, DIM)).astype(np.float32)
    add_images(db, model, vectors)
    best = similar_images(db, 1, k=3)[0].image_id
    raw_sql(db, f"DELETE FROM images WHERE id = {best}")
    after = [m.image_id for m in similar_images(db, 1, k=3)]
    assert best not in after and len(after) == 3
    assert collection(db).version[2] == generation(db.engine.connect(), model)[0]


@pytest.mark.parametrize("damage", ["cut the matrix", "cut the id map", "garble the header", "cut the ivf"])
def test_a_torn_index_is_rebuilt_on_open(sqlite_url, tmp_path, damage):
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db)
        rng = np.random.default_rng(4)
        vectors = rng.normal(size=(1100, DIM)).astype(np.float32)
        add_images(db, model, vectors)
        built = open_index(db, model, "ivf")
        before = built.search(vectors[3], 5, exclude={4})[0].tolist()
        folder = index_dir(db) / f"model-{model}"
        h = _read_header(folder)
        target = {"cut the matrix": folder / f"vectors.{h.epoch}.f32",
                  "cut the id map": folder / f"ids.{h.generation}.npy",
                  "garble the header": folder / "header.json",
                  "cut the ivf": folder / f"ivf.{h.ivf_epoch}.faiss"}[damage]
        data = target.read_bytes()
        target.write_bytes(data.replace(b'"rows"', b'"rowz"') if damage == "garble the header"
                           else data[:len(data) // 2])
        repaired = open_index(db, model, "ivf")
        assert repaired.header.epoch == h.epoch + 1   # rebuilt from the database
        assert repaired.search(vectors[3], 5, exclude={4})[0].tolist() == before
        assert json.loads((folder / "header.json").read_text())["header"]["rows"] == 1100


def test_filters_return_k_rows_on_exact_and_ivf(sqlite_url, tmp_path):
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db)
        vectors = np.random.default_rng(5).normal(size=(1200, DIM)).astype(np.float32)
        add_images(db, model, vectors)
        odd = [i for i in range(1, 1201) if i % 2]
        for kind in ("exact", "ivf"):
            index = open_index(db, model, kind)
            assert index.kind == kind
            found, _ = index.search(vectors[0], 25, exclude={1}, allowed=odd[:40])
            assert len(found) == 25 and set(found) <= set(odd[1:40])
            found, _ = index.search(vectors[0], 25, exclude={1}, allowed=odd)
            assert len(found) == 25 and set(found) <= set(odd) - {1}


@pytest.mark.timeout(120)
def test_similar_by_id_imports_neither_torch_nor_httpx_nor_faiss(sqlite_url, tmp_path):
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db, "efficientnet-lite0")
        add_images(db, model, np.random.default_rng(6).normal(size=(20, DIM)))
    script = ("import json, sys\nfrom lookalike.cli import main\n"
              f"code = main(['similar', '4', '--json', '--top', '3', '--db', {sqlite_url!r}])\n"
              "loaded = sorted({'torch', 'httpx', 'onnxruntime', 'faiss'} & set(sys.modules))\n"
              "print(json.dumps({'code': code, 'loaded': loaded}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"code": 0, "loaded": []}
    assert len(json.loads("\n".join(lines[:-1]))) == 3


QUICK_SIMILAR = """import json, sys
from lookalike.cli import main
code = main(['similar', '4', '--json', '--top', '3', '--db', sys.argv[1]])
print(json.dumps({'code': code, 'sqlalchemy': 'sqlalchemy' in sys.modules}))
"""


@pytest.mark.timeout(180)
def test_similar_by_id_on_a_current_folder_imports_no_sqlalchemy_and_answers_as_the_long_way(sqlite_url, tmp_path):
    """A cold `similar ID` spent most of its time importing SQLAlchemy. On a current index folder it reads
    the few rows it needs through sqlite3 (lookalike.quick); a folder behind the database, or none, takes
    the long way, which catches up: the same JSON either way."""
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db, "efficientnet-lite0")
        vectors = np.random.default_rng(8).normal(size=(20, DIM))
        add_images(db, model, vectors)

    def similar() -> tuple[list[dict], bool]:
        out = subprocess.run([sys.executable, "-c", QUICK_SIMILAR, sqlite_url], capture_output=True, text=True,
                             timeout=100, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        status = json.loads(lines[-1])
        assert status["code"] == 0
        return json.loads("\n".join(lines[:-1])), status["sqlalchemy"]

    first, long_way = similar()            # no folder yet: the long way builds it
    again, long_way_again = similar()      # the folder is current: the quick way
    assert long_way and not long_way_again and again == first and len(first) == 3
    with Database(sqlite_url) as db:       # another writer adds a copy of the query by raw SQL
        raw_sql(db, "INSERT INTO images (id, sha256, source, byte_size, status, loaded_at, label) SELECT 100, "
                    f"'{100:064x}', 'copy.jpg', byte_size, status, loaded_at, label FROM images WHERE id = 4",
                f"INSERT INTO embeddings (image_id, model_id, vector) VALUES (100, {model}, "
                f"{hexvec(vectors[3], db.dialect)})")
    behind, long_way_behind = similar()    # the folder is behind: the long way, which catches it up
    assert long_way_behind and [m["image_id"] for m in behind] == [100] + [m["image_id"] for m in first[:2]]
    caught_up, long_way_after = similar()
    assert not long_way_after and caught_up == behind
    from support.cli import lookalike   # an IVF asked of a folder too small for one: refused, as the long way does
    refused = lookalike("similar", "4", "--index", "ivf", "--db", sqlite_url)
    assert refused.code != 0 and "at least 1000 vectors" in refused.err


def test_index_status_and_rebuild_from_the_cli(sqlite_url, tmp_path):
    from support.cli import lookalike
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db, "efficientnet-lite0")
        add_images(db, model, np.random.default_rng(7).normal(size=(1100, DIM)))
        with db.engine.connect() as conn:
            current = generation(conn, model)[0]
    before = lookalike("index", "status", "--db", sqlite_url)
    assert before.code == 0 and "built on the first search" in before.out
    rebuilt = lookalike("index", "rebuild", "--index", "ivf", "--db", sqlite_url)
    assert rebuilt.code == 0, rebuilt.err
    assert "ivf, 1100 vectors" in rebuilt.out and f"generation {current}, fresh" in rebuilt.out
    assert "recall@10" in rebuilt.out
    with Database(sqlite_url) as db:
        raw_sql(db, "DELETE FROM embeddings WHERE image_id = 1")
    assert "stale" in lookalike("index", "status", "--db", sqlite_url).out


def test_label_and_exclude_duplicates_still_return_k_on_exact_and_ivf(sqlite_url, tmp_path):
    from lookalike.db import dedupe_runs, duplicate_groups
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db, "efficientnet-lite0")
        add_images(db, model, np.random.default_rng(8).normal(size=(1200, DIM)))
        copies = set(range(2, 1201, 4))   # 300 non-keepers, each in a group with the image before it
        with db.begin() as conn:
            run = conn.execute(sa.insert(dedupe_runs).values(
                rule="exact", hash_kind="dhash_rowcol", hash_size=3, per_label=False, include_low_detail=False,
                groups=300, duplicates=300, created_at=now()).returning(dedupe_runs.c.id)).scalar_one()
            conn.execute(sa.insert(duplicate_groups), [
                dict(run_id=run, image_id=i - 1 + d, group_id=i, is_keeper=d == 0, distance=d)
                for i in copies for d in (0, 1)])
        for kind in ("exact", "ivf"):
            unique = [m.image_id for m in similar_images(db, 3, k=40, index=kind, exclude_duplicates=True)]
            assert len(unique) == 40 and not copies & set(unique) and 3 not in unique
            labelled = similar_images(db, 3, k=40, index=kind, label="a", exclude_duplicates=True)
            assert len(labelled) == 40 and {m.label for m in labelled} == {"a"}
            assert not copies & {m.image_id for m in labelled}


@pytest.mark.timeout(120)
def test_cli_and_web_give_the_same_answer_and_the_web_sees_raw_sql_rows(sqlite_url, tmp_path):
    import httpx
    from support.cli import lookalike
    from lookalike.web.app import create_app, running_server
    vectors = np.random.default_rng(9).normal(size=(80, DIM)).astype(np.float32)
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db, "efficientnet-lite0")
        add_images(db, model, vectors)
        cli = json.loads(lookalike("similar", "7", "--top", "5", "--label", "b", "--json", "--db", sqlite_url).out)
        with running_server(create_app(db, warm=False)) as base, httpx.Client(base_url=base, timeout=60) as http:
            web = http.post("/api/similar", json={"id": 7, "k": 5, "label": "b"}).json()["results"]
            assert [r["image_id"] for r in web] == [r["image_id"] for r in cli] and len(web) == 5
            assert {r["label"] for r in web} == {"b"}
            # A copy of image 7 written by plain SQL is the web app's next best answer.
            raw_sql(db, "INSERT INTO images (id, sha256, source, byte_size, status, loaded_at, label) "
                        f"VALUES (500, '{500:064x}', 'raw', 1, 'ok', '2026-01-01', 'b')",
                    f"INSERT INTO embeddings (image_id, model_id, vector) VALUES (500, {model}, "
                    f"{hexvec(vectors[6], db.dialect)})")
            again = http.post("/api/similar", json={"id": 7, "k": 5, "label": "b"}).json()["results"]
            assert again[0]["image_id"] == 500 and again[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
            assert http.post("/api/similar", json={"id": 7, "label": "nope"}).status_code == 404


def test_appended_rows_fold_into_the_ivf_and_dead_rows_compact_away(sqlite_url, tmp_path, monkeypatch):
    import lookalike.index as index_module
    monkeypatch.setattr(index_module, "TAIL_ROWS", 50)
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db)
        vectors = np.random.default_rng(10).normal(size=(1400, DIM)).astype(np.float32)
        add_images(db, model, vectors[:1300])
        built = open_index(db, model, "ivf")
        add_images(db, model, vectors[1300:1330], start=1301)   # searched exactly beside the IVF structure
        tail = open_index(db, model, "ivf")
        assert tail.header.ivf_rows == 1300 and tail.header.rows == 1330
        assert tail.search(vectors[1310], 1)[0].tolist() == [1311]
        assert 1311 not in tail.search(vectors[1310], 5, exclude={1311})[0]
        assert tail.search(vectors[1310], 3, allowed=[1311, 1312, 5])[0].tolist()[0] == 1311
        add_images(db, model, vectors[1330:], start=1331)   # 100 in all: more than the tail may hold
        folded = open_index(db, model, "ivf")
        assert folded.header.ivf_epoch == built.header.ivf_epoch + 1 and folded.header.ivf_rows == 1400
        assert folded.search(vectors[1350], 1)[0].tolist() == [1351]
        raw_sql(db, "DELETE FROM embeddings WHERE image_id <= 400")
        compacted = open_index(db, model, "ivf")
        assert compacted.header.epoch == built.header.epoch + 1 and compacted.header.rows == 1000
        assert compacted.kind == "ivf" and compacted.search(vectors[500], 1)[0].tolist() == [501]
        assert compacted.search(vectors[10], 50)[0].min() > 400


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_a_reader_that_may_not_write_catches_up_in_memory_as_a_writer_does_on_disk(sqlite_url, tmp_path, kind):
    # What a PL/Python backend does with an index another OS user keeps (tests/test_plpython.py runs that
    # for real): the files as they are, the changes since applied in its own memory.
    with Database(sqlite_url, tmp_path / "store") as db:
        model = add_model(db)
        vectors = np.random.default_rng(12).normal(size=(1300, DIM)).astype(np.float32)
        add_images(db, model, vectors[:1200])
        stale = open_index(db, model, kind)
        add_images(db, model, vectors[1200:], start=1201)
        raw_sql(db, "DELETE FROM embeddings WHERE image_id IN (3, 4, 1250)")
        with db.engine.connect() as conn:
            current = generation(conn, model)[0]
        in_memory = _caught_up_in_memory(db, stale, current)
        on_disk = open_index(db, model, kind)
        assert in_memory.kind == on_disk.kind == kind and len(in_memory) == len(on_disk) == 1297
        assert stale.header.generation < current == on_disk.generation   # the reader wrote nothing
        for q in (2, 700, 1210, 1260):
            for allowed in (None, list(range(1, 1300, 3))):
                expected = on_disk.search(vectors[q], 10, exclude={q + 1}, allowed=allowed)
                found = in_memory.search(vectors[q], 10, exclude={q + 1}, allowed=allowed)
                assert found[0].tolist() == expected[0].tolist() and np.allclose(found[1], expected[1])
        assert in_memory.search(vectors[1210], 1)[0].tolist() == [1211] and in_memory.vector(1250) is None
