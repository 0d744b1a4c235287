"""Review step: people's decisions on duplicate groups, which every later dedupe run honours.

Three decisions, each a row of ``duplicate_decisions`` with who, when and an optional note:

- ``not_duplicate``: an image is not a copy of the other members of its group; one row per pair
  (the image and each other member). A later run never puts such a pair in one group.
- ``keep_this``: an image is its group's keeper, whatever the keeper order says.
- ``confirmed``: the group is right; one row per pair (keeper and member). A later run keeps each
  pair in one group: a member joins its confirmed partner's group before any other match.

The latest decision on a pair is the one in force (a confirmation after a rejection wins); of two
images to keep in one group, the later decision wins. A decision also changes the latest run's
groups at once, so ``removable`` and the ``unique_images`` view follow it without another dedupe
run. Nothing is ever deleted from the store or the disk: ``removable`` only lists the non-keepers,
with their paths and sources, for a script to act on.
"""

from __future__ import annotations

import getpass
import unicodedata
from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .db import (Database, dedupe_runs, duplicate_decisions, duplicate_groups, image_hashes, image_sources, images,
                 latest_dedupe_run, now, recorded_run)
from .errors import BadInput, NotFound, Precondition
from .hamming import hamming_hex

DECISIONS = ("not_duplicate", "keep_this", "confirmed")
REVIEWED = "review"       # duplicate_groups.verified_by of what a person decided
MAX_NAME = 64             # characters of who decided
MAX_NOTE = 1000           # characters of a note
SHOWN_MEMBERS = 20        # members named in an error


def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class Review:
    """The decisions in force, by image id."""

    apart: frozenset[tuple[int, int]] = frozenset()      # pairs (low, high) never in one group
    together: frozenset[tuple[int, int]] = frozenset()   # pairs (low, high) kept in one group
    keep: dict[int, int] = field(default_factory=dict)   # image to keep -> its decision id (later wins)

    def __bool__(self) -> bool:
        return bool(self.apart or self.together or self.keep)

    def ids(self) -> set[int]:
        return {i for p in self.apart | self.together for i in p} | set(self.keep)


def load_review(conn: Connection) -> Review:
    """The decisions in force: the latest per pair, every image to keep."""
    pairs: dict[tuple[int, int], str] = {}
    keep: dict[int, int] = {}
    for decision_id, decision, image_id, other_id in conn.execute(
            sa.select(duplicate_decisions.c.id, duplicate_decisions.c.decision, duplicate_decisions.c.image_id,
                      duplicate_decisions.c.other_id).order_by(duplicate_decisions.c.id)):
        if decision == "keep_this":
            keep[image_id] = decision_id
        else:
            pairs[pair(image_id, other_id)] = decision
    return Review(frozenset(p for p, d in pairs.items() if d == "not_duplicate"),
                  frozenset(p for p, d in pairs.items() if d == "confirmed"), keep)


