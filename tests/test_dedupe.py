"""The dedupe step on SQLite and PostgreSQL: the exact rule in SQL, the near rule, views, SQL hamming, reports."""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import re

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image, ImageFilter

from lookalike.db import (Database, dedupe_runs, duplicate_groups, ensure_views, hamming_sql, hashed_images,
                         image_dhash, image_hashes, images, now, register_sqlite_functions, runs, unique_images)
from lookalike.dedupe import dedupe_images, is_duplicate, unique_counts
from lookalike.hamming import hamming_hex
from lookalike.images import open_image, probe
from lookalike.phash import compute_hashes, is_low_detail
from lookalike.reports import duplicate_groups_report, plot_unique_counts, write_html

_sha_numbers = itertools.count()
REFERENCE_LOSSLESS = {"PNG", "BMP", "TIFF", "GIF"}


# ---- building test rows ---------------------------------------------------------------

def add_image(conn, *, label="a", width=100, height=100, byte_size=1000, fmt="JPEG", status="ok",
              sha256: str | None = None) -> int:
    sha = sha256 or hashlib.sha256(f"image {next(_sha_numbers)}".encode()).hexdigest()
    return conn.execute(sa.insert(images).values(
        sha256=sha, label=label, source=f"synthetic/{sha[:12]}", width=width, height=height, format=fmt,
        byte_size=byte_size, status=status, reason=None if status == "ok" else "cannot decode",
        loaded_at=now()).returning(images.c.id)).scalar_one()


def add_hash(conn, image_id: int, kind: str, size: int, value: int, bits: int, *, hex_text: str | None = None,
             low_detail: bool | None = None) -> None:
    conn.execute(sa.insert(image_hashes).values(
        image_id=image_id, kind=kind, size=size, hex=hex_text or f"{value:0{-(-bits // 4)}x}",
        value=(value - (1 << 64) if value >= 1 << 63 else value) if bits <= 64 else None,
        bits=bits, hasher="test"))
    if low_detail is not None:
        conn.execute(sa.insert(hashed_images).values(image_id=image_id, low_detail=low_detail, hasher="test",
                                                     hashed_at=now()))


