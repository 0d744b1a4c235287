"""Dedupe step: group images that are copies of one another, and pick one keeper per group.

Three rules, one keeper order:

- ``verified`` (the default): two stages. Candidates come cheaply and
  generously: pairs within a wide Hamming radius of the 128-bit row+column
  dHash (multi-index hashing, exact), and each image's nearest neighbours in
  CNN-embedding space (which sees mirrored, cropped and rotated copies that
  hashes miss, and flat images whose hashes collide). Every candidate pair is
  then verified: a pair whose embeddings are very close is a copy, one whose
  embeddings are far apart is not, and the unsure band between is decided by
  local-feature geometry (:mod:`lookalike.verify`: ORB keypoints, RANSAC,
  frame overlap, aligned pixels and colour). Thresholds are in
  :class:`VerifiedThresholds` and are stored with each run.
- ``exact`` (the classic dHash lab rule): images with equal hash hex are one
  group. It runs entirely in the database, as one ``INSERT … SELECT`` over
  ``ROW_NUMBER() OVER (PARTITION BY hex ORDER BY …)``, on SQLite and PostgreSQL.
- ``near``: images whose hashes are within ``max_distance`` bits (Hamming),
  every pair found exactly, grouped as the verified rule groups.

Groups never chain: images are taken in keeper order (widest, then tallest,
then largest file, then a lossless format, then the lowest id:
:func:`keeper_key`), and each image not yet in a group becomes a keeper and
takes the images that match *it*, not images that match one of its members.
``distance`` is each member's Hamming distance to its keeper; the verified
rule also stores the score that decided and whether the embedding or the
geometry decided it. The exact and near rules leave low-detail (flat) images
out, because their hashes collide; the verified rule checks them like any other.

People's review decisions (:mod:`lookalike.review`) bind every rule: a pair
marked not duplicate never ends in one group, a confirmed pair is grouped before
any match, and an image to keep is its group's keeper (``verified_by`` =
``review``); the exact rule applies them after its SQL grouping.

Nothing is deleted. Each run writes a ``dedupe_runs`` row and its
``duplicate_groups``; the latest run is the current one, and re-running the
latest run's parameters replaces that run's groups in place. A run that fails
(no hashes, no images, no embeddings) writes nothing, so it never becomes the
latest. The ``unique_images`` view (ok images that are not duplicates in the
latest run) is what later steps read; ``db.ensure_views`` creates it, the
``image_dhash`` view, and on PostgreSQL the ``hamming(text, text)`` SQL
function, whenever a ``Database`` is opened (on SQLite the function is
registered per connection by ``db.register_sqlite_functions``).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from tqdm import tqdm

from .config import DEFAULT_BACKBONE
from .db import (Database, dedupe_runs, duplicate_groups, hashed_images, image_hashes, images, latest_feature_model,
                 load_embeddings, now, recorded_run, to_json)
from .errors import BadInput, Precondition
from .hamming import hamming_rows
from .images import LOSSLESS_FORMATS, ImageError, open_image
from .neardup import pairs_within
from .phash import KINDS, compute_hashes, is_low_detail
from .review import REVIEWED, Review, load_review, pair
from .steps import STEPS, default
from .vectors import nearest_neighbours

RULES = STEPS["dedupe"].param("rule").choices
DEFAULT_RULE = default("dedupe", "rule")
# Defaults per rule. The exact rule is the lab's dHash at size 3. The near rule
# uses the dhash row+col hash at size 8 (128 bits) within 10 bits: of the
# hash-only rules it had the best F1 on the sample set's planted copies
# (bench/bench_dedupe_quality.py). The verified rule takes the same hash at a
# wider radius, for candidates only.
EXACT_DEFAULT_HASH = ("dhash_rowcol", 3)
NEAR_DEFAULT_HASH = ("dhash_rowcol", 8)
DEFAULT_MAX_DISTANCE = 10   # bits, for NEAR_DEFAULT_HASH; other hashes get the same share of their bits
VERIFIED_MAX_DISTANCE = 16  # bits of NEAR_DEFAULT_HASH within which a pair is a verified-rule candidate
DHASH_ROWCOL_SIZES = range(1, 9)
# (image ids, hashes, max_distance) -> (i, j, distance) row positions, as pairs_within gives them
PairSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class VerifiedThresholds:
    """The verified rule's decisions; calibrated on the real-photograph dev set (bench/bench_dedupe_quality.py)."""

    neighbours: int = 10              # nearest embeddings per image taken as candidates
    reject_below: float = 0.60        # cosine similarity under which a candidate is not a copy
    accept_from: float = 0.97         # cosine similarity from which a candidate is a copy without geometry

    def as_dict(self) -> dict:
        return asdict(self)


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
    images: int = 0              # images considered
    groups: int = 0
    duplicates: int = 0          # group members that are not keepers
    low_detail_left_out: int = 0
    not_hashed: int = 0          # ok images without this hash yet
    not_embedded: int = 0        # verified rule: hashed images without an embedding yet
    replaced: bool = False       # the latest run had these parameters and was redone in place
    group_sizes: Counter = field(default_factory=Counter)  # members -> groups
    candidates: int = 0          # verified rule: candidate pairs, and how each was decided
    decided: Counter = field(default_factory=Counter)      # accepted/rejected by embedding, by geometry
    unreadable: int = 0          # verified rule: images geometry could not decode

    def lines(self) -> list[str]:
        rule = {"near": f"near rule, within {self.max_distance} bits", "exact": "exact rule",
                "verified": f"verified rule (candidates: {self.hash_kind} size {self.size} within "
                            f"{self.max_distance} bits, and embedding neighbours)"}[self.rule]
        scope = "within each label" if self.per_label else "across labels"
        hashed = "" if self.rule == "verified" else f", {self.hash_kind} size {self.size}"
        out = [f"dedupe run {self.run_id}{' (redone)' if self.replaced else ''}: {rule}{hashed}, {scope}",
               f"  {self.images} images, {self.groups} groups, {self.duplicates} duplicates marked, "
               f"{self.images - self.duplicates} unique"]
        if self.rule == "verified":
            geometry = self.decided["geometry accepted"] + self.decided["geometry rejected"]
            share = geometry / self.candidates if self.candidates else 0.0
            out.append(f"  {self.candidates} candidate pairs: {self.decided['embedding accepted']} copies by "
                       f"embedding, {self.decided['embedding rejected']} rejected by embedding, {geometry} "
                       f"unsure checked by geometry ({share:.1%}: {self.decided['geometry accepted']} copies)")
        if self.group_sizes:
            out.append("  group sizes: " + ", ".join(f"{n} x {size}" for size, n in sorted(self.group_sizes.items())))
        if self.low_detail_left_out:
            out.append(f"  left out: {self.low_detail_left_out} low-detail (flat) images, whose hashes collide")
        if self.not_hashed:
            out.append(f"  not hashed yet: {self.not_hashed} ok images have no {self.hash_kind} size {self.size} "
                       f"hash (run the hash step)")
        if self.not_embedded:
            out.append(f"  not embedded yet: {self.not_embedded} images have no embedding (run the featurize step)")
        if self.unreadable:
            out.append(f"  {self.unreadable} images could not be read for geometry; their unsure pairs were rejected")
        return out


