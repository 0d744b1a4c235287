"""The whole workflow in one call: load → hash → featurize → index → dedupe → split → train → fit → evaluate
→ rank.

Featurize comes before dedupe because the default (verified) dedupe rule checks
candidate pairs by their embeddings. A collection without labels skips split,
train and evaluate (and rank, with no query images), and says so.

Each step is the same function the CLI, the PL/Python procedures and the
notebook call; this only runs them in order and gathers their summaries.
Every step is idempotent, so a re-run after an interruption does only the rest.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .db import Database, images, is_unique_image, query_images, recorded_run, splits
from .steps import STEPS, run_params


@dataclass
class PipelineSummary:
    steps: list[tuple[str, float, list[str]]] = field(default_factory=list)  # (step, seconds, lines)
    skipped: list[tuple[str, str]] = field(default_factory=list)             # (step, why)
    interrupted: bool = False

    def lines(self) -> list[str]:
        out = []
        for step, seconds, lines in self.steps:
            out.append(f"[{step}] {seconds:.1f} s")
            out += [f"  {line}" for line in lines]
        out += [f"[{step}] skipped: {why}" for step, why in self.skipped]
        out.append(f"total {sum(s for _, s, _ in self.steps):.1f} s")
        if self.interrupted:
            out.append("interrupted: finished work is kept; run again to do the rest")
        return out


def run_pipeline(db: Database, source: str | Path | None = None, *, progress: bool | None = None,
                 **options) -> PipelineSummary:
    """Run every step; ``source`` (folder or manifest) is loaded first when given.

    ``options`` are the steps' own parameters by their run names (:func:`lookalike.steps.run_params`,
    e.g. ``seed``, ``test_ratio``, ``dedupe_rule``, ``top``); the signature below lists them with
    their defaults.
    """
    from .dedupe import dedupe_images
    from .evaluate import evaluate_model
    from .features import featurize_images
    from .hashing import hash_images
    from .index import refresh_index
    from .ingest import load_images
    from .search import rank_queries
    from .spaces import fit_spaces
    from .split import split_images

    given = RUN_SIGNATURE.bind(db, source, progress=progress, **options)  # TypeError for an unknown option
    given.apply_defaults()
    values = {p.name: p.check(given.arguments[p.name]) for p in run_params()}
    summary = PipelineSummary()

    def kwargs(name: str) -> dict:
        return STEPS[name].kwargs(values, by_run_name=True)

    def step(name: str, call):
        started = time.monotonic()
        try:
            result = call()
        except Exception as exc:   # say what finished before it (the CLI prints the note)
            failed = f"[{name}] failed after {time.monotonic() - started:.1f} s"
            exc.add_note("\n".join(summary.lines()[:-1] + [failed]))
            raise
        summary.steps.append((name, time.monotonic() - started, result.lines()))
        if getattr(result, "interrupted", False):   # Ctrl-C inside a step: keep its work, run nothing after it
            raise _Interrupted
        return result

    recorded = {name: str(value) if isinstance(value, Path) else value for name, value in values.items()}
    with recorded_run(db, "run", recorded) as counts:
        try:
            if source is not None:
                step("load", lambda: load_images(db, **kwargs("load"), progress=progress))
            step("hash", lambda: hash_images(db, **kwargs("hash"), progress=progress))
            step("featurize", lambda: featurize_images(db, **kwargs("featurize"), progress=progress))
            if values["dedupe_rule"] == "verified" and values["dedupe_backbone"] != values["backbone"]:
                step("featurize", lambda: featurize_images(db, **{**kwargs("featurize"),
                                                                  "backbone": values["dedupe_backbone"]},
                                                           progress=progress))
            # Now, not on the first search after the run: build the vector index or catch it up.
            step("index", lambda: refresh_index(db, backbone=values["backbone"]))
            step("dedupe", lambda: dedupe_images(db, **kwargs("dedupe"), progress=progress))
            labelled = has_labels(db)   # without labels: similar, duplicates and export need none of these
            if labelled:
                step("split", lambda: split_images(db, **kwargs("split")))
                from .classify import train_classifier   # here: scikit-learn and skops only where there are labels
                step("train", lambda: train_classifier(db, **kwargs("train")))
            step("fit", lambda: fit_spaces(db, **kwargs("fit"), progress=progress))   # learned needs the split
            if labelled:
                step("evaluate", lambda: evaluate_model(db, **kwargs("evaluate")))
            else:
                summary.skipped += [(name, f"no image has a label ({name} needs labels)")
                                    for name in ("split", "train", "evaluate")]
            default_queries(db)
            if has_queries(db):
                step("rank", lambda: rank_queries(db, **kwargs("rank")))
            else:
                summary.skipped.append(("rank", "no query images (add some with `lookalike query add`)"))
        except _Interrupted:
            summary.interrupted = True
        counts.update(steps=[name for name, _, _ in summary.steps], skipped=[name for name, _ in summary.skipped],
                      interrupted=summary.interrupted)
    return summary


# What run_pipeline accepts, from the registry: help(), inspect and bind() see every option and its default.
_KEYWORD = inspect.Parameter.KEYWORD_ONLY
RUN_SIGNATURE = inspect.Signature(
    [inspect.Parameter("db", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
     inspect.Parameter("progress", _KEYWORD, default=None)]
    + [inspect.Parameter(p.name, _KEYWORD, default=p.default) for p in run_params() if p.name != "source"])
run_pipeline.__signature__ = RUN_SIGNATURE


class _Interrupted(Exception):
    pass


def has_labels(db: Database) -> bool:
    """Whether any unique image has a label (split, train and evaluate need them)."""
    with db.engine.connect() as conn:
        return conn.execute(sa.select(images.c.id).where(
            is_unique_image(), images.c.label.is_not(None), images.c.label != "").limit(1)).first() is not None


def has_queries(db: Database) -> bool:
    with db.engine.connect() as conn:
        return conn.execute(sa.select(query_images.c.id).limit(1)).first() is not None


def default_queries(db: Database) -> None:
    """With no queries given, rank the test split (as the original ranked its test images)."""
    from .search import add_queries
    if has_queries(db):
        return
    with db.engine.connect() as conn:
        test_ids = conn.execute(sa.select(splits.c.image_id).where(splits.c.split == "test")
                                .order_by(splits.c.image_id)).scalars().all()
    if test_ids:
        add_queries(db, [str(i) for i in test_ids])