def stored_groups(db: Database, run_id: int) -> dict[int, tuple[int, bool, int]]:
    """image id -> (group id, is keeper, distance) for one run."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(duplicate_groups.c.image_id, duplicate_groups.c.group_id,
                                      duplicate_groups.c.is_keeper, duplicate_groups.c.distance)
                            .where(duplicate_groups.c.run_id == run_id)).all()
    return {image_id: (group_id, bool(keeper), distance) for image_id, group_id, keeper, distance in rows}


def reference_groups(members: list[list[dict]], distance) -> dict[int, tuple[int, bool, int]]:
    """Expected rows for groups given as lists of image dicts: keeper by the documented order."""
    out = {}
    for group in members:
        if len(group) < 2:
            continue
        keeper = min(group, key=lambda m: (-m["width"], -m["height"], -m["byte_size"],
                                           m["format"] not in REFERENCE_LOSSLESS, m["id"]))
        for m in group:
            out[m["id"]] = (keeper["id"], m["id"] == keeper["id"], distance(m, keeper))
    return out


def keeper_first_groups(items: list[dict], linked) -> list[list[dict]]:
    """Brute force of the no-chaining rule: in keeper order, each item joins the first keeper it is linked
    to, or becomes a keeper."""
    order = sorted(items, key=lambda m: (-m["width"], -m["height"], -m["byte_size"],
                                         m["format"] not in REFERENCE_LOSSLESS, m["id"]))
    groups: list[list[dict]] = []
    for item in order:
        group = next((g for g in groups if linked(g[0], item)), None)
        if group is None:
            groups.append([item])
        else:
            group.append(item)
    return groups


def random_collection(db: Database, rng: random.Random, n: int, hash_pool: list[int], *, kind="dhash_rowcol",
                      size=3, bits=18) -> list[dict]:
    """Images with many ties on size (and byte size), mixed formats and labels, hashes from a small pool."""
    items = []
    with db.begin() as conn:
        for _ in range(n):
            item = {"label": rng.choice(["a", "b", None]), "width": rng.choice([100, 200]),
                    "height": rng.choice([50, 80]), "byte_size": rng.choice([1000, 2000]),
                    "format": rng.choice(["JPEG", "PNG", "WEBP", "GIF"]), "hash": rng.choice(hash_pool)}
            item["id"] = add_image(conn, label=item["label"], width=item["width"], height=item["height"],
                                   byte_size=item["byte_size"], fmt=item["format"])
            add_hash(conn, item["id"], kind, size, item["hash"], bits, low_detail=False)
            items.append(item)
        # Failed images and images of another size never take part.
        failed = add_image(conn, status="failed")
        add_hash(conn, failed, kind, size, hash_pool[0], bits)
        other = add_image(conn)
        add_hash(conn, other, kind, size + 1, hash_pool[0], bits)
    return items


# ---- the exact rule ---------------------------------------------------------------------

@pytest.mark.parametrize("per_label", [False, True])
def test_exact_rule_in_sql_matches_a_python_reference(db, per_label):
    rng = random.Random(11)
    items = random_collection(db, rng, 80, [rng.getrandbits(18) for _ in range(12)])
    summary = dedupe_images(db, rule="exact", hash_kind="dhash_rowcol", size=3, per_label=per_label)

    key = (lambda m: (m["hash"], m["label"])) if per_label else (lambda m: m["hash"])
    partitions: dict = {}
    for item in items:
        partitions.setdefault(key(item), []).append(item)
    expected = reference_groups(list(partitions.values()), lambda m, keeper: 0)
    assert stored_groups(db, summary.run_id) == expected
    assert summary.groups == len({group for group, _, _ in expected.values()})
    assert summary.duplicates == sum(not keeper for _, keeper, _ in expected.values())
    assert summary.images == 80
    with db.engine.connect() as conn:
        run = conn.execute(sa.select(dedupe_runs).where(dedupe_runs.c.id == summary.run_id)).mappings().one()
        logged = conn.execute(sa.select(runs.c.outcome).where(runs.c.step == "dedupe")).scalars().all()
    assert (run["rule"], run["hash_kind"], run["hash_size"], run["per_label"], run["max_distance"]) == \
        ("exact", "dhash_rowcol", 3, per_label, None)
    assert (run["groups"], run["duplicates"]) == (summary.groups, summary.duplicates)
    assert logged == ["ok"]


def test_keeper_order_breaks_each_tie_in_turn(db):
    with db.begin() as conn:
        ids = {name: add_image(conn, width=w, height=h, byte_size=b, fmt=f) for name, (w, h, b, f) in {
            "narrow": (90, 500, 9000, "PNG"), "short": (100, 80, 9000, "PNG"), "small_file": (100, 90, 800, "PNG"),
            "lossy": (100, 90, 900, "JPEG"), "lossless_first": (100, 90, 900, "PNG"),
            "lossless_second": (100, 90, 900, "GIF")}.items()}
        for image_id in ids.values():
            add_hash(conn, image_id, "dhash_rowcol", 3, 0x1F0F0, 18)
    summary = dedupe_images(db, rule="exact")
    groups = stored_groups(db, summary.run_id)
    keeper = ids["lossless_first"]  # the lower id of the two lossless ties
    assert {image_id for image_id, (_, is_keeper, _) in groups.items() if is_keeper} == {keeper}
    assert {group for group, _, _ in groups.values()} == {keeper}


# ---- the near rule ----------------------------------------------------------------------

def flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def near_case(db: Database, hashes: list[int], *, kind="phash", size=8, bits=64, sizes=None, labels=None
              ) -> list[dict]:
    items = []
    with db.begin() as conn:
        for k, value in enumerate(hashes):
            width = sizes[k] if sizes else 100
            label = labels[k] if labels else "a"
            image_id = add_image(conn, label=label, width=width)
            add_hash(conn, image_id, kind, size, value, bits, low_detail=False)
            items.append({"id": image_id, "hash": value, "label": label, "width": width, "height": 100,
                          "byte_size": 1000, "format": "JPEG"})
    return items


def test_near_rule_never_chains(db):
    a = 0x0123_4567_89AB_CDEF
    b = flip(a, [0, 1, 2, 3, 4, 5])            # a–b: 6
    c = flip(b, [10, 11, 12, 13, 14, 15])      # b–c: 6, a–c: 12, over the radius
    far = a ^ 0xFFFF_FFFF_0000_0000
    items = near_case(db, [a, b, c, far], sizes=[100, 100, 300, 100])
    summary = dedupe_images(db, rule="near", hash_kind="phash", size=8, max_distance=8)
    keeper = items[2]["id"]  # widest: c keeps b, and a (12 bits from c) stays on its own
    assert stored_groups(db, summary.run_id) == {items[1]["id"]: (keeper, False, 6), items[2]["id"]: (keeper, True, 0)}
    assert (summary.groups, summary.duplicates, summary.max_distance) == (1, 1, 8)


def test_near_rule_radius_zero_is_the_exact_rule(db):
    rng = random.Random(5)
    items = random_collection(db, rng, 40, [rng.getrandbits(64) for _ in range(6)], kind="phash", size=8, bits=64)
    near = dedupe_images(db, rule="near", hash_kind="phash", size=8, max_distance=0)
    near_groups = stored_groups(db, near.run_id)
    exact = dedupe_images(db, rule="exact", hash_kind="phash", size=8)
    assert near_groups == stored_groups(db, exact.run_id)
    assert len(items) == near.images and near_groups


def test_near_rule_all_equal_is_one_group(db):
    items = near_case(db, [0xFFFF_0000_FFFF_0000] * 5, sizes=[100, 120, 120, 90, 100])
    summary = dedupe_images(db, rule="near", hash_kind="phash", size=8, max_distance=3)
    keeper = items[1]["id"]  # widest, then the lower id
    assert stored_groups(db, summary.run_id) == {m["id"]: (keeper, m["id"] == keeper, 0) for m in items}


@pytest.mark.parametrize("kind,size,bits", [("phash", 8, 64), ("dhash_rowcol", 8, 128), ("dhash_rowcol", 4, 32)])
def test_near_rule_matches_a_brute_force_keeper_first_reference(db, kind, size, bits):
    rng = random.Random(bits)
    centres = [rng.getrandbits(bits) for _ in range(8)]
    hashes = [flip(rng.choice(centres), rng.sample(range(bits), rng.randint(0, 5))) for _ in range(70)]
    labels = [rng.choice(["a", "b"]) for _ in hashes]
    items = near_case(db, hashes, kind=kind, size=size, bits=bits, labels=labels,
                      sizes=[rng.choice([100, 200]) for _ in hashes])
    distance = lambda m, keeper: bin(m["hash"] ^ keeper["hash"]).count("1")  # noqa: E731
    for per_label in (False, True):
        summary = dedupe_images(db, rule="near", hash_kind=kind, size=size, max_distance=4, per_label=per_label)
        linked = lambda x, y: distance(x, y) <= 4 and (not per_label or x["label"] == y["label"])  # noqa: E731
        expected = reference_groups(keeper_first_groups(items, linked), distance)
        assert stored_groups(db, summary.run_id) == expected
        assert expected


def test_dhash_rowcol_size_7_is_refused_by_the_near_rule(db):
    with db.begin() as conn:
        for text in ("1" + "0" * 24, "0" * 24):
            add_hash(conn, add_image(conn), "dhash_rowcol", 7, 0, 98, hex_text=text)
    with pytest.raises(ValueError, match="not fixed width"):
        dedupe_images(db, rule="near", hash_kind="dhash_rowcol", size=7, max_distance=2)


def test_rule_parameters_and_the_default_radius(db):
    with db.begin() as conn:
        for value in (0, 0b11111, 0b1111111 << 40):
            add_hash(conn, add_image(conn), "phash", 8, value, 64)
    scaled = dedupe_images(db, rule="near", hash_kind="phash", size=8)
    assert scaled.max_distance == 5 and scaled.duplicates == 1  # 10 of 128 bits scaled to 64: 5 links, 7 does not
    with pytest.raises(ValueError, match="takes no maximum distance"):
        dedupe_images(db, rule="exact", max_distance=3)
    with pytest.raises(ValueError, match="unknown dedupe rule"):
        dedupe_images(db, rule="fuzzy")
    with pytest.raises(ValueError, match="unknown hash kind"):
        dedupe_images(db, rule="near", hash_kind="md5")
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(dedupe_runs.c.max_distance)).scalars().all() == [5]


# ---- low detail, runs, views --------------------------------------------------------------

def test_low_detail_images_are_left_out_unless_asked(db):
    with db.begin() as conn:
        flat = [add_image(conn, width=w) for w in (10, 20, 30)]
        for image_id in flat:
            add_hash(conn, image_id, "dhash_rowcol", 3, 0, 18, hex_text="0000", low_detail=True)
        pair = [add_image(conn, width=w) for w in (50, 60)]
        for image_id in pair:
            add_hash(conn, image_id, "dhash_rowcol", 3, 0x3_0303, 18, low_detail=False)
        ok_count = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one()

    summary = dedupe_images(db, rule="exact")
    assert set(stored_groups(db, summary.run_id)) == set(pair)
    assert (summary.low_detail_left_out, summary.images, summary.duplicates) == (3, 2, 1)
    assert any("3 low-detail" in line for line in summary.lines())

    with_flat = dedupe_images(db, rule="exact", include_low_detail=True)
    assert set(stored_groups(db, with_flat.run_id)) == set(pair + flat)
    assert (with_flat.low_detail_left_out, with_flat.duplicates) == (0, 3)
    near = dedupe_images(db, rule="near", hash_kind="dhash_rowcol", size=3, max_distance=1)
    assert set(stored_groups(db, near.run_id)) == set(pair) and near.low_detail_left_out == 3
    with db.engine.connect() as conn:  # nothing is ever deleted
        assert conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one() == ok_count


def test_unique_images_view_follows_the_latest_run(db):
    rng = random.Random(3)
    items = random_collection(db, rng, 30, [rng.getrandbits(18) for _ in range(5)])
    with db.begin() as conn:
        add_image(conn, status="failed")
        unhashed = add_image(conn)
    assert dedupe_images(db, rule="exact").not_hashed == 2  # the one of another size, and `unhashed`

    def view_ids():
        with db.engine.connect() as conn:
            return set(conn.execute(sa.select(unique_images.c.id)).scalars())

    def expected_ids():
        with db.engine.connect() as conn:
            ok = set(conn.execute(sa.select(images.c.id).where(images.c.status == "ok")).scalars())
            latest = conn.execute(sa.select(sa.func.max(dedupe_runs.c.id))).scalar_one()
            dropped = set(conn.execute(sa.select(duplicate_groups.c.image_id).where(
                duplicate_groups.c.run_id == latest, duplicate_groups.c.is_keeper.is_(False))).scalars())
        return ok - dropped, dropped

    unique, dropped = expected_ids()
    assert view_ids() == unique and dropped and unhashed in unique
    assert len(unique) == 32 - len(dropped)
    per_label = dedupe_images(db, rule="exact", per_label=True)
    unique_per_label, dropped_per_label = expected_ids()
    assert view_ids() == unique_per_label and len(dropped_per_label) < len(dropped)
    assert len(dropped_per_label) == per_label.duplicates
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(images)).scalar_one() == len(items) + 4


def test_rerunning_the_latest_parameters_redoes_that_run(db):
    rng = random.Random(8)
    random_collection(db, rng, 20, [rng.getrandbits(18) for _ in range(4)])
    first = dedupe_images(db, rule="exact")
    again = dedupe_images(db, rule="exact")
    assert (again.run_id, again.replaced, first.replaced) == (first.run_id, True, False)
    assert stored_groups(db, again.run_id) == stored_groups(db, first.run_id)
    other = dedupe_images(db, rule="exact", per_label=True)
    back = dedupe_images(db, rule="exact")
    assert other.run_id > first.run_id and back.run_id > other.run_id and not back.replaced
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(dedupe_runs)).scalar_one() == 3
        assert conn.execute(sa.select(sa.func.count()).select_from(duplicate_groups).where(
            duplicate_groups.c.run_id == first.run_id)).scalar_one() == first.groups + first.duplicates


def test_image_dhash_view_has_one_column_per_size(db):
    with db.begin() as conn:
        image_id = add_image(conn, label="leopard", width=64, height=48)
        for size in range(1, 9):
            add_hash(conn, image_id, "dhash_rowcol", size, (1 << (2 * size * size)) - 1, 2 * size * size,
                     hex_text=f"hex{size}")
        add_hash(conn, image_id, "phash", 8, 5, 64)
        ensure_views(conn, db.dialect)
        ensure_views(conn, db.dialect)  # idempotent
    with db.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM image_dhash")).mappings().one()
        # The lab's classic query runs as written.
        ranked = conn.execute(sa.text(
            "SELECT image_id, ROW_NUMBER() OVER (PARTITION BY dhash_hex_3 ORDER BY width DESC, height DESC) rn "
            "FROM image_dhash")).all()
    assert list(row) == ["image_id", "label", "width", "height"] + [f"dhash_hex_{s}" for s in range(1, 9)]
    assert [c.name for c in image_dhash.columns] == list(row)
    assert dict(row) == {"image_id": image_id, "label": "leopard", "width": 64, "height": 48,
                         **{f"dhash_hex_{s}": f"hex{s}" for s in range(1, 9)}}
    assert ranked == [(image_id, 1)]


def test_sql_hamming_equals_python(db):
    rng = random.Random(1)
    pairs = [(f"{rng.getrandbits(64):016x}", f"{rng.getrandbits(64):016x}") for _ in range(20)]
    pairs += [(f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(128):032x}") for _ in range(20)]
    pairs += [("ffffffffffffffff", "0000000000000000"), ("0f", "f0"), ("ABCDEF", "abcdef")]
    with db.begin() as conn:
        ensure_views(conn, db.dialect)
        if db.dialect == "sqlite":
            register_sqlite_functions(conn.connection.dbapi_connection)
        found = [conn.execute(sa.text("SELECT hamming(:a, :b)"), {"a": a, "b": b}).scalar_one() for a, b in pairs]
        uneven = conn.execute(sa.text("SELECT hamming('1', '1ff')")).scalar_one()
        null = conn.execute(sa.text("SELECT hamming(NULL, 'ff')")).scalar_one()
    assert found == [hamming_hex(a, b) for a, b in pairs]
    assert found[40] == 64 and found[42] == 0
    assert (uneven, null) == (hamming_sql("1", "1ff"), None) == (8, None)


# ---- counts, reports, new images -----------------------------------------------------------

def test_unique_counts_per_label_agree_with_the_exact_rule(db, tmp_path):
    rng = random.Random(21)
    with db.begin() as conn:
        for k in range(40):
            image_id = add_image(conn, label=rng.choice(["dotted", "striped", None]))
            flat = k % 13 == 0
            for size in (2, 3, 4):
                value = 0 if flat else rng.getrandbits(size + 1)  # few bits: many collisions
                add_hash(conn, image_id, "dhash_rowcol", size, value, 2 * size * size,
                         low_detail=flat if size == 2 else None)
    table = unique_counts(db, sizes=[4, 3, 2])
    for size in (4, 3, 2):
        run = dedupe_images(db, rule="exact", size=size, per_label=True)
        with db.engine.connect() as conn:
            per_label = dict(conn.execute(
                sa.select(unique_images.c.label, sa.func.count()).group_by(unique_images.c.label)).all())
        assert {label: table.unique[label][size] for label in table.labels} == per_label
        assert table.total(size) == 40 - run.duplicates
    assert sum(table.images.values()) == 40 and table.sizes == (4, 3, 2)
    assert table.lines()[-1].split()[0] == "total"
    every = unique_counts(db, sizes=[2], include_low_detail=True)
    assert every.total(2) < table.total(2)  # the flat images collapse onto one hash

    png = plot_unique_counts(table, tmp_path / "plots" / "unique.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = probe(png)
    assert info.format == "PNG" and info.width > 300 and info.height > 200


def textured(seed: int, size=(96, 72)) -> Image.Image:
    """A picture with structure at every scale: smoothed random blocks."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def store_image(db: Database, data: bytes, label: str) -> int:
    """Store real bytes with their hashes, as the load and hash steps would."""
    sha = db.store.put(data)
    img = open_image(data)
    info = probe(data)
    with db.begin() as conn:
        image_id = add_image(conn, label=label, width=info.width, height=info.height, byte_size=len(data),
                             fmt=info.format, sha256=sha)
        for h in compute_hashes(img):
            conn.execute(sa.insert(image_hashes).values(image_id=image_id, kind=h.kind, size=h.size, hex=h.hex,
                                                        value=h.to_signed64(), bits=h.bits, hasher="test"))
        conn.execute(sa.insert(hashed_images).values(image_id=image_id, low_detail=is_low_detail(img),
                                                     hasher="test", hashed_at=now()))
    return image_id