def rule_hash(rule: str, hash_kind: str | None, size: int | None,
              max_distance: int | None) -> tuple[str, int, int | None]:
    """The hash kind, size and radius a run of ``rule`` compares: defaults filled in, each checked."""
    if rule not in RULES:
        raise BadInput(f"unknown dedupe rule {rule!r}; use one of: {', '.join(RULES)}")
    default_kind, default_size = EXACT_DEFAULT_HASH if rule == "exact" else NEAR_DEFAULT_HASH
    hash_kind = hash_kind or default_kind
    if hash_kind not in KINDS:
        raise BadInput(f"unknown hash kind {hash_kind!r}; use one of: {', '.join(KINDS)}")
    size = (default_size if hash_kind == default_kind else 8) if size is None else int(size)
    if hash_kind == "dhash_rowcol" and size not in DHASH_ROWCOL_SIZES:
        raise BadInput(f"dhash_rowcol hashes have sizes 1 to 8, not {size}")
    bits = hash_bits(hash_kind, size)
    if rule == "exact":
        if max_distance not in (None, 0):
            raise BadInput("the exact rule takes no maximum distance; use the near or verified rule")
        max_distance = None
    else:
        default = VERIFIED_MAX_DISTANCE if rule == "verified" else default_max_distance(hash_kind, size)
        max_distance = default if max_distance is None else int(max_distance)
        if not 0 <= max_distance < bits:
            raise BadInput(f"the maximum distance must be between 0 and {bits - 1} bits for {hash_kind} "
                           f"size {size} ({bits} bits), not {max_distance}")
    return hash_kind, size, max_distance


