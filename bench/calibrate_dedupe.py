"""Calibrate the verified dedupe rule's thresholds on a dev set with known copies.

    python bench/calibrate_dedupe.py DB DEVSET_DIR

DEVSET_DIR is a dev set (bench/devset.py) or a sample set (``lookalike
samples``, whose ground_truth.csv names its planted copies). DB has that set
loaded, hashed and featurized (see bench/devset.py). For every candidate pair of the verified rule it prints what the embedding and the
geometry measured, by truth (copy of the same original, hard negative, other),
so that ``dedupe.VerifiedThresholds`` and ``verify.GeometryThresholds`` can be
set where copies and non-copies part.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from lookalike.db import Database
from lookalike.dedupe import (NEAR_DEFAULT_HASH, VERIFIED_MAX_DISTANCE, DedupeSummary, VerifiedThresholds,
                              _hashed_rows, candidate_pairs, hash_matrix)
from lookalike.db import latest_feature_model, load_embeddings
from lookalike.verify import load_view, match_geometry


def truth(devset: Path):
    family, transform = {}, {}
    for row in csv.DictReader((devset / "ground_truth.csv").open()):
        family[row["copy"]] = family[row["original"]] = row["original"]
        transform[row["copy"]] = row["transform"]
    listed = devset / "hard_negatives.csv"   # the sample set (``lookalike samples``) has none
    negatives = ({frozenset((r["a"], r["b"])): r["kind"] for r in csv.DictReader(listed.open())}
                 if listed.exists() else {})
    return family, transform, negatives


def main(db_url: str, devset: str) -> None:
    devset = Path(devset).resolve()
    family, transform, negatives = truth(devset)
    db = Database(db_url)
    summary = DedupeSummary(0, "verified", *NEAR_DEFAULT_HASH, VERIFIED_MAX_DISTANCE, False, True)
    with db.engine.connect() as conn:
        rows = _hashed_rows(conn, summary)
        ids, vectors = load_embeddings(conn, latest_feature_model(conn))
    position = {int(i): k for k, i in enumerate(ids.tolist())}
    rows = [r for r in rows if r.id in position]
    vectors = vectors[[position[r.id] for r in rows]]
    hashes = hash_matrix(*NEAR_DEFAULT_HASH, 128, [r.hex for r in rows], [r.value for r in rows])
    names = [str(Path(r.source).resolve().relative_to(devset)) for r in rows]
    first, second = candidate_pairs(hashes, vectors, np.array([r.low_detail for r in rows]), VERIFIED_MAX_DISTANCE,
                                    VerifiedThresholds().neighbours)
    similarity = np.einsum("ij,ij->i", vectors[first], vectors[second])

    def kind(a: str, b: str) -> str:
        if a in family and family.get(a) == family.get(b):
            return "copy:" + (transform.get(a) or transform.get(b) or "?").split(":")[0]
        return "negative:" + negatives.get(frozenset((a, b)), "other")

    kinds = [kind(names[a], names[b]) for a, b in zip(first, second)]
    all_copies = sum(1 for r in csv.DictReader((devset / "ground_truth.csv").open()))
    print(f"{len(rows)} images, {len(first)} candidate pairs; copy->original pairs in the set: {all_copies}; "
          f"copy pairs among candidates: {sum(k.startswith('copy') for k in kinds)}")
    print("\ncosine similarity by kind (min / 5% / median / max):")
    for k in sorted(set(kinds)):
        s = similarity[[i for i, x in enumerate(kinds) if x == k]]
        print(f"  {k:<28} {len(s):>5}  {s.min():.3f} {np.quantile(s, .05):.3f} {np.median(s):.3f} {s.max():.3f}")
    views = {}
    print("\ngeometry on pairs with similarity >= 0.5 (matched, inliers, share, containment, correlation, colour difference):")
    stats = Counter()
    for a, b, s, k in sorted(zip(first, second, similarity, kinds), key=lambda t: t[3]):
        if s < 0.5:
            continue
        for i in (a, b):
            if i not in views:
                views[i] = load_view(db.store.path(rows[i].sha256))
        g = match_geometry(views[a], views[b])
        stats[(k.split(":")[0], g.matched)] += 1
        if (k.startswith("copy") and not g.matched) or (k.startswith("negative") and g.matched) or "hard" in k \
                or not k.endswith("other"):
            print(f"  {k:<28} s={s:.3f} {g.matched!s:5} {g.inliers:4} {g.inlier_share:.2f} {g.containment:.2f} "
                  f"{g.correlation:.2f} {g.colour_difference:5.2f} {g.reason}  {names[a]} {names[b]}")
    print(stats)


if __name__ == "__main__":
    main(*sys.argv[1:3])