@pytest.fixture
def photo_collection(db):
    """Three pictures, a smaller re-compressed copy of two of them, and a flat grey image."""
    originals = [textured(seed) for seed in range(3)]
    ids = {f"original{k}": store_image(db, encode(img, "PNG"), "dotted" if k else "striped")
           for k, img in enumerate(originals)}
    for k in (0, 1):
        copy = originals[k].resize((80, 60), Image.Resampling.LANCZOS)
        ids[f"copy{k}"] = store_image(db, encode(copy, "JPEG", quality=70), "dotted" if k else "striped")
    ids["flat"] = store_image(db, encode(Image.new("RGB", (50, 50), (128, 128, 128)), "PNG"), "dotted")
    return db, ids, originals


def test_html_report_shows_each_group_with_its_keeper(photo_collection, tmp_path):
    db, ids, _ = photo_collection
    summary = dedupe_images(db, rule="near")
    assert (summary.hash_kind, summary.size, summary.max_distance, summary.low_detail_left_out) == \
        ("dhash_rowcol", 8, 10, 1)
    groups = duplicate_groups_report(db)
    assert [(g.keeper.image_id, [m.image_id for m in g.duplicates]) for g in groups] == [
        (ids["original0"], [ids["copy0"]]), (ids["original1"], [ids["copy1"]])]
    assert (groups[0].keeper.width, groups[0].duplicates[0].width, groups[0].keeper.format) == (96, 80, "PNG")
    assert all(g.run_id == summary.run_id and g.duplicates[0].distance <= 10 for g in groups)

    page = write_html(groups, tmp_path / "report" / "groups.html", db).read_text(encoding="utf-8")
    assert len(re.findall(r'<section class="group"', page)) == 2
    keepers = re.findall(r'<figure class="keeper" data-image-id="(\d+)">', page)
    assert keepers == [str(ids["original0"]), str(ids["original1"])]
    assert page.count('<span class="badge">keeper</span>') == 2
    thumbnails = re.findall(r'<img src="(groups_thumbnails/[0-9a-f]{64}\.jpg)"', page)   # linked, not inlined
    assert len(thumbnails) == 4
    thumb = Image.open(tmp_path / "report" / thumbnails[0])
    assert thumb.format == "JPEG" and thumb.size == (96, 72)  # already within the thumbnail size
    assert "96×72" in page and "80×60" in page and f"distance {groups[0].duplicates[0].distance}" in page
    assert duplicate_groups_report(db, run_id=summary.run_id + 100) == []


def test_is_duplicate_by_hash_finds_the_stored_original(photo_collection):
    db, ids, originals = photo_collection
    recompressed = encode(originals[2].resize((90, 68), Image.Resampling.LANCZOS), "JPEG", quality=60)
    matches = is_duplicate(db, recompressed, rule="near")  # the near rule's default hash and radius
    assert [m.image_id for m in matches] == [ids["original2"]]
    assert matches[0].label == "dotted" and 0 <= matches[0].distance <= 10

    same = is_duplicate(db, encode(originals[0], "PNG"), rule="near", hash_kind="phash", size=8, max_distance=6)
    assert [(m.image_id, m.distance) for m in same][0] == (ids["original0"], 0)
    assert ids["copy0"] in [m.image_id for m in same]
    assert is_duplicate(db, encode(textured(99), "PNG"), rule="near") == []
    flat = encode(Image.new("RGB", (40, 40), (128, 128, 128)), "PNG")
    assert is_duplicate(db, flat, rule="near") == []
    assert [m.image_id for m in is_duplicate(db, flat, rule="near", hash_kind="dhash_rowcol", size=8,
                                             max_distance=0, include_low_detail=True)] == [ids["flat"]]