def dedupe_images(db: Database, *, rule: str = DEFAULT_RULE, hash_kind: str | None = None, size: int | None = None,
                  max_distance: int | None = None, per_label: bool = False, include_low_detail: bool = False,
                  backbone: str = DEFAULT_BACKBONE, thresholds: VerifiedThresholds = VerifiedThresholds(),
                  progress: bool | None = None, pair_search: PairSearch | None = None) -> DedupeSummary:
    """Group duplicate images and record a dedupe run; return its summary.

    ``hash_kind``/``size`` default per rule (:data:`EXACT_DEFAULT_HASH`,
    :data:`NEAR_DEFAULT_HASH`); ``max_distance`` is the near rule's radius
    (default :func:`default_max_distance` of the hash) or the verified rule's
    candidate radius (default :data:`VERIFIED_MAX_DISTANCE`). ``per_label``
    groups only images with the same label. The verified rule reads the
    embeddings of ``backbone``. ``pair_search(ids, hashes, max_distance)``
    finds the near rule's pairs in place of :func:`pairs_within` (the Spark job
    passes its distributed search, which gives the same pairs). Raises
    ``ValueError`` for a parameter that cannot work and ``LookupError`` when
    there is nothing to dedupe yet; either way no run is recorded.
    """
    hash_kind, size, max_distance = rule_hash(rule, hash_kind, size, max_distance)
    if rule == "verified":
        include_low_detail = True   # verified, not excluded: their embeddings and geometry still tell
    params = dict(rule=rule, hash_kind=hash_kind, hash_size=size, max_distance=max_distance,
                  per_label=bool(per_label), include_low_detail=bool(include_low_detail))
    run_params = dict(backbone=backbone, **thresholds.as_dict()) if rule == "verified" else None
    if progress is None:
        progress = sys.stderr.isatty()

    with recorded_run(db, "dedupe", dict(params, **(run_params or {}))) as counts:
        with db.begin() as conn:
            run_id, replaced = _start_run(conn, params, run_params)
            summary = DedupeSummary(run_id, rule, hash_kind, size, max_distance, bool(per_label),
                                    bool(include_low_detail), replaced=replaced)
            _count_inputs(conn, summary)
            if rule == "exact":
                _group_exact(conn, summary)
            elif rule == "near":
                _group_near(conn, summary, pair_search)
            else:
                _group_verified(conn, db, summary, backbone, thresholds, progress)
            rows = conn.execute(
                sa.select(duplicate_groups.c.group_id, sa.func.count())
                .where(duplicate_groups.c.run_id == run_id).group_by(duplicate_groups.c.group_id)).all()
            summary.groups = len(rows)
            summary.duplicates = sum(n - 1 for _, n in rows)
            summary.group_sizes = Counter(n for _, n in rows)
            details = dict(run_params, candidates=summary.candidates, decided=dict(summary.decided)) \
                if rule == "verified" else None
            conn.execute(sa.update(dedupe_runs).where(dedupe_runs.c.id == run_id).values(
                groups=summary.groups, duplicates=summary.duplicates, created_at=now(), params=to_json(details)))
        counts.update(run_id=run_id, images=summary.images, groups=summary.groups,
                      duplicates=summary.duplicates, low_detail_left_out=summary.low_detail_left_out,
                      not_hashed=summary.not_hashed, not_embedded=summary.not_embedded, replaced=replaced,
                      candidates=summary.candidates, decided=dict(summary.decided))
    return summary


def _start_run(conn: Connection, params: dict, run_params: dict | None) -> tuple[int, bool]:
    """Reuse the latest run when it had these parameters (its groups are replaced), else add a run."""
    latest = conn.execute(sa.select(dedupe_runs).order_by(dedupe_runs.c.id.desc()).limit(1)).mappings().first()
    same_thresholds = latest is not None and all(
        (json_value(latest["params"]) or {}).get(key) == value for key, value in (run_params or {}).items())
    if latest is not None and all(latest[key] == value for key, value in params.items()) and same_thresholds:
        conn.execute(sa.delete(duplicate_groups).where(duplicate_groups.c.run_id == latest["id"]))
        return latest["id"], True
    run_id = conn.execute(sa.insert(dedupe_runs).values(**params, groups=0, duplicates=0, created_at=now())
                          .returning(dedupe_runs.c.id)).scalar_one()
    return run_id, False


