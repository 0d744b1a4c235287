"""What the dedupe step found, for people and scripts: duplicate groups as text, JSON, CSV or a page of
thumbnails (sorted by size or by doubt, a page at a time), unique counts as a plot."""

from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import sqlalchemy as sa

from .db import Database, dedupe_runs, group_member_rows, image_sources, latest_dedupe_run
from .errors import BadInput
from .images import ImageError, thumbnail_jpeg
from .steps import STEPS, default

if TYPE_CHECKING:   # listing groups needs none of dedupe's NumPy/SciPy imports
    from .dedupe import UniqueCounts

THUMBNAIL_SIZE = 160   # longest side, pixels
THUMBNAIL_QUALITY = 80


@dataclass(frozen=True)
class Member:
    image_id: int
    label: str | None
    width: int | None
    height: int | None
    byte_size: int
    format: str | None
    sha256: str
    source: str
    is_keeper: bool
    distance: int            # Hamming distance to the keeper
    score: float | None = None        # the similarity that decided (verified rule)
    verified_by: str | None = None    # what put it in the group: embedding | geometry | review

    def as_dict(self, db: Database, sources: dict[int, list[str]]) -> dict:
        return dict(image_id=self.image_id, is_keeper=self.is_keeper, distance=self.distance, score=self.score,
                    verified_by=self.verified_by, label=self.label, width=self.width, height=self.height,
                    byte_size=self.byte_size, format=self.format, sha256=self.sha256,
                    path=str(db.store.path(self.sha256)), source=self.source,
                    sources=sources.get(self.image_id, [self.source]))


@dataclass(frozen=True)
class Group:
    run_id: int
    group_id: int
    members: tuple[Member, ...]   # the keeper first, then by distance and id

    @property
    def keeper(self) -> Member:
        return self.members[0]

    @property
    def duplicates(self) -> tuple[Member, ...]:
        return self.members[1:]

    @property
    def doubt(self) -> tuple:
        """Sort key, most doubtful first: the lowest score a rule gave a member, then the widest distance;
        a group people confirmed in full comes last."""
        judged = [m for m in self.duplicates if m.verified_by != "review"]
        scores = [m.score for m in judged if m.score is not None]
        return (not judged, min(scores, default=math.inf), -max((m.distance for m in judged), default=0),
                self.group_id)


SORTS = {"size": lambda g: (-len(g.members), g.group_id), "doubt": lambda g: g.doubt, "id": lambda g: g.group_id}


def duplicate_groups_report(db: Database, run_id: int | None = None, *, sort: str = default("duplicates", "sort"),
                            limit: int | None = default("duplicates", "limit"),
                            offset: int = default("duplicates", "offset")) -> list[Group]:
    """A page of the groups of a dedupe run (the latest by default); empty when there is no run.

    ``sort``: ``size`` (largest first), ``doubt`` (lowest score first: :attr:`Group.doubt`) or
    ``id``; then ``offset`` groups are skipped and at most ``limit`` returned (None: all).
    """
    STEPS["duplicates"].param("sort").check(sort)
    with db.engine.connect() as conn:
        if run_id is None:
            run_id = conn.execute(sa.select(latest_dedupe_run())).scalar()
            if run_id is None:
                return []
        rows = group_member_rows(conn, run_id)
    groups: dict[int, list[Member]] = {}
    for r in rows:
        groups.setdefault(r.group_id, []).append(Member(
            r.id, r.label, r.width, r.height, r.byte_size, r.format, r.sha256, r.source, bool(r.is_keeper),
            r.distance, r.score, r.verified_by))
    found = sorted((Group(run_id, group_id, tuple(members)) for group_id, members in groups.items()),
                   key=SORTS[sort])
    return found[offset:] if limit is None else found[offset:offset + limit]


def run_groups_total(db: Database, run_id: int | None = None) -> int:
    """How many groups a dedupe run (the latest by default) has; 0 before any."""
    with db.engine.connect() as conn:
        run_id = run_id or conn.execute(sa.select(latest_dedupe_run())).scalar()
        return conn.execute(sa.select(dedupe_runs.c.groups).where(dedupe_runs.c.id == run_id)).scalar() or 0


def _sources(db: Database, groups: list[Group]) -> dict[int, list[str]]:
    """Every ok source of the groups' images, by image id."""
    ids = sorted({m.image_id for g in groups for m in g.members})
    out: dict[int, list[str]] = {}
    with db.engine.connect() as conn:
        for start in range(0, len(ids), 500):   # bounded IN lists (SQLite caps bound parameters)
            for image_id, source in conn.execute(
                    sa.select(image_sources.c.image_id, image_sources.c.source)
                    .where(image_sources.c.image_id.in_(ids[start:start + 500]), image_sources.c.status == "ok")
                    .order_by(image_sources.c.id)):
                out.setdefault(image_id, []).append(source)
    return out


