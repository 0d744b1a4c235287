"""What the dedupe step found, for people: duplicate groups as a page of thumbnails, unique counts as a plot."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from .db import Database, group_member_rows, latest_dedupe_run
from .dedupe import UniqueCounts
from .images import ImageError, thumbnail_jpeg

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


def duplicate_groups_report(db: Database, run_id: int | None = None) -> list[Group]:
    """The groups of a dedupe run (the latest by default), by group id; empty when there is no run."""
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
            r.distance))
    return [Group(run_id, group_id, tuple(members)) for group_id, members in groups.items()]


def _thumbnail_uri(db: Database, sha256: str) -> str | None:
    """A small JPEG of the stored image as a data: URI, or None when it cannot be read."""
    try:
        thumbnail = thumbnail_jpeg(db.store.get(sha256), THUMBNAIL_SIZE, THUMBNAIL_QUALITY)
    except (FileNotFoundError, ImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode("ascii")


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
    """Write a page with one section per group: thumbnails, the keeper marked, sizes and distances."""
    sections = []
    for group in groups:
        figures = []
        for m in group.members:
            uri = _thumbnail_uri(db, m.sha256)
            picture = (f'<img src="{uri}" alt="image {m.image_id}">' if uri
                       else '<div class="missing">not in the store</div>')
            badge = '<span class="badge">keeper</span> ' if m.is_keeper else ""
            size = f"{m.width}×{m.height}" if m.width and m.height else "size unknown"
            figures.append(
                f'<figure class="{"keeper" if m.is_keeper else "duplicate"}" data-image-id="{m.image_id}">'
                f"{picture}<figcaption>{badge}#{m.image_id} · {html.escape(m.label or '(no label)')}<br>"
                f"{size} · {m.byte_size:,} bytes · {html.escape(m.format or '?')}<br>"
                f"distance {m.distance}<br><span class=\"source\">{html.escape(m.source)}</span>"
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


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