def json_value(text: str | None):
    return json.loads(text) if text else None


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
    """Count what the run will see, and refuse a run that could only be empty or wrong."""
    ok = conn.execute(sa.select(sa.func.count()).select_from(images).where(images.c.status == "ok")).scalar_one()
    if ok == 0:
        raise Precondition("nothing to dedupe: the database has no loaded images (run `lookalike load` first)")
    hashed = _hashed(summary.hash_kind, summary.size)
    flat, total = conn.execute(
        sa.select(sa.func.count().filter(_is_low_detail()), sa.func.count())
        .select_from(hashed).where(images.c.status == "ok")).one()
    if total == 0:
        stored = conn.execute(sa.select(image_hashes.c.size).where(image_hashes.c.kind == summary.hash_kind)
                              .distinct().order_by(image_hashes.c.size)).scalars().all()
        have = f"stored {summary.hash_kind} sizes: {', '.join(map(str, stored))}" if stored else \
            f"no {summary.hash_kind} hashes are stored"
        raise Precondition(f"no image has a {summary.hash_kind} size {summary.size} hash ({have}); run "
                           f"`lookalike hash`" + (" with --imagehash-sizes" if summary.hash_kind != "dhash_rowcol"
                                                 else ""))
    summary.low_detail_left_out = 0 if summary.include_low_detail else flat
    summary.images = total - summary.low_detail_left_out
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
    _regroup_reviewed(conn, summary, load_review(conn))


def _regroup_reviewed(conn: Connection, summary: DedupeSummary, review: Review) -> None:
    """Exact rule: the equal-hash sets people decided on, grouped again in Python with their decisions."""
    if not review:
        return
    rows = _hashed_rows(conn, summary)
    key = {r.id: (r.hex, r.label if summary.per_label else None) for r in rows}
    keys = {key[i] for i in review.ids() if i in key}
    rows = [r for r in rows if key[r.id] in keys]
    if not rows:
        return
    sets: dict[tuple, list[int]] = {}
    for k, r in enumerate(rows):
        sets.setdefault(key[r.id], []).append(k)
    pairs = np.array([(a, b) for ks in sets.values() for i, a in enumerate(ks) for b in ks[i + 1:]],
                     dtype=np.int64).reshape(-1, 2)
    conn.execute(sa.delete(duplicate_groups).where(duplicate_groups.c.run_id == summary.run_id,
                                                   duplicate_groups.c.image_id.in_([r.id for r in rows])))
    hashes = hash_matrix(summary.hash_kind, summary.size, max(r.bits for r in rows),
                         [r.hex for r in rows], [r.value for r in rows])
    _write_groups(conn, summary, rows, keeper_groups(rows, pairs[:, 0], pairs[:, 1], review=review), hashes, review)