def groups_json(db: Database, groups: list[Group], *, sort: str, offset: int, total: int) -> dict:
    """The groups as one JSON object: each with its keeper and members, their store paths and sources."""
    sources = _sources(db, groups)
    return {"run_id": groups[0].run_id if groups else None, "groups_total": total, "sort": sort, "offset": offset,
            "groups": [{"group_id": g.group_id, "size": len(g.members), "keeper": g.keeper.image_id,
                        "members": [m.as_dict(db, sources) for m in g.members]} for g in groups]}


CSV_COLUMNS = ("run_id", "group_id", "size", "image_id", "is_keeper", "distance", "score", "verified_by", "label",
               "width", "height", "byte_size", "format", "sha256", "path", "source")


def groups_csv(db: Database, groups: list[Group]) -> str:
    """The groups as CSV, one row per member (the keeper first in each group)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for g in groups:
        for m in g.members:
            writer.writerow(dict(m.as_dict(db, {}), run_id=g.run_id, group_id=g.group_id, size=len(g.members)))
    return out.getvalue()


def _thumbnail_file(db: Database, sha256: str, folder: Path) -> str | None:
    """A small JPEG of the stored image in ``folder`` (written once, named by content); None when unreadable."""
    path = folder / f"{sha256}.jpg"
    if not path.exists():
        try:
            thumbnail = thumbnail_jpeg(db.store.get(sha256), THUMBNAIL_SIZE, THUMBNAIL_QUALITY)
        except (FileNotFoundError, ImageError):
            return None
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_bytes(thumbnail)
        partial.replace(path)
    return f"{quote(folder.name)}/{path.name}"


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section.group { border-top: 1px solid #ccc; padding: 0.8em 0; }
.members { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; padding: 6px; border: 3px solid transparent; width: 172px; font-size: 12px; }
figure.keeper { border-color: #2a8a3e; background: #eef8f0; }
figure img { display: block; max-width: 160px; max-height: 160px; margin: 0 auto 4px; }
.badge { display: inline-block; background: #2a8a3e; color: #fff; border-radius: 3px; padding: 0 5px; }
.missing { width: 160px; height: 100px; background: #eee; display: flex; align-items: center;
           justify-content: center; color: #888; }
.source { color: #777; word-break: break-all; }
"""


def write_html(groups: list[Group], path: str | Path, db: Database) -> Path:
    """Write a page with one section per group: thumbnails, the keeper marked, sizes, distances, scores.

    Thumbnails are small JPEG files in a folder beside the page (``<page>_thumbnails/``), linked, not
    inlined, so the page stays small; they are written once and named by content.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a folder; give the HTML file to write")
    folder = path.with_name(path.stem + "_thumbnails")
    sections = []
    for group in groups:
        figures = []
        for m in group.members:
            uri = _thumbnail_file(db, m.sha256, folder)
            picture = (f'<img src="{uri}" alt="image {m.image_id}" loading="lazy">' if uri
                       else '<div class="missing">not in the store</div>')
            badge = '<span class="badge">keeper</span> ' if m.is_keeper else ""
            size = f"{m.width}×{m.height}" if m.width and m.height else "size unknown"
            figures.append(
                f'<figure class="{"keeper" if m.is_keeper else "duplicate"}" data-image-id="{m.image_id}">'
                f"{picture}<figcaption>{badge}#{m.image_id} · {html.escape(m.label or '(no label)')}<br>"
                f"{size} · {m.byte_size:,} bytes · {html.escape(m.format or '?')}<br>"
                f"distance {m.distance}{_decided(m)}<br><span class=\"source\">{html.escape(m.source)}</span>"
                f"</figcaption></figure>")
        sections.append(f'<section class="group" id="group-{group.group_id}">'
                        f"<h2>Group {group.group_id} · {len(group.members)} images</h2>"
                        f'<div class="members">{"".join(figures)}</div></section>')
    run = f"dedupe run {groups[0].run_id}" if groups else "no duplicate groups"
    duplicates = sum(len(g.duplicates) for g in groups)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Duplicate groups</title>'
            f"<style>{_PAGE_STYLE}</style></head><body><h1>Duplicate groups</h1>"
            f"<p>{run}: {len(groups)} groups, {duplicates} duplicates; the keeper of each group is "
            f"marked.</p>{''.join(sections)}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _decided(m: Member) -> str:
    score = "" if m.score is None else f" · score {m.score:.3f}"
    return score + ("" if m.verified_by is None else f" · by {html.escape(m.verified_by)}")


def plot_unique_counts(table: UniqueCounts, path: str | Path) -> Path:
    """Plot unique images per label against hash size (one line per label) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sizes = sorted(table.sizes)
    for label in table.labels:
        axes.plot(sizes, [table.unique[label].get(s, 0) for s in sizes], marker="o", label=label or "(no label)")
    axes.set_xlabel(f"{table.hash_kind} size")
    axes.set_ylabel("unique images")
    axes.set_xticks(sizes)
    axes.set_title("Unique images per label by hash size")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
