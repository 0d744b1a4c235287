"""Retrieval quality on the sample set: the evaluate step's top-k table for each backbone.

Renders the sample set (100 originals per label, --quick: 40), runs the whole
pipeline into a throwaway SQLite file once per backbone, and prints top-1
accuracy (cosine) on embeddings and on classifier scores, plus the classifier's
test accuracy and nearest-neighbour label accuracy. Target: top-1 >= 0.90.

    python bench/bench_evaluate.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from lookalike.backbones import available_backbones
from lookalike.db import Database, evaluation_results, images, models, splits
from lookalike.db import latest_feature_model, load_embeddings
from lookalike.pipeline import run_pipeline
from lookalike.samples import render_samples


def nearest_neighbour_accuracy(db: Database, backbone: str) -> float:
    """Share of test images whose nearest other test image (cosine) has the same label."""
    with db.engine.connect() as conn:
        ids, matrix = load_embeddings(conn, latest_feature_model(conn, backbone))
        test = dict(conn.execute(sa.select(images.c.id, images.c.label).join(splits, splits.c.image_id == images.c.id)
                                 .where(splits.c.split == "test")).all())
    keep = np.isin(ids, list(test))
    ids, matrix = ids[keep], matrix[keep]
    sims = matrix @ matrix.T
    np.fill_diagonal(sims, -2)
    labels = np.array([test[i] for i in ids])
    return float(np.mean(labels[sims.argmax(1)] == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 originals per label instead of 100")
    args = parser.parse_args()
    per_label = 40 if args.quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        samples = render_samples(Path(tmp) / "samples", per_label=per_label, seed=0)
        print(f"sample set: {samples.images} images ({samples.copies} near-copies), 20 queries per label, "
              f"1 positive + 100 negatives each")
        print(f"{'backbone':<28} {'test acc':>8} {'NN acc':>7} {'emb top1':>8} {'emb top5':>8} "
              f"{'score top1':>10} {'score top5':>10} {'seconds':>8}")
        for backbone in available_backbones():
            started = time.monotonic()
            with Database(f"sqlite:///{tmp}/{backbone}.db", Path(tmp) / "store") as db:
                run_pipeline(db, samples.manifest, seed=0, backbone=backbone, progress=False)
                with db.engine.connect() as conn:
                    test_accuracy = conn.execute(sa.select(models.c.test_accuracy)
                                                 .order_by(models.c.id.desc())).scalar()
                    rows = conn.execute(sa.select(evaluation_results.c.space, evaluation_results.c.measure,
                                                  evaluation_results.c.value)
                                        .where(evaluation_results.c.metric == "cosine",
                                               evaluation_results.c.evaluation_id == sa.select(
                                                   sa.func.max(evaluation_results.c.evaluation_id)).scalar_subquery())
                                        ).all()
                top = {(space, int(measure[3:])): value for space, measure, value in rows if measure.startswith("top")}
                nn = nearest_neighbour_accuracy(db, backbone)
            print(f"{backbone:<28} {test_accuracy:>8.3f} {nn:>7.3f} {top['embeddings', 1]:>8.3f} "
                  f"{top['embeddings', 5]:>8.3f} {top['scores', 1]:>10.3f} {top['scores', 5]:>10.3f} "
                  f"{time.monotonic() - started:>8.0f}")


if __name__ == "__main__":
    main()
