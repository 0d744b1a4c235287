"""The whole workflow in one call: load → hash → featurize → dedupe → split → train → evaluate → rank.

Featurize comes before dedupe because the default (verified) dedupe rule checks
candidate pairs by their embeddings.

Each step is the same function the CLI, the PL/Python procedures and the
notebook call; this only runs them in order and gathers their summaries.
Every step is idempotent, so a re-run after an interruption does only the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .db import Database, query_images, recorded_run, splits
from .dedupe import DEFAULT_BACKBONE as DEDUPE_BACKBONE, DEFAULT_RULE


@dataclass
class PipelineSummary:
    steps: list[tuple[str, float, list[str]]] = field(default_factory=list)  # (step, seconds, lines)
    interrupted: bool = False

    def lines(self) -> list[str]:
        out = []
        for step, seconds, lines in self.steps:
            out.append(f"[{step}] {seconds:.1f} s")
            out += [f"  {line}" for line in lines]
        out.append(f"total {sum(s for _, s, _ in self.steps):.1f} s")
        if self.interrupted:
            out.append("interrupted: finished work is kept; run again to do the rest")
        return out


def run_pipeline(db: Database, source: str | Path | None = None, *, seed: int = 0, test_ratio: float = 0.25,
                 dedupe_rule: str = DEFAULT_RULE, dedupe_hash: str | None = None, dedupe_size: int | None = None,
                 max_distance: int | None = None, dedupe_backbone: str = DEDUPE_BACKBONE,
                 top: int = 10, queries_per_label: int = 20,
                 negatives_per_query: int = 100, plot: Path | None = None,
                 progress: bool | None = None, device: str = "cpu",
                 backbone: str = "efficientnet-lite0") -> PipelineSummary:
    """Run every step; ``source`` (folder or manifest) is loaded first when given."""
    from .classify import train_classifier
    from .dedupe import dedupe_images
    from .evaluate import evaluate_model
    from .features import featurize_images
    from .hashing import hash_images
    from .ingest import load_images
    from .search import rank_queries
    from .split import split_images

    summary = PipelineSummary()

    def step(name: str, call):
        started = time.monotonic()
        result = call()
        summary.steps.append((name, time.monotonic() - started, result.lines()))
        if getattr(result, "interrupted", False):   # Ctrl-C inside a step: keep its work, run nothing after it
            raise _Interrupted
        return result

    params = dict(source=str(source) if source else None, seed=seed, test_ratio=test_ratio, rule=dedupe_rule,
                  hash=dedupe_hash, size=dedupe_size, max_distance=max_distance, dedupe_backbone=dedupe_backbone,
                  top=top, backbone=backbone)
    with recorded_run(db, "run", params) as counts:
        try:
            if source is not None:
                step("load", lambda: load_images(db, source, progress=progress))
            step("hash", lambda: hash_images(db, progress=progress))
            step("featurize", lambda: featurize_images(db, backbone=backbone, device=device, progress=progress))
            if dedupe_rule == "verified" and dedupe_backbone != backbone:
                step("featurize", lambda: featurize_images(db, backbone=dedupe_backbone, device=device,
                                                           progress=progress))
            step("dedupe", lambda: dedupe_images(
                db, rule=dedupe_rule, hash_kind=dedupe_hash, size=dedupe_size, max_distance=max_distance,
                backbone=dedupe_backbone, progress=progress))
            step("split", lambda: split_images(db, test_ratio=test_ratio, seed=seed))
            step("train", lambda: train_classifier(db, feature_model=backbone, seed=seed))
            step("evaluate", lambda: evaluate_model(db, queries_per_label=queries_per_label,
                                                    negatives_per_query=negatives_per_query, seed=seed,
                                                    feature_model=backbone, plot=plot))
            default_queries(db)
            step("rank", lambda: rank_queries(db, top=top, backbone=backbone))
        except _Interrupted:
            summary.interrupted = True
        counts.update(steps=[name for name, _, _ in summary.steps], interrupted=summary.interrupted)
    return summary


class _Interrupted(Exception):
    pass


def default_queries(db: Database) -> None:
    """With no queries given, rank the test split (as the original ranked its test images)."""
    from .search import add_queries
    with db.engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(query_images)).scalar():
            return
        test_ids = conn.execute(sa.select(splits.c.image_id).where(splits.c.split == "test")
                                .order_by(splits.c.image_id)).scalars().all()
    if test_ids:
        add_queries(db, [str(i) for i in test_ids])
