"""The split step on SQLite and PostgreSQL: stratified, content-derived, nested re-cuts, duplicates left out."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from lookalike.db import Database, dedupe_runs, duplicate_groups, images, now, runs, splits, unique_image_ids
from lookalike.split import count_test_images, split_images, split_number
from lookalike.status import collection_status


def add_images(db: Database, per_label: dict[str | None, int], *, status: str = "ok", reverse: bool = False
               ) -> dict[str, int]:
    """Insert image rows with made-up content hashes; return sha256 -> id."""
    wanted = [(label, i) for label, n in per_label.items() for i in range(n)]
    ids = {}
    with db.begin() as conn:
        for label, i in reversed(wanted) if reverse else wanted:
            sha = hashlib.sha256(f"{label}/{i}/{status}".encode()).hexdigest()
            ids[sha] = conn.execute(sa.insert(images).values(
                sha256=sha, label=label, source=f"synthetic/{label}/{i}/{status}", byte_size=100,
                status=status, reason=None if status == "ok" else "cannot decode", loaded_at=now(),
            ).returning(images.c.id)).scalar_one()
    return ids


def add_dedupe_run(db: Database, non_keepers: list[int], keeper: int) -> None:
    """A dedupe run with one group: ``keeper`` and the given non-keepers."""
    with db.begin() as conn:
        run_id = conn.execute(sa.insert(dedupe_runs).values(
            rule="exact", hash_kind="dhash_rowcol", hash_size=8, per_label=False, include_low_detail=False,
            groups=1, duplicates=len(non_keepers), created_at=now()).returning(dedupe_runs.c.id)).scalar_one()
        conn.execute(sa.insert(duplicate_groups), [
            {"run_id": run_id, "image_id": image_id, "group_id": 1, "is_keeper": image_id == keeper, "distance": 0}
            for image_id in [keeper, *non_keepers]])


def split_by_sha(db: Database) -> dict[str, tuple[float, str, int, float]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.sha256, splits.c.random, splits.c.split, splits.c.seed,
                                      splits.c.test_ratio).join(images, images.c.id == splits.c.image_id)).all()
    return {sha: (random, split, seed, ratio) for sha, random, split, seed, ratio in rows}


def labels_by_sha(db: Database) -> dict[str, str]:
    with db.engine.connect() as conn:
        return dict(conn.execute(sa.select(images.c.sha256, images.c.label)).all())


def test_stratified_by_label_with_content_derived_numbers(db):
    add_images(db, {"dotted": 40, "striped": 20, "leopard": 8, None: 3})
    add_images(db, {"dotted": 2}, status="failed")
    summary = split_images(db, test_ratio=0.25, seed=7)

    assert summary.per_label == (("dotted", 30, 10), ("leopard", 6, 2), ("striped", 15, 5))
    assert (summary.train, summary.test, summary.unlabelled, summary.duplicates) == (51, 17, 3, 0)
    stored = split_by_sha(db)
    labels = labels_by_sha(db)
    assert len(stored) == 68  # no unlabelled, no failed images
    for label in ("dotted", "striped", "leopard"):
        members = sorted((random, split) for sha, (random, split, _, _) in stored.items() if labels[sha] == label)
        n_test = sum(split == "test" for _, split in members)
        # The test images are exactly the label's lowest numbers.
        assert [split for _, split in members] == ["test"] * n_test + ["train"] * (len(members) - n_test)
    for sha, (random, _, seed, ratio) in stored.items():
        assert 0.0 <= random < 1.0
        assert random == split_number(7, sha)
        assert (seed, ratio) == (7, 0.25)
    assert any("leopard" in line and "6" in line and "2" in line for line in summary.lines())
    assert "3 images without a label" in "\n".join(summary.lines())

    with db.engine.connect() as conn:
        run = conn.execute(sa.select(runs).where(runs.c.step == "split")).one()
    assert run.outcome == "ok"
    assert json.loads(run.counts)["test"] == 17


def test_same_split_in_any_database_and_load_order(db, tmp_path):
    per_label = {"dotted": 25, "striped": 13}
    add_images(db, per_label)
    split_images(db, test_ratio=0.3, seed=3)
    # Another database, images inserted in the opposite order: other ids, same split.
    with Database(f"sqlite:///{tmp_path}/other.db", tmp_path / "other-store") as other:
        other_ids = add_images(other, per_label, reverse=True)
        split_images(other, test_ratio=0.3, seed=3)
        assert split_by_sha(other) == split_by_sha(db)
    with db.engine.connect() as conn:
        ids = dict(conn.execute(sa.select(images.c.sha256, images.c.id)).all())
    assert ids != other_ids


def test_recut_reuses_the_numbers_and_is_nested(db):
    add_images(db, {"dotted": 30, "striped": 17, "leopard": 9})
    split_images(db, test_ratio=0.2, seed=1)
    at_20 = split_by_sha(db)
    split_images(db, test_ratio=0.25, seed=1)
    at_25 = split_by_sha(db)
    assert {sha: r[0] for sha, r in at_20.items()} == {sha: r[0] for sha, r in at_25.items()}
    test_20 = {sha for sha, r in at_20.items() if r[1] == "test"}
    test_25 = {sha for sha, r in at_25.items() if r[1] == "test"}
    assert test_20 < test_25
    assert len(test_20) == 6 + 3 + 2 and len(test_25) == 8 + 4 + 2

    # One split at a time; the same call again changes nothing; another seed draws other numbers.
    split_images(db, test_ratio=0.25, seed=1)
    assert split_by_sha(db) == at_25
    split_images(db, test_ratio=0.25, seed=2)
    at_seed_2 = split_by_sha(db)
    assert len(at_seed_2) == len(at_25)
    assert {r[2] for r in at_seed_2.values()} == {2}
    assert all(at_seed_2[sha][0] != at_25[sha][0] for sha in at_25)
    assert {sha for sha, r in at_seed_2.items() if r[1] == "test"} != test_25


def test_duplicates_of_the_latest_dedupe_run_are_left_out(db):
    ids = list(add_images(db, {"dotted": 10, "striped": 10}).values())
    add_dedupe_run(db, non_keepers=ids[1:4], keeper=ids[0])
    add_dedupe_run(db, non_keepers=ids[11:13], keeper=ids[10])  # the latest: only these two are out
    with db.engine.connect() as conn:
        assert unique_image_ids(conn) == sorted(set(ids) - set(ids[11:13]))
    summary = split_images(db)
    assert summary.duplicates == 2
    assert summary.per_label == (("dotted", 7, 3), ("striped", 6, 2))  # 2.5 rounds up
    with db.engine.connect() as conn:
        in_split = set(conn.execute(sa.select(splits.c.image_id)).scalars())
    assert in_split == set(ids) - set(ids[11:13])


def test_split_and_status_say_what_each_label_lost_to_dedupe(db):
    ids = add_images(db, {"dotted": 6, "striped": 5, "leopard": 2, None: 3})
    by_label: dict[str | None, list[int]] = {}
    for sha, image_id in ids.items():
        by_label.setdefault(labels_by_sha(db)[sha], []).append(image_id)
    add_dedupe_run(db, non_keepers=by_label["dotted"][1:], keeper=by_label["dotted"][0])  # superseded below
    # The latest run: dotted loses 2; every leopard and one unlabelled image are copies of a striped keeper.
    add_dedupe_run(db, non_keepers=by_label["dotted"][1:3] + by_label["leopard"] + by_label[None][:1],
                   keeper=by_label["striped"][0])
    summary = split_images(db, test_ratio=0.25)

    assert summary.duplicates_by_label == (("", 1), ("dotted", 2), ("leopard", 2))
    assert summary.duplicates == 5
    assert summary.per_label == (("dotted", 3, 1), ("striped", 4, 1))
    lines = summary.lines()
    assert lines[0].endswith("7 train, 2 test, 2 labels, 5 duplicates left out")
    table = [line.split() for line in lines[1:7]]
    assert table == [["label", "train", "test", "duplicates", "left", "out"],
                     ["dotted", "3", "1", "2"], ["leopard", "0", "0", "2"], ["striped", "4", "1", "0"],
                     ["(no", "label)", "0", "0", "1"], ["total", "7", "2", "5"]]
    with db.engine.connect() as conn:
        counts = json.loads(conn.execute(sa.select(runs.c.counts).where(runs.c.step == "split")).scalar_one())
        latest = conn.execute(sa.select(sa.func.max(dedupe_runs.c.id))).scalar_one()
    assert counts["duplicates"] == 5 and counts["duplicates_by_label"] == {"": 1, "dotted": 2, "leopard": 2}

    status = collection_status(db)
    assert status.duplicates == {"": 1, "dotted": 2, "leopard": 2} and status.dedupe_run == latest
    rows = {line.split()[0]: line.split()[1:] for line in status.lines() if line.split()
            and line.split()[0] in ("label", "(none)", "dotted", "leopard", "striped", "total")}
    assert rows == {"label": ["ok", "failed", "unique", "duplicates"], "(none)": ["3", "0", "2", "1"],
                    "dotted": ["6", "0", "4", "2"], "leopard": ["2", "0", "0", "2"],
                    "striped": ["5", "0", "5", "0"], "total": ["16", "0", "11", "5"]}
    assert f"duplicates: left out by dedupe run {latest}, the latest" in status.lines()

    # What a user types shows the same table.
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "--db",
                           db.url.render_as_string(hide_password=False), "status"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dotted                      6        0        4           2" in done.stdout.splitlines()


def test_status_before_any_dedupe_counts_every_ok_image_unique(db):
    add_images(db, {"dotted": 3})
    add_images(db, {"dotted": 1}, status="failed")
    status = collection_status(db)
    assert status.duplicates == {} and status.dedupe_run is None
    lines = status.lines()
    assert "dotted                      3        1        3           0" in lines
    assert "duplicates: none (no dedupe run yet)" in lines
    assert split_images(db).lines()[0].endswith("2 train, 1 test, 1 labels, 0 duplicates left out")


def test_small_labels_keep_a_train_image_and_bad_ratios_are_refused(db):
    add_images(db, {"one": 1, "two": 2, "three": 3})
    summary = split_images(db, test_ratio=0.9)
    assert summary.per_label == (("one", 1, 0), ("three", 1, 2), ("two", 1, 1))
    before = split_by_sha(db)
    for ratio in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_ratio"):
            split_images(db, test_ratio=ratio)
    assert split_by_sha(db) == before


def test_rounding_is_monotone_in_the_ratio():
    assert [count_test_images(n, 0.25) for n in (0, 1, 2, 3, 4, 6, 10)] == [0, 0, 1, 1, 1, 2, 3]
    for n in range(2, 60):
        counts = [count_test_images(n, r / 100) for r in range(1, 100)]
        assert counts == sorted(counts)
        assert 1 <= counts[0] and counts[-1] <= n - 1
