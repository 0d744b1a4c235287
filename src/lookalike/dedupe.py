"""Dedupe step: group images whose perceptual hashes match, and pick one keeper per group.

Two rules, one keeper order:

- ``exact`` (the classic dHash lab rule): images with equal hash hex are one
  group. It runs entirely in the database, as one ``INSERT … SELECT`` over
  ``ROW_NUMBER() OVER (PARTITION BY hex ORDER BY …)``, on SQLite and PostgreSQL.
- ``near``: images whose hashes are within ``max_distance`` bits (Hamming) are
  linked, every pair found exactly, and the links are closed transitively
  (connected components), so a chain a–b–c is one group even when a and c are
  further apart.

The keeper of a group is the widest image, then the tallest, then the largest
file, then a lossless format, then the lowest id (:func:`keeper_key`); every
other member is a duplicate. ``distance`` is each member's Hamming distance to
its keeper. Low-detail (flat) images have arbitrary, often all-zero hashes that
collide, so they are kept out of groups unless asked for.

Nothing is deleted. Each run writes a ``dedupe_runs`` row and its
``duplicate_groups``; the latest run is the current one, and re-running the
latest run's parameters replaces that run's groups in place. The
``unique_images`` view (ok images that are not duplicates in the latest run) is
what later steps read; :func:`ensure_views` creates it, the ``image_dhash``
view, and on PostgreSQL the ``hamming(text, text)`` SQL function, whenever a
``Database`` is opened (on SQLite the function is registered per connection by
:func:`register_sqlite_functions`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .db import (PG_SCHEMA, Database, dedupe_runs, duplicate_groups, hashed_images, image_hashes, images, now,
                 recorded_run)
from .hashing import KINDS, compute_hashes, is_low_detail
from .images import LOSSLESS_FORMATS, open_image
from .neardup import connected_groups, pairs_within

RULES = ("exact", "near")
# Defaults per rule. The exact rule is the lab's dHash at size 3. The near rule
# uses the same dhash row+col hash at size 8 (128 bits) within 10 bits: on the
# sample set's planted copies (bench/bench_dedupe_quality.py) it had the best
# F1 of every hash and radius tried, with precision 0.83-0.95 where pHash and
# imagehash's dHash reached 0.74-0.89 at their best radius (4 of 64 bits).
EXACT_DEFAULT_HASH = ("dhash_rowcol", 3)
NEAR_DEFAULT_HASH = ("dhash_rowcol", 8)
DEFAULT_MAX_DISTANCE = 10   # bits, for NEAR_DEFAULT_HASH; other hashes get the same share of their bits


def hash_bits(kind: str, size: int) -> int:
    """Bits in a hash of this kind and size (row and column halves for ``dhash_rowcol``)."""
    return 2 * size * size if kind == "dhash_rowcol" else size * size


def default_max_distance(kind: str, size: int) -> int:
    """The near rule's radius for a hash: :data:`DEFAULT_MAX_DISTANCE` scaled to its width.

    The same share of the bits (10 of 128) gives 5 for a 64-bit pHash, whose
    hashes have 32 bits set (a median split), so distances are even and 5 acts
    as 4: its best radius on the bench too.
    """
    return round(DEFAULT_MAX_DISTANCE * hash_bits(kind, size) / hash_bits(*NEAR_DEFAULT_HASH))


# ---- views (not tables: create_all never sees this metadata) ---------------------

_views = sa.MetaData()
unique_images = sa.Table(
    "unique_images", _views,
    *(sa.Column(c.name, c.type) for c in images.columns if c.name not in ("status", "reason")),
)
image_dhash = sa.Table(
    "image_dhash", _views,
    sa.Column("image_id", sa.Integer), sa.Column("label", sa.Text),
    sa.Column("width", sa.Integer), sa.Column("height", sa.Integer),
    *(sa.Column(f"dhash_hex_{size}", sa.String(128)) for size in range(1, 9)),
)

_UNIQUE_IMAGES_SQL = f"""
SELECT {", ".join(f"i.{c.name}" for c in unique_images.columns)}
FROM images i
WHERE i.status = 'ok'
  AND NOT EXISTS (SELECT 1 FROM duplicate_groups dg
                  WHERE dg.image_id = i.id AND NOT dg.is_keeper
                    AND dg.run_id = (SELECT MAX(id) FROM dedupe_runs))
