"""Retrieval quality of every similarity space, on the sample set and on real texture photographs.

Runs the whole pipeline (load, hash, featurize, dedupe, split, train, fit,
evaluate) into a throwaway SQLite file for each set, and prints the ranking
protocol's top-1 / top-5 / mean rank (cosine, 1 positive + 100 negatives, 20
queries per label) and mAP@10 for each space, the default that evaluate chose
marked. Then the label-free case: the same real set loaded without labels,
where ``fit`` makes the pca space only and ``similar`` uses it, scored against
the raw embeddings by nearest-neighbour label agreement (the labels are read
back from the manifest, never given to lookalike).

Sets:
- sample: the rendered garments (100 originals per label, --quick: 40);
- texture: bench/texture_devset.py (material photographs from the Debian package
  ufoai-textures, labelled by material; built on first use, 336 MB download).

Targets (issue 15): default space top-1 >= 0.90 on both sets; pca beats the raw embeddings label-free.

    python bench/bench_spaces.py [--quick] [--sets sample,texture] [--backbone efficientnet-lite0-dual]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from texture_devset import build_texture_devset  # noqa: E402

from lookalike.config import DEFAULT_BACKBONE  # noqa: E402
from lookalike.db import (Database, evaluation_pairs, evaluations, images, latest_feature_model,  # noqa: E402
                          load_embeddings, models, scores)
from lookalike.pipeline import run_pipeline  # noqa: E402
from lookalike.samples import render_samples  # noqa: E402
from lookalike.projection import load_space  # noqa: E402

MEASURES = ("top1", "top5", "mean_rank", "map@10")


def quality_table(manifest: Path, work: Path, name: str, backbone: str) -> None:
    started = time.monotonic()
    with Database(f"sqlite:///{work}/{name}.db", work / f"{name}-store") as db:
        summary = run_pipeline(db, manifest, seed=0, backbone=backbone, progress=False)
        evaluation = next(lines for step, _, lines in summary.steps if step == "evaluate")
        intruders = label_intruders(db)
    print(f"\n{name}: {evaluation[0]} ({time.monotonic() - started:.0f} s)")
    print(f"  {'space':<11}" + "".join(f"{m:>10}" for m in MEASURES))
    for line in evaluation[2:]:
        cells = line.split()
        if len(cells) > 2 and cells[1] == "cosine":
            values = dict(zip(["top1", "top2", "top4", "top5", "top8", "top10", "top15", "top20", "top28", "top32",
                               "mean_rank", "median_rank", "map@10", "recall@10"], cells[2:]))
            print(f"  {cells[0]:<11}" + "".join(f"{values[m]:>10}" for m in MEASURES))
    print("\n".join(line for line in evaluation if "default space" in line or "note" in line))
    print(intruders)


def label_intruders(db: Database) -> str:
    """What holds a label-aware space's top-1 down: the classifier's test accuracy, and how many of a query's
    negatives it predicts as the query's own label. In the space such a negative lands near the query, as the
    positive does, and the positive must outrank all of them: with N labels and 100 negatives, an accuracy
    a leaves about 100 (1 - a) / (N - 1) of them a query."""
    with db.engine.connect() as conn:
        evaluation_id, model_id = conn.execute(sa.select(evaluations.c.id, evaluations.c.model_id)
                                               .order_by(evaluations.c.id.desc()).limit(1)).one()
        accuracy = conn.execute(sa.select(models.c.test_accuracy).where(models.c.id == model_id)).scalar_one()
        predicted = dict(conn.execute(sa.select(scores.c.image_id, scores.c.predicted)
                                      .where(scores.c.model_id == model_id)).all())
        label = dict(conn.execute(sa.select(images.c.id, images.c.label)).all())
        pairs = conn.execute(sa.select(evaluation_pairs.c.query_id, evaluation_pairs.c.candidate_id)
                             .where(evaluation_pairs.c.evaluation_id == evaluation_id,
                                    evaluation_pairs.c.is_positive.is_(False))).all()
    per_query: dict[int, int] = {}
    for query, candidate in pairs:
        per_query[query] = per_query.get(query, 0) + (predicted[candidate] == label[query])
    return (f"  classifier: test accuracy {accuracy:.3f}; negatives predicted as the query's own label: "
            f"{np.mean(list(per_query.values())):.2f} a query, none for {np.mean([n == 0 for n in per_query.values()]):.3f} "
            f"of queries")


def label_free(manifest: Path, work: Path, backbone: str) -> None:
    """The set loaded as a flat folder: pca against raw embeddings, by nearest-neighbour label agreement."""
    label_of_file = {}
    with open(manifest, newline="") as f:
        for label, path in csv.reader(f, delimiter="\t"):
            label_of_file[Path(path).name] = label
    flat = work / "flat"
    flat.mkdir()
    for label_dir in manifest.parent.iterdir():
        if label_dir.is_dir():
            for image in label_dir.iterdir():
                (flat / image.name).symlink_to(image)
    with Database(f"sqlite:///{work}/flat.db", work / "flat-store") as db:
        summary = run_pipeline(db, flat, seed=0, backbone=backbone, progress=False)
        with db.engine.connect() as conn:
            model_id = latest_feature_model(conn, backbone)
            space = load_space(conn, "pca", model_id)
            ids, raw = load_embeddings(conn, model_id)
            names = dict(conn.execute(sa.select(images.c.id, images.c.source)).all())
    labels = np.array([label_of_file[Path(names[i]).name] for i in ids.tolist()])
    skipped = ", ".join(name for name, _ in summary.skipped)
    print(f"\nlabel-free ({len(ids)} images, run skipped: {skipped}): share of images whose nearest other image "
          f"has the same material, and mean same-material share of the top 10")
    for name, vectors in (("embeddings", raw), ("pca", space.project(raw))):
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        top10 = np.argsort(-sims, axis=1)[:, :10]
        same = labels[top10] == labels[:, None]
        print(f"  {name:<11} nn {same[:, 0].mean():.3f}   top10 {same.mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 sample originals per label instead of 100")
    parser.add_argument("--sets", default="sample,texture", help="comma-separated: sample, texture")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="the feature model every space is fitted on")
    args = parser.parse_args()
    sets = args.sets.split(",")
    print(f"backbone: {args.backbone}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "sample" in sets:
            samples = render_samples(work / "samples", per_label=40 if args.quick else 100, seed=0)
            quality_table(samples.manifest, work, "sample", args.backbone)
        if "texture" in sets:
            manifest = build_texture_devset()
            quality_table(manifest, work, "texture", args.backbone)
            label_free(manifest, work, args.backbone)


if __name__ == "__main__":
    main()