def _text(name: str, value: str, limit: int) -> str:
    value = value.strip()
    if not value:
        raise BadInput(f"{name} must not be empty")
    if len(value) > limit:
        raise BadInput(f"{name} must be at most {limit} characters, not {len(value)}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise BadInput(f"{name} must be one line of text, without control characters")
    return value


def reviewer(by: str | None) -> str:
    """Who decides: ``by`` checked, or the OS user."""
    if by is None:
        try:
            by = getpass.getuser()
        except (KeyError, OSError):   # no login name and no passwd entry (some containers)
            by = "unknown"
    return _text("by", by, MAX_NAME)


# ---- the step ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ReviewOutcome:
    run_id: int
    group_id: int                 # the group reviewed
    decision: str
    image_id: int | None          # the image decided on (confirmed: None, the whole group)
    decided_by: str
    recorded: int                 # decision rows written
    group: int | None             # the group's id in the run afterwards; None: no longer a group

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        what = {"not_duplicate": f"image {self.image_id} is not a duplicate",
                "keep_this": f"keep image {self.image_id}", "confirmed": "confirmed"}[self.decision]
        after = "no longer a group" if self.group is None else f"now group {self.group}"
        return [f"group {self.group_id} of dedupe run {self.run_id}: {what} (by {self.decided_by}); {after}; "
                f"{self.recorded} decision(s) recorded, honoured by later dedupe runs"]


def review_group(db: Database, group_id: int, *, not_duplicate: int | None = None, keep: int | None = None,
                 confirm: bool = False, by: str | None = None, note: str | None = None) -> ReviewOutcome:
    """Record one decision on group ``group_id`` of the latest dedupe run, and apply it to that run's groups.

    Exactly one of: ``not_duplicate`` (an image of the group that is not a copy of the others),
    ``keep`` (the image to keep), ``confirm`` (the group is right). ``by`` is who decides (default:
    the OS user). Raises ``NotFound`` for a group the latest run does not have, ``BadInput`` for an
    image not in it.
    """
    given = [name for name, present in (("not_duplicate", not_duplicate is not None), ("keep", keep is not None),
                                        ("confirm", bool(confirm))) if present]
    if len(given) != 1:
        raise BadInput("give exactly one decision: --not-duplicate IMAGE, --keep IMAGE or --confirm"
                       + (f" (got {', '.join(given)})" if given else ""))
    decision = {"not_duplicate": "not_duplicate", "keep": "keep_this", "confirm": "confirmed"}[given[0]]
    image = not_duplicate if not_duplicate is not None else keep
    who = reviewer(by)
    note = None if note is None or not note.strip() else _text("note", note, MAX_NOTE)
    with recorded_run(db, "review", dict(group_id=group_id, decision=decision, image_id=image, by=who)) as counts:
        with db.begin() as conn:
            run_id = conn.execute(sa.select(latest_dedupe_run())).scalar()
            if run_id is None:
                raise Precondition("no dedupe run to review: run `lookalike dedupe` first")
            ids = list(conn.execute(
                sa.select(duplicate_groups.c.image_id)
                .where(duplicate_groups.c.run_id == run_id, duplicate_groups.c.group_id == group_id)
                .order_by(duplicate_groups.c.is_keeper.desc(), duplicate_groups.c.image_id)
                .with_for_update()).scalars())   # two reviewers of one group: one after the other
            if not ids:
                raise NotFound(f"no group {group_id} in the latest dedupe run ({run_id})")
            if image is not None and image not in ids:
                shown = ", ".join(map(str, ids[:SHOWN_MEMBERS])) + (", …" if len(ids) > SHOWN_MEMBERS else "")
                raise BadInput(f"image {image} is not in group {group_id} (its images: {shown})")
            keeper = ids[0]
            if decision == "not_duplicate":
                rows = [dict(image_id=image, other_id=other) for other in ids if other != image]
            elif decision == "keep_this":
                rows = [dict(image_id=image, other_id=None)]
            else:
                rows = [dict(image_id=member, other_id=keeper) for member in ids[1:]]
            stamp = dict(decision=decision, run_id=run_id, group_id=group_id, decided_by=who, decided_at=now(),
                         note=note)
            conn.execute(sa.insert(duplicate_decisions), [dict(row, **stamp) for row in rows])
            group = _apply(conn, run_id, group_id, ids, decision, image)
            _recount(conn, run_id)
        counts.update(run_id=run_id, recorded=len(rows), group=group)
    return ReviewOutcome(run_id, group_id, decision, image, who, len(rows), group)


def _in_group(run_id: int, group_id: int) -> list[sa.ColumnElement[bool]]:
    return [duplicate_groups.c.run_id == run_id, duplicate_groups.c.group_id == group_id]


def _apply(conn: Connection, run_id: int, group_id: int, ids: list[int], decision: str,
           image: int | None) -> int | None:
    """Change the run's group as a new run would; the group's id afterwards (None: dissolved)."""
    keeper = ids[0]
    if decision == "confirmed":
        conn.execute(sa.update(duplicate_groups).where(*_in_group(run_id, group_id), ~duplicate_groups.c.is_keeper)
                     .values(verified_by=REVIEWED))
        return group_id
    if decision == "not_duplicate":
        # Apart from every other member: out of the group; a keeper apart from all leaves no group
        # (the others matched the keeper, not one another, until the next dedupe run says so).
        if image == keeper or len(ids) <= 2:
            conn.execute(sa.delete(duplicate_groups).where(*_in_group(run_id, group_id)))
            return None
        conn.execute(sa.delete(duplicate_groups).where(*_in_group(run_id, group_id),
                                                       duplicate_groups.c.image_id == image))
        return group_id
    # keep_this: the image becomes the keeper, the group takes its id, distances are to it.
    run = conn.execute(sa.select(dedupe_runs.c.hash_kind, dedupe_runs.c.hash_size)
                       .where(dedupe_runs.c.id == run_id)).one()
    hexes = dict(conn.execute(sa.select(image_hashes.c.image_id, image_hashes.c.hex).where(
        image_hashes.c.kind == run.hash_kind, image_hashes.c.size == run.hash_size,
        image_hashes.c.image_id.in_(ids))).all())
    for member in ids:
        values: dict = dict(group_id=image, is_keeper=member == image)
        if member in hexes and image in hexes:
            values["distance"] = hamming_hex(hexes[member], hexes[image])
        if member in (image, keeper):
            values.update(score=None, verified_by=REVIEWED)
        conn.execute(sa.update(duplicate_groups).where(*_in_group(run_id, group_id),
                                                       duplicate_groups.c.image_id == member).values(**values))
    return image


def _recount(conn: Connection, run_id: int) -> None:
    groups, members = conn.execute(
        sa.select(sa.func.count(sa.distinct(duplicate_groups.c.group_id)), sa.func.count())
        .where(duplicate_groups.c.run_id == run_id)).one()
    conn.execute(sa.update(dedupe_runs).where(dedupe_runs.c.id == run_id)
                 .values(groups=groups, duplicates=members - groups))


# ---- what people decided, and what a script may remove --------------------------------------

@dataclass(frozen=True)
class Decision:
    id: int
    decision: str
    image_id: int
    other_id: int | None
    run_id: int | None
    group_id: int | None
    decided_by: str
    decided_at: str
    note: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def list_decisions(db: Database) -> list[Decision]:
    """Every decision recorded, oldest first."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(duplicate_decisions).order_by(duplicate_decisions.c.id)).all()
    return [Decision(r.id, r.decision, r.image_id, r.other_id, r.run_id, r.group_id, r.decided_by,
                     r.decided_at.isoformat(timespec="seconds"), r.note) for r in rows]


@dataclass(frozen=True)
class Removable:
    image_id: int
    group_id: int
    keeper_id: int
    label: str | None
    sha256: str
    path: str                     # the bytes in the image store
    source: str                   # the first source the image came from
    sources: tuple[str, ...]      # every source that gave these bytes

    def as_dict(self) -> dict:
        return dict(asdict(self), sources=list(self.sources))


def removable_images(db: Database) -> list[Removable]:
    """The non-keepers of the latest dedupe run (decisions applied), by group: what a script may remove.

    The product removes nothing itself. Empty before any dedupe run.
    """
    keepers = duplicate_groups.alias("keepers")
    with db.engine.connect() as conn:
        run_id = conn.execute(sa.select(latest_dedupe_run())).scalar()
        if run_id is None:
            return []
        where = [duplicate_groups.c.run_id == run_id, ~duplicate_groups.c.is_keeper]
        rows = conn.execute(
            sa.select(duplicate_groups.c.image_id, duplicate_groups.c.group_id, keepers.c.image_id.label("keeper"),
                      images.c.label, images.c.sha256, images.c.source)
            .join(images, images.c.id == duplicate_groups.c.image_id)
            .join(keepers, sa.and_(keepers.c.run_id == duplicate_groups.c.run_id,
                                   keepers.c.group_id == duplicate_groups.c.group_id, keepers.c.is_keeper))
            .where(*where).order_by(duplicate_groups.c.group_id, duplicate_groups.c.image_id)).all()
        sources: dict[int, list[str]] = {}
        for image_id, source in conn.execute(
                sa.select(image_sources.c.image_id, image_sources.c.source)
                .join(duplicate_groups, duplicate_groups.c.image_id == image_sources.c.image_id)
                .where(*where, image_sources.c.status == "ok").order_by(image_sources.c.id)):
            sources.setdefault(image_id, []).append(source)
    return [Removable(r.image_id, r.group_id, r.keeper, r.label, r.sha256, str(db.store.path(r.sha256)), r.source,
                      tuple(sources.get(r.image_id, [r.source]))) for r in rows]
