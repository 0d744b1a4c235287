"""Speed of the default (verified) dedupe with hashes and embeddings already stored.

    python bench/bench_dedupe_speed.py [--quick]     # 100,000 images (20,000 with --quick)

The collection is synthetic: 128-bit row+column dHashes (5 % planted near
copies within 8 bits) and clustered unit embeddings shaped like pooled CNN
features (``bench/synthetic_embeddings.py``), written into a SQLite file as
the hash and featurize steps would. Synthetic rows have no pixels, so the run
is timed in two parts:

1. the whole step with the unsure band closed (every candidate decided by its
   embedding): reading, candidate search (multi-index hashing + embedding
   neighbours), decisions, keeper grouping, writing;
2. geometric verification, per pair, on real photographs (the copies of
   matplotlib's and scikit-learn's sample photos), two threads as the step runs it.

It prints both, how many candidate pairs fall in the unsure band at the
default thresholds, and the projected total.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import sklearn
import sqlalchemy as sa
from PIL import Image

from lookalike.db import Database, embeddings, feature_models, hashed_images, image_hashes, images, now, vector_bytes
from lookalike.dedupe import DedupeSummary, VerifiedThresholds, _Verifier, candidate_pairs, dedupe_images
from lookalike.samples import COPY_OPS, copy_image
from synthetic_embeddings import clustered_embeddings

BATCH = 5_000


def synthetic_collection(db: Database, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write n images with hashes and embeddings; return (hash words, vectors)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, (n, 2), dtype=np.int64).view(np.uint64)
    copies = rng.choice(n, n // 20, replace=False)
    for k in copies:  # a near copy of another row: a few bits flipped
        words[k] = words[rng.integers(n)]
        for _ in range(rng.integers(0, 8)):
            word, bit = rng.integers(2), rng.integers(64)
            words[k, word] ^= np.uint64(1) << np.uint64(bit)
    vectors = clustered_embeddings(n, seed=seed)
    with db.begin() as conn:
        model_id = conn.execute(sa.insert(feature_models).values(
            name="efficientnet-lite0", weights_sha256="synthetic", dim=vectors.shape[1], input_size=224,
            preprocessing="synthetic", created_at=now()).returning(feature_models.c.id)).scalar_one()
    for lo in range(0, n, BATCH):
        rows = range(lo, min(n, lo + BATCH))
        with db.begin() as conn:
            conn.execute(sa.insert(images), [dict(
                id=k + 1, sha256=f"{k:064x}", label=None, source=f"synthetic/{k}", width=640, height=480,
                format="JPEG", byte_size=50_000 + k % 997, status="ok", loaded_at=now()) for k in rows])
            conn.execute(sa.insert(image_hashes), [dict(
                image_id=k + 1, kind="dhash_rowcol", size=8, hex=f"{int(words[k, 0]):016x}{int(words[k, 1]):016x}",
                value=None, bits=128, hasher="synthetic") for k in rows])
            conn.execute(sa.insert(hashed_images), [dict(image_id=k + 1, low_detail=False, hasher="synthetic",
                                                         hashed_at=now()) for k in rows])
            conn.execute(sa.insert(embeddings), [dict(image_id=k + 1, model_id=model_id,
                                                      vector=vector_bytes(vectors[k])) for k in rows])
    return words, vectors


def geometry_rate(work: Path, pairs: int) -> float:
    """Pairs per second that geometric verification checks, on real photographs and their copies."""
    photos = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
              Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
              Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    rng = np.random.default_rng(0)
    files = []
    for k in range(pairs):
        original = Image.open(photos[k % len(photos)]).convert("RGB")
        data, ext, _ = copy_image(original, [COPY_OPS[k % len(COPY_OPS)]], rng)
        path = work / f"copy{k}.{ext}"
        path.write_bytes(data)
        files.append(path)
    first = np.arange(0, pairs - 1, dtype=np.int64)   # every pair has a new image: no decode is cached
    verifier = _Verifier(first, first + 1, lambda k: files[k])
    started = time.perf_counter()
    verifier.geometry(np.arange(len(first)))
    return len(first) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 images instead of 100,000")
    args = parser.parse_args()
    n = 20_000 if args.quick else 100_000
    defaults = VerifiedThresholds()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        db = Database(f"sqlite:///{work}/speed.db", work / "store")
        started = time.perf_counter()
        words, vectors = synthetic_collection(db, n)
        print(f"{n:,} synthetic images with hashes and embeddings written in {time.perf_counter() - started:.0f} s")
        closed = VerifiedThresholds(reject_below=defaults.accept_from)
        started = time.perf_counter()
        summary: DedupeSummary = dedupe_images(db, thresholds=closed, progress=False)
        step = time.perf_counter() - started
        first, second = candidate_pairs(words, vectors, np.zeros(n, bool), summary.max_distance, defaults.neighbours)
        similarity = np.einsum("ij,ij->i", vectors[first], vectors[second])
        unsure = int(((similarity >= defaults.reject_below) & (similarity < defaults.accept_from)).sum())
        rate = geometry_rate(work, 60 if args.quick else 150)
    print(f"verified dedupe, embedding decisions only: {step:.1f} s for {n:,} images "
          f"({summary.candidates:,} candidate pairs, {summary.groups:,} groups)")
    print(f"geometric verification: {rate:.1f} pairs/s on real photographs (2 threads, every image decoded)")
    print(f"unsure at the default thresholds ({defaults.reject_below} <= similarity < {defaults.accept_from}): "
          f"{unsure:,} of {len(first):,} candidate pairs ({unsure / max(1, len(first)):.1%}) on these synthetic "
          f"embeddings")
    print(f"projected total: {step:.0f} s + {unsure:,} / {rate:.1f} s = {step + unsure / rate:.0f} s "
          f"(target for 100,000 images: 120 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