def hash_matrix(kind: str, size: int, bits: int, hexes: list[str], values: list[int | None]) -> np.ndarray:
    """Stored hashes as unsigned 64-bit words: shape (n,) up to 64 bits, else (n, words).

    Up to 64 bits the stored signed integer is used. Longer hashes are read
    from their hex, which must be fixed width: ``dhash.format_hex`` does not pad
    odd sizes enough, so ``dhash_rowcol`` size 7 (98 bits, no integer form)
    cannot be read back and is refused.
    """
    if bits <= 64:
        if any(v is None for v in values):
            raise BadInput(f"{kind} size {size}: hashes without their integer form; re-run the hash step")
        return np.array(values, dtype=np.int64).view(np.uint64)
    if kind == "dhash_rowcol" and size % 2:
        raise BadInput(f"dhash_rowcol size {size} hex is not fixed width and cannot be compared bit by bit; "
                       f"use an even size, or a size up to 5")
    words = -(-bits // 64)
    digits = words * 16
    if any(len(h) > digits for h in hexes):
        raise BadInput(f"{kind} size {size}: hex longer than {bits} bits")
    packed = b"".join(bytes.fromhex(h.zfill(digits)) for h in hexes)
    return np.frombuffer(packed, dtype=">u8").astype(np.uint64).reshape(len(hexes), words)


def _hashed_rows(conn: Connection, summary: DedupeSummary) -> list:
    return conn.execute(
        sa.select(images.c.id, images.c.sha256, images.c.source, images.c.label, images.c.width, images.c.height,
                  images.c.byte_size, images.c.format, image_hashes.c.hex, image_hashes.c.value,
                  image_hashes.c.bits, _is_low_detail().label("low_detail"))
        .select_from(_hashed(summary.hash_kind, summary.size))
        .where(*_candidates_where(summary)).order_by(images.c.id)).all()


def keeper_groups(rows: list, first: np.ndarray, second: np.ndarray, score: np.ndarray | None = None,
                  review: Review | None = None) -> np.ndarray:
    """Keeper index per row (-1: in no group) from matching pairs, without chaining.

    Rows are taken in keeper order. A row that matches a keeper taken before it
    joins that keeper's group (the best-scoring one, if it matches several);
    otherwise it becomes a keeper itself. A row joins only a keeper it matches
    *directly*, so A~B and B~C never put A and C in one group unless A~C too.

    People's decisions (``review``, by image id) come first: a row never joins a
    group holding an image it is not a duplicate of; a row confirmed with an
    image taken before it joins that image's group ahead of any match; and an
    image to keep becomes its group's keeper (the later decision, if two).
    """
    n = len(rows)
    order = sorted(range(n), key=lambda k: keeper_key(rows[k].width, rows[k].height, rows[k].byte_size,
                                                      rows[k].format, rows[k].id))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    score = np.zeros(len(first)) if score is None else score
    matches: dict[int, list[tuple[float, int, int]]] = {}   # row -> (-score, keeper rank, better-ranked row)
    for a, b, s in zip(first.tolist(), second.tolist(), score.tolist()):
        better, worse = (a, b) if rank[a] < rank[b] else (b, a)
        matches.setdefault(worse, []).append((-s, int(rank[better]), better))
    review = review or Review()
    index = {r.id: k for k, r in enumerate(rows)} if review else {}
    apart = {(index[a], index[b]) for a, b in review.apart if a in index and b in index}
    apart |= {(b, a) for a, b in apart}
    together = set()                                        # (worse, better-ranked row) confirmed
    for a, b in review.together:
        if a in index and b in index:
            better, worse = sorted((index[a], index[b]), key=lambda k: rank[k])
            together.add((worse, better))
            matches.setdefault(worse, []).append((-np.inf, int(rank[better]), better))
    keeper = np.full(n, -1, dtype=np.int64)
    members: dict[int, list[int]] = {}
    for k in order:
        options = []
        for s, _, c in matches.get(k, ()):
            group = int(keeper[c]) if (k, c) in together else c if keeper[c] == c else -1
            if group >= 0 and not any((k, m) in apart for m in members[group]):
                options.append((s, int(rank[group]), group))
        joined = min(options, default=None)
        keeper[k] = k if joined is None else joined[2]   # a keeper left alone is dropped below
        members.setdefault(int(keeper[k]), []).append(k)
    sizes = np.bincount(keeper, minlength=n)
    keeper[sizes[keeper] < 2] = -1
    for group in members.values():
        kept = [m for m in group if rows[m].id in review.keep]
        if len(group) > 1 and kept:
            keeper[group] = max(kept, key=lambda m: review.keep[rows[m].id])
    return keeper


def _write_groups(conn: Connection, summary: DedupeSummary, rows: list, keeper: np.ndarray, hashes: np.ndarray,
                  review: Review, decision: dict[tuple[int, int], tuple[float, str]] | None = None) -> None:
    grouped = np.flatnonzero(keeper >= 0)
    if grouped.size == 0:
        return
    keepers = keeper[grouped]
    distances = hamming_rows(hashes[grouped], hashes[keepers])
    records = []
    for k, kept, d in zip(grouped.tolist(), keepers.tolist(), distances.tolist()):
        score, method = (None, None)
        if k == kept:
            method = REVIEWED if rows[k].id in review.keep else None
        else:
            # What put the member with this keeper: the rule's check, or a person (a confirmed
            # pair, or a keeper or partner chosen in review that the rule did not match it with).
            if decision is not None:
                score, method = decision.get((min(k, kept), max(k, kept)), (None, REVIEWED))
            elif d > (summary.max_distance or 0) or (summary.per_label and rows[k].label != rows[kept].label):
                method = REVIEWED
            if pair(rows[k].id, rows[kept].id) in review.together:
                method = REVIEWED
        records.append({"run_id": summary.run_id, "image_id": rows[k].id, "group_id": rows[kept].id,
                        "is_keeper": k == kept, "distance": int(d), "score": score, "verified_by": method})
    conn.execute(sa.insert(duplicate_groups), records)


def _same_label(rows: list, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    labels = np.array([r.label for r in rows], dtype=object)
    return labels[first] == labels[second]


def _group_near(conn: Connection, summary: DedupeSummary, pair_search: PairSearch | None) -> None:
    """Pairs within the radius (exact search) → keepers, each member within the radius of its keeper."""
    rows = _hashed_rows(conn, summary)
    if len(rows) < 2:
        return
    hashes = hash_matrix(summary.hash_kind, summary.size, max(r.bits for r in rows),
                         [r.hex for r in rows], [r.value for r in rows])
    if pair_search is None:
        first, second, _ = pairs_within(hashes, summary.max_distance)
    else:
        first, second, _ = pair_search(np.array([r.id for r in rows], dtype=np.int64), hashes, summary.max_distance)
    if summary.per_label:
        same = _same_label(rows, first, second)
        first, second = first[same], second[same]
    review = load_review(conn)
    _write_groups(conn, summary, rows, keeper_groups(rows, first, second, review=review), hashes, review)


# ---- the verified rule -----------------------------------------------------------------

def _group_verified(conn: Connection, db: Database, summary: DedupeSummary, backbone: str,
                    thresholds: VerifiedThresholds, progress: bool) -> None:
    """Candidates from the hash and the embeddings, each verified, then keepers without chaining."""
    model_id = latest_feature_model(conn, backbone)
    hashed = _hashed_rows(conn, summary)
    ids, vectors = load_embeddings(conn, model_id)
    position = {int(i): k for k, i in enumerate(ids.tolist())}
    rows = [r for r in hashed if r.id in position]
    summary.not_embedded = len(hashed) - len(rows)
    summary.images = len(rows)
    if len(rows) < 2:
        return
    vectors = vectors[[position[r.id] for r in rows]]
    hashes = hash_matrix(summary.hash_kind, summary.size, max(r.bits for r in rows),
                         [r.hex for r in rows], [r.value for r in rows])
    first, second = candidate_pairs(hashes, vectors, np.array([r.low_detail for r in rows], dtype=bool),
                                    summary.max_distance, thresholds.neighbours)
    if summary.per_label:
        same = _same_label(rows, first, second)
        first, second = first[same], second[same]
    similarity = np.einsum("ij,ij->i", vectors[first], vectors[second])
    summary.candidates = len(first)
    verifier = _Verifier(first, second, lambda k: db.store.path(rows[k].sha256))
    accepted, score, method = verifier.decide(similarity, thresholds, summary, progress)
    # A copy that matches two keepers which do not match each other (a grey copy matches the
    # original and its recolouring) joins the one whose pixels line up best.
    preference = score.copy()
    ambiguous = _ambiguous(first, second, accepted)
    preference[ambiguous] = [g.correlation if g else 0.0 for g in verifier.geometry(ambiguous)]
    summary.unreadable = len(verifier.cache.unreadable)
    chosen = np.flatnonzero(accepted)
    review = load_review(conn)
    keeper = keeper_groups(rows, first[chosen], second[chosen], preference[chosen], review)
    decision = {(int(first[k]), int(second[k])): (float(score[k]), method[k]) for k in chosen}
    _write_groups(conn, summary, rows, keeper, hashes, review, decision)


def _ambiguous(first: np.ndarray, second: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """Accepted pairs of images whose accepted partners do not all accept each other."""
    chosen = np.flatnonzero(accepted)
    matched = {(int(first[k]), int(second[k])) for k in chosen}
    partners: dict[int, list[tuple[int, int]]] = {}
    for k in chosen.tolist():
        a, b = int(first[k]), int(second[k])
        partners.setdefault(a, []).append((b, k))
        partners.setdefault(b, []).append((a, k))
    out = set()
    for pairs in partners.values():
        others = sorted(p for p, _ in pairs)
        if any((p, q) not in matched for i, p in enumerate(others) for q in others[i + 1:]):
            out.update(k for _, k in pairs)
    return np.array(sorted(out), dtype=np.int64)


def candidate_pairs(hashes: np.ndarray, vectors: np.ndarray, low_detail: np.ndarray, max_distance: int,
                    neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i < j): hashes within ``max_distance`` (flat images left out: theirs collide),
    and each image's ``neighbours`` nearest embeddings."""
    n = len(vectors)
    detailed = np.flatnonzero(~low_detail)
    i, j, _ = pairs_within(hashes[detailed], max_distance)
    keys = [detailed[i] * n + detailed[j]]
    near = nearest_neighbours(vectors, min(neighbours, n - 1))
    rows = np.repeat(np.arange(n), near.shape[1])
    cols = near.ravel()
    valid = (cols >= 0) & (cols != rows)
    a, b = rows[valid], cols[valid]
    keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    keys = np.unique(np.concatenate(keys))
    return keys // n, keys % n


class _ViewCache:
    """Decoded verification views by row, the most recently used kept (bounded memory)."""

    def __init__(self, path_of, capacity: int = 1024):   # a view is at most about 400 KB
        self.path_of, self.capacity = path_of, capacity
        self.views: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.unreadable: set[int] = set()

    def get(self, k: int):
        from .verify import load_view   # OpenCV: only the verified rule
        with self.lock:
            if k in self.views:
                self.views.move_to_end(k)
                return self.views[k]
        try:
            view = load_view(self.path_of(k))
        except ImageError:
            view = None
            with self.lock:
                self.unreadable.add(k)
        with self.lock:
            self.views[k] = view
            if len(self.views) > self.capacity:
                self.views.popitem(last=False)
        return view


class _Verifier:
    """Decides candidate pairs (rows ``first[k]``, ``second[k]``): by embedding, or by geometry when unsure."""

    def __init__(self, first: np.ndarray, second: np.ndarray, path_of):
        self.first, self.second = first, second
        self.cache = _ViewCache(path_of)
        self.results: dict[int, object] = {}   # pair index -> Geometry (None: unreadable), each pair checked once

    def _check(self, k: int):
        if k in self.results:
            return self.results[k]
        a, b = self.cache.get(int(self.first[k])), self.cache.get(int(self.second[k]))
        result = None
        if a is not None and b is not None:
            from .verify import match_geometry   # OpenCV: only the verified rule
            result = match_geometry(a, b)
        self.results[k] = result
        return result

    def geometry(self, pairs: np.ndarray, progress: bool = False):
        """Geometry results (None: unreadable) for these pair indices, in order, two at a time."""
        # The better-ranked image of a pair is usually decoded again for its next pair: keep pairs in order.
        order = np.lexsort((self.second[pairs], self.first[pairs]))
        results = [None] * len(pairs)
        with ThreadPoolExecutor(2) as pool, tqdm(total=len(pairs), unit="pair", desc="verify", mininterval=1.0,
                                                 disable=not progress) as bar:
            for position, result in zip(order.tolist(), pool.map(self._check, pairs[order].tolist())):
                results[position] = result
                bar.update()
        return results

    def decide(self, similarity: np.ndarray, thresholds: VerifiedThresholds, summary: DedupeSummary,
               progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(accepted mask, the score that decided each pair, what decided it: embedding or geometry)."""
        accepted = similarity >= thresholds.accept_from
        unsure = np.flatnonzero(~accepted & (similarity >= thresholds.reject_below))
        summary.decided["embedding accepted"] = int(accepted.sum())
        summary.decided["embedding rejected"] = len(similarity) - int(accepted.sum()) - len(unsure)
        score = similarity.astype(np.float64)
        method = ["embedding"] * len(similarity)
        for k, geometry in zip(unsure.tolist(), self.geometry(unsure, progress)):
            matched = geometry is not None and geometry.matched
            summary.decided["geometry accepted" if matched else "geometry rejected"] += 1
            if matched:
                accepted[k], score[k], method[k] = True, geometry.correlation, "geometry"
        return accepted, score, method


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
    source: str
    distance: int              # Hamming distance of the rule's hash
    similarity: float | None   # cosine similarity of the embeddings (verified rule)
    verified_by: str           # hash | embedding | geometry


def is_duplicate(db: Database, data: bytes, *, rule: str = DEFAULT_RULE, hash_kind: str | None = None,
                 size: int | None = None, max_distance: int | None = None, limit: int = default("is-duplicate", "limit"),
                 include_low_detail: bool = False, backbone: str = DEFAULT_BACKBONE,
                 thresholds: VerifiedThresholds = VerifiedThresholds()) -> list[Match]:
    """Stored ok images that the new image is a copy of, by the dedupe ``rule``; best first.

    ``verified`` (default): the dedupe step's candidates and checks, with the
    new image as the copy and each stored image as the keeper. ``near``: stored
    hashes within ``max_distance`` (flat images are not matched unless
    ``include_low_detail``). An empty list means the image is not a duplicate.
    Raises ``images.ImageError`` when ``data`` cannot be decoded.
    """
    if rule not in ("verified", "near"):
        raise BadInput(f"is-duplicate takes the verified or the near rule, not {rule!r}")
    hash_kind, size = hash_kind or NEAR_DEFAULT_HASH[0], NEAR_DEFAULT_HASH[1] if size is None else int(size)
    if hash_kind not in KINDS:
        raise BadInput(f"unknown hash kind {hash_kind!r}; use one of: {', '.join(KINDS)}")
    bits = hash_bits(hash_kind, size)
    if max_distance is None:
        max_distance = VERIFIED_MAX_DISTANCE if rule == "verified" else default_max_distance(hash_kind, size)
    if not 0 <= max_distance < bits:
        raise BadInput(f"the maximum distance must be between 0 and {bits - 1} bits, not {max_distance}")
    image = open_image(data)
    flat = is_low_detail(image)
    if rule == "near" and flat and not include_low_detail:
        return []
    dhash_sizes, imagehash_sizes = ([size], []) if hash_kind == "dhash_rowcol" else ([], [size])
    query = next(h for h in compute_hashes(image, dhash_sizes=dhash_sizes, imagehash_sizes=imagehash_sizes)
                 if h.kind == hash_kind)
    where = [images.c.status == "ok"] + ([] if include_low_detail or rule == "verified" else [~_is_low_detail()])
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.id, images.c.label, images.c.source, images.c.sha256,
                                      image_hashes.c.hex, image_hashes.c.value, _is_low_detail().label("low_detail"))
                            .select_from(_hashed(hash_kind, size)).where(*where).order_by(images.c.id)).all()
        if rule == "verified" and rows:
            ids, vectors = load_embeddings(conn, latest_feature_model(conn, backbone))
    if not rows:
        return []
    stored = hash_matrix(hash_kind, size, query.bits, [r.hex for r in rows], [r.value for r in rows])
    mine = hash_matrix(hash_kind, size, query.bits, [query.hex], [query.to_signed64()])
    distances = hamming_rows(stored, mine[0])
    if rule == "near":
        near = np.flatnonzero(distances <= max_distance)
        near = near[np.lexsort((near, distances[near]))][:limit]  # nearest first, then lowest id
        return [Match(rows[k].id, rows[k].label, rows[k].source, int(distances[k]), None, "hash") for k in near]

    from .backbones import load_backbone                        # torch and OpenCV: only the verified rule
    from .verify import load_view, make_view, match_geometry
    position = {int(i): k for k, i in enumerate(ids.tolist())}
    keep = [k for k, r in enumerate(rows) if r.id in position]
    if not keep:
        return []
    similarity = vectors[[position[rows[k].id] for k in keep]] @ load_backbone(backbone).embed([image])[0]
    by_hash = set(np.flatnonzero((distances[keep] <= max_distance)
                                 & ~(flat | np.array([rows[k].low_detail for k in keep], dtype=bool))).tolist())
    by_embedding = set(np.argsort(-similarity, kind="stable")[:thresholds.neighbours].tolist())
    mine_view = None
    found = []
    for c in sorted(by_hash | by_embedding, key=lambda c: -similarity[c]):
        row, s = rows[keep[c]], float(similarity[c])
        if s >= thresholds.accept_from:
            method = "embedding"
        elif s >= thresholds.reject_below:
            mine_view = mine_view or make_view(image)
            try:
                if not match_geometry(load_view(db.store.path(row.sha256)), mine_view).matched:
                    continue
            except ImageError:
                continue
            method = "geometry"
        else:
            continue
        found.append(Match(row.id, row.label, row.source, int(distances[keep[c]]), s, method))
    return found[:limit]