"""
_IMAGE_DHASH_SQL = f"""
SELECT i.id AS image_id, i.label, i.width, i.height,
       {", ".join(f"MAX(CASE WHEN h.size = {s} THEN h.hex END) AS dhash_hex_{s}" for s in range(1, 9))}
FROM images i JOIN image_hashes h ON h.image_id = i.id AND h.kind = 'dhash_rowcol'
WHERE i.status = 'ok'
GROUP BY i.id, i.label, i.width, i.height
"""
VIEWS = {"unique_images": _UNIQUE_IMAGES_SQL, "image_dhash": _IMAGE_DHASH_SQL}

# popcount(int(a, 16) XOR int(b, 16)): the shorter hex is left-padded with zeros,
# so hashes of one kind and size compare bit for bit, and the function never raises.
_PG_HAMMING_SQL = f"""
CREATE FUNCTION {PG_SCHEMA}.hamming(a text, b text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT bit_count(('x' || lpad(a, greatest(length(a), length(b)), '0'))::varbit
                 # ('x' || lpad(b, greatest(length(a), length(b)), '0'))::varbit)::integer
$$"""


def hamming_sql(a: str | None, b: str | None) -> int | None:
    """The SQL ``hamming(hex_a, hex_b)`` function: bits that differ between two hex hashes (NULL in, NULL out)."""
    if a is None or b is None:
        return None
    return (int(a or "0", 16) ^ int(b or "0", 16)).bit_count()


def register_sqlite_functions(dbapi_conn) -> None:
    """Register ``hamming(hex_a, hex_b)`` on a sqlite3 connection (SQLite has no XOR or popcount)."""
    dbapi_conn.create_function("hamming", 2, hamming_sql, deterministic=True)


def ensure_views(conn: Connection, dialect: str) -> None:
    """Create the ``unique_images`` and ``image_dhash`` views (and PostgreSQL's ``hamming``) if missing.

    Existing objects are left as they are, so this is cheap to call on every
    open; a change to a definition belongs in a schema migration that drops it.
    """
    if dialect == "sqlite":
        for name, body in VIEWS.items():
            conn.exec_driver_sql(f"CREATE VIEW IF NOT EXISTS {name} AS {body}")
        return
    for name, body in VIEWS.items():
        if conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": f"{PG_SCHEMA}.{name}"}).scalar() is None:
            conn.exec_driver_sql(f"CREATE VIEW {PG_SCHEMA}.{name} AS {body}")
    if conn.execute(sa.text("SELECT to_regprocedure(:sig)"),
                    {"sig": f"{PG_SCHEMA}.hamming(text,text)"}).scalar() is None:
        conn.exec_driver_sql(_PG_HAMMING_SQL)


# ---- the keeper order ---------------------------------------------------------------

def keeper_key(width: int | None, height: int | None, byte_size: int, fmt: str | None, image_id: int) -> tuple:
    """Sort key whose smallest value is the keeper: widest, tallest, largest file, lossless, lowest id."""
    return (-(width or 0), -(height or 0), -byte_size, 0 if fmt in LOSSLESS_FORMATS else 1, image_id)


def _keeper_order() -> list[sa.ColumnElement]:
    """:func:`keeper_key` as an SQL ORDER BY (NULL sizes count as 0, as in the key)."""
    return [sa.func.coalesce(images.c.width, 0).desc(), sa.func.coalesce(images.c.height, 0).desc(),
            images.c.byte_size.desc(),
            sa.case((images.c.format.in_(sorted(LOSSLESS_FORMATS)), 0), else_=1), images.c.id]


# ---- the step -----------------------------------------------------------------------

@dataclass
class DedupeSummary:
    run_id: int
    rule: str
    hash_kind: str
    size: int
    max_distance: int | None
    per_label: bool
    include_low_detail: bool
    images: int = 0              # images considered (ok, hashed, and not left out as low-detail)
    groups: int = 0
    duplicates: int = 0          # group members that are not keepers
    low_detail_left_out: int = 0
    not_hashed: int = 0          # ok images without this hash yet
    replaced: bool = False       # the latest run had these parameters and was redone in place
    group_sizes: Counter = field(default_factory=Counter)  # members -> groups

    def lines(self) -> list[str]:
        rule = (f"near rule, within {self.max_distance} bits" if self.rule == "near" else "exact rule")
        scope = "within each label" if self.per_label else "across labels"
        out = [f"dedupe run {self.run_id}{' (redone)' if self.replaced else ''}: {rule}, "
               f"{self.hash_kind} size {self.size}, {scope}",
               f"  {self.images} images, {self.groups} groups, {self.duplicates} duplicates marked, "
               f"{self.images - self.duplicates} unique"]
        if self.group_sizes:
            out.append("  group sizes: " + ", ".join(f"{n} x {size}" for size, n in sorted(self.group_sizes.items())))
        if self.low_detail_left_out:
            out.append(f"  left out: {self.low_detail_left_out} low-detail (flat) images, whose hashes collide")
        if self.not_hashed:
            out.append(f"  not hashed yet: {self.not_hashed} ok images have no {self.hash_kind} size {self.size} "
                       f"hash (run the hash step)")
        return out


def dedupe_images(db: Database, *, rule: str = "exact", hash_kind: str | None = None, size: int | None = None,
                  max_distance: int | None = None, per_label: bool = False,
                  include_low_detail: bool = False) -> DedupeSummary:
    """Group duplicate images by their stored hashes and record a dedupe run; return its summary.

    ``hash_kind``/``size`` default per rule (:data:`EXACT_DEFAULT_HASH`,
    :data:`NEAR_DEFAULT_HASH`); ``max_distance`` is for the near rule only and
    defaults to :func:`default_max_distance` of the hash (:data:`DEFAULT_MAX_DISTANCE`
    for the default hash). ``per_label`` groups only images with the same label.
    """
    if rule not in RULES:
        raise ValueError(f"unknown dedupe rule {rule!r}; use one of {RULES}")
    default_kind, default_size = EXACT_DEFAULT_HASH if rule == "exact" else NEAR_DEFAULT_HASH
    hash_kind = hash_kind or default_kind
    size = (default_size if hash_kind == default_kind else 8) if size is None else int(size)
    if hash_kind not in KINDS:
        raise ValueError(f"unknown hash kind {hash_kind!r}; use one of {KINDS}")
    if rule == "exact":
        if max_distance not in (None, 0):
            raise ValueError("the exact rule takes no max_distance; use rule='near'")
        max_distance = None
    else:
        max_distance = default_max_distance(hash_kind, size) if max_distance is None else int(max_distance)
        if max_distance < 0:
            raise ValueError("max_distance must be >= 0")
    params = dict(rule=rule, hash_kind=hash_kind, hash_size=size, max_distance=max_distance,
                  per_label=bool(per_label), include_low_detail=bool(include_low_detail))

    with recorded_run(db, "dedupe", params) as counts:
        with db.begin() as conn:
            run_id, replaced = _start_run(conn, params)
            summary = DedupeSummary(run_id, rule, hash_kind, size, max_distance, bool(per_label),
                                    bool(include_low_detail), replaced=replaced)
            _count_inputs(conn, summary)
            if rule == "exact":
                _group_exact(conn, summary)
            else:
                _group_near(conn, summary)
            rows = conn.execute(
                sa.select(duplicate_groups.c.group_id, sa.func.count())
                .where(duplicate_groups.c.run_id == run_id).group_by(duplicate_groups.c.group_id)).all()
            summary.groups = len(rows)
            summary.duplicates = sum(n - 1 for _, n in rows)
            summary.group_sizes = Counter(n for _, n in rows)
            conn.execute(sa.update(dedupe_runs).where(dedupe_runs.c.id == run_id).values(
                groups=summary.groups, duplicates=summary.duplicates, created_at=now()))
        counts.update(run_id=run_id, images=summary.images, groups=summary.groups,
                      duplicates=summary.duplicates, low_detail_left_out=summary.low_detail_left_out,
                      not_hashed=summary.not_hashed, replaced=replaced)
    return summary


def _start_run(conn: Connection, params: dict) -> tuple[int, bool]:
    """Reuse the latest run when it had these parameters (its groups are replaced), else add a run."""
    latest = conn.execute(sa.select(dedupe_runs).order_by(dedupe_runs.c.id.desc()).limit(1)).mappings().first()
    if latest is not None and all(latest[key] == value for key, value in params.items()):
        conn.execute(sa.delete(duplicate_groups).where(duplicate_groups.c.run_id == latest["id"]))
        return latest["id"], True
    run_id = conn.execute(sa.insert(dedupe_runs).values(**params, groups=0, duplicates=0, created_at=now())
                          .returning(dedupe_runs.c.id)).scalar_one()
    return run_id, False


def _is_low_detail() -> sa.ColumnElement[bool]:
    """True for images the hash step flagged as flat (an image without a flag is not)."""
    return sa.exists().where(hashed_images.c.image_id == images.c.id, hashed_images.c.low_detail.is_(True))


def _hashed(kind: str, size: int):
    """ok images joined to their hash of this kind and size."""
    return images.join(image_hashes, sa.and_(image_hashes.c.image_id == images.c.id,
                                             image_hashes.c.kind == kind, image_hashes.c.size == size))


def _candidates_where(summary: DedupeSummary) -> list[sa.ColumnElement[bool]]:
    where = [images.c.status == "ok"]
    if not summary.include_low_detail:
        where.append(~_is_low_detail())
    return where


def _count_inputs(conn: Connection, summary: DedupeSummary) -> None:
    hashed = _hashed(summary.hash_kind, summary.size)
    flat, total = conn.execute(
        sa.select(sa.func.count().filter(_is_low_detail()), sa.func.count())
        .select_from(hashed).where(images.c.status == "ok")).one()
    summary.low_detail_left_out = 0 if summary.include_low_detail else flat
    summary.images = total - summary.low_detail_left_out
    ok = conn.execute(sa.select(sa.func.count()).select_from(images).where(images.c.status == "ok")).scalar_one()
    summary.not_hashed = ok - total


def _group_exact(conn: Connection, summary: DedupeSummary) -> None:
    """Equal hex → one group; ranked and written by the database in one INSERT … SELECT."""
    partition = [image_hashes.c.hex] + ([images.c.label] if summary.per_label else [])
    order = _keeper_order()
    ranked = (
        sa.select(images.c.id.label("image_id"),
                  sa.func.row_number().over(partition_by=partition, order_by=order).label("position"),
                  sa.func.first_value(images.c.id).over(partition_by=partition, order_by=order).label("keeper_id"),
                  sa.func.count().over(partition_by=partition).label("members"))
        .select_from(_hashed(summary.hash_kind, summary.size))
        .where(*_candidates_where(summary))
    ).subquery("ranked")
    conn.execute(sa.insert(duplicate_groups).from_select(
        ["run_id", "image_id", "group_id", "is_keeper", "distance"],
        sa.select(sa.literal(summary.run_id, sa.Integer), ranked.c.image_id, ranked.c.keeper_id,
                  ranked.c.position == 1, sa.literal(0, sa.Integer))
        .where(ranked.c.members >= 2)))


def hash_matrix(kind: str, size: int, bits: int, hexes: list[str], values: list[int | None]) -> np.ndarray:
    """Stored hashes as unsigned 64-bit words: shape (n,) up to 64 bits, else (n, words).

    Up to 64 bits the stored signed integer is used. Longer hashes are read
    from their hex, which must be fixed width: ``dhash.format_hex`` does not pad
    odd sizes enough, so ``dhash_rowcol`` size 7 (98 bits, no integer form)
    cannot be read back and is refused.
    """
    if bits <= 64:
        if any(v is None for v in values):
            raise ValueError(f"{kind} size {size}: hashes without their integer form; re-run the hash step")
        return np.array(values, dtype=np.int64).view(np.uint64)
    if kind == "dhash_rowcol" and size % 2:
        raise ValueError(f"dhash_rowcol size {size} hex is not fixed width and cannot be compared bit by bit; "
                         f"use an even size, or a size up to 5")
    words = -(-bits // 64)
    digits = words * 16
    if any(len(h) > digits for h in hexes):
        raise ValueError(f"{kind} size {size}: hex longer than {bits} bits")
    packed = b"".join(bytes.fromhex(h.zfill(digits)) for h in hexes)
    return np.frombuffer(packed, dtype=">u8").astype(np.uint64).reshape(len(hexes), words)


def _hamming_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance row by row between two hash matrices from :func:`hash_matrix`."""
    diff = np.bitwise_count(a ^ b).astype(np.int64)
    return diff if diff.ndim == 1 else diff.sum(axis=1)


def _group_near(conn: Connection, summary: DedupeSummary) -> None:
    """Pairs within the radius (exact search) → connected components → keeper and distances."""
    rows = conn.execute(
        sa.select(images.c.id, images.c.label, images.c.width, images.c.height, images.c.byte_size,
                  images.c.format, image_hashes.c.hex, image_hashes.c.value, image_hashes.c.bits)
        .select_from(_hashed(summary.hash_kind, summary.size))
        .where(*_candidates_where(summary)).order_by(images.c.id)).all()
    if len(rows) < 2:
        return
    hashes = hash_matrix(summary.hash_kind, summary.size, max(r.bits for r in rows),
                         [r.hex for r in rows], [r.value for r in rows])
    first, second, _ = pairs_within(hashes, summary.max_distance)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    if summary.per_label:
        labels = np.array([r.label for r in rows], dtype=object)
        same = labels[first] == labels[second]
        first, second = first[same], second[same]
    _, component, members = np.unique(connected_groups(len(rows), first, second),
                                      return_inverse=True, return_counts=True)
    grouped = np.flatnonzero(members[component] >= 2)
    if grouped.size == 0:
        return
    keeper_of: dict[int, int] = {}
    for index in sorted(grouped, key=lambda k: keeper_key(rows[k].width, rows[k].height, rows[k].byte_size,
                                                          rows[k].format, rows[k].id)):
        keeper_of.setdefault(int(component[index]), int(index))
    keepers = np.array([keeper_of[int(component[k])] for k in grouped])
    distances = _hamming_rows(hashes[grouped], hashes[keepers])
    conn.execute(sa.insert(duplicate_groups), [
        {"run_id": summary.run_id, "image_id": rows[k].id, "group_id": rows[keeper].id,
         "is_keeper": bool(k == keeper), "distance": int(d)}
        for k, keeper, d in zip(grouped.tolist(), keepers.tolist(), distances.tolist())])


# ---- unique counts per label and hash size ------------------------------------------

@dataclass(frozen=True)
class UniqueCounts:
    """Per label, the images the exact rule keeps at each hash size (the dHash lab's table)."""

    hash_kind: str
    sizes: tuple[int, ...]
    images: dict[str | None, int]              # label -> ok images with this hash kind
    unique: dict[str | None, dict[int, int]]   # label -> size -> unique images

    @property
    def labels(self) -> list[str | None]:
        return sorted(self.images, key=lambda label: (label is None, label or ""))

    def total(self, size: int) -> int:
        return sum(per_size.get(size, 0) for per_size in self.unique.values())

    def lines(self) -> list[str]:
        head = f"{'label':<20} {'images':>7}" + "".join(f" {'size ' + str(s):>8}" for s in self.sizes)
        out = [f"unique images per label by {self.hash_kind} size (exact rule within each label)", head]
        for label in self.labels:
            out.append(f"{label or '(none)':<20} {self.images[label]:>7}"
                       + "".join(f" {self.unique[label].get(s, 0):>8}" for s in self.sizes))
        out.append(f"{'total':<20} {sum(self.images.values()):>7}"
                   + "".join(f" {self.total(s):>8}" for s in self.sizes))
        return out


def unique_counts(db: Database, *, hash_kind: str = "dhash_rowcol", sizes=range(8, 0, -1),
                  include_low_detail: bool = False) -> UniqueCounts:
    """How many images each label keeps at each hash size under the exact rule, counted in SQL.

    Within a label the exact rule keeps one image per distinct hash, so this is
    ``COUNT(DISTINCT hex)`` per label and size; low-detail images are never
    grouped (unless ``include_low_detail``), so each of them counts as unique.
    """
    sizes = tuple(int(s) for s in sizes)
    kept = sa.func.count(sa.distinct(image_hashes.c.hex))
    if not include_low_detail:
        flat = _is_low_detail()
        kept = (sa.func.count(sa.distinct(sa.case((flat, sa.null()), else_=image_hashes.c.hex)))
                + sa.func.count().filter(flat))
    with db.engine.connect() as conn:
        rows = conn.execute(
            sa.select(images.c.label, image_hashes.c.size, kept, sa.func.count())
            .select_from(images.join(image_hashes, image_hashes.c.image_id == images.c.id))
            .where(images.c.status == "ok", image_hashes.c.kind == hash_kind, image_hashes.c.size.in_(sizes))
            .group_by(images.c.label, image_hashes.c.size)).all()
    totals: dict[str | None, int] = {}
    unique: dict[str | None, dict[int, int]] = {}
    for label, size, kept, hashed in rows:
        unique.setdefault(label, {})[size] = kept
        totals[label] = max(totals.get(label, 0), hashed)
    return UniqueCounts(hash_kind, sizes, totals, unique)


# ---- is a new image a duplicate? ----------------------------------------------------

@dataclass(frozen=True)
class Match:
    image_id: int
    label: str | None
    distance: int


def is_duplicate(db: Database, data: bytes, *, hash_kind: str = NEAR_DEFAULT_HASH[0],
                 size: int = NEAR_DEFAULT_HASH[1], max_distance: int | None = None, limit: int = 10,
                 include_low_detail: bool = False) -> list[Match]:
    """Stored ok images whose hash is within ``max_distance`` of the new image's, nearest first.

    ``max_distance`` defaults as in the near rule (:func:`default_max_distance`).
    An empty list means the image is not a duplicate. Flat images are not
    matched (their hashes say nothing), on either side, unless ``include_low_detail``.
    Raises ``images.ImageError`` when ``data`` cannot be decoded.
    """
    if hash_kind not in KINDS:
        raise ValueError(f"unknown hash kind {hash_kind!r}; use one of {KINDS}")
    if max_distance is None:
        max_distance = default_max_distance(hash_kind, size)
    image = open_image(data)
    if not include_low_detail and is_low_detail(image):
        return []
    dhash_sizes, imagehash_sizes = ([size], []) if hash_kind == "dhash_rowcol" else ([], [size])
    query = next(h for h in compute_hashes(image, dhash_sizes=dhash_sizes, imagehash_sizes=imagehash_sizes)
                 if h.kind == hash_kind)
    where = [images.c.status == "ok"] + ([] if include_low_detail else [~_is_low_detail()])
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.label, image_hashes.c.hex, image_hashes.c.value)
                            .select_from(_hashed(hash_kind, size)).where(*where).order_by(images.c.id)).all()
    if not rows:
        return []
    stored = hash_matrix(hash_kind, size, query.bits, [r.hex for r in rows], [r.value for r in rows])
    mine = hash_matrix(hash_kind, size, query.bits, [query.hex], [query.to_signed64()])
    distances = _hamming_rows(stored, mine[0])
    near = np.flatnonzero(distances <= max_distance)
    near = near[np.lexsort((near, distances[near]))][:limit]  # nearest first, then lowest id
    return [Match(rows[k].id, rows[k].label, int(distances[k])) for k in near]
