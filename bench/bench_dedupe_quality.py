"""Dedupe quality: precision and recall of duplicate pairs on the sample set's planted copies.

Renders the sample set (originals plus resized, re-compressed, cropped,
brightened and PNG copies, with their ground truth), loads it into a
throwaway SQLite database, stores every image's hashes, and runs the real
dedupe step with each rule:

- the classic exact rule on the dhash package's row+col hash, sizes 3 and 8;
- the near rule (exact Hamming search, transitive groups) on pHash and on
  imagehash's dHash (64 bits) at radii 0..12, and on the 128-bit row+col
  dHash of size 8 at radii 0..16.

A found pair is two images in one group; a true pair is a copy and its
original, or two copies of one original. Precision = true found / found,
recall = true found / true pairs. Per-transform recall is shown for the
near-rule default (dedupe.NEAR_DEFAULT_HASH within dedupe.DEFAULT_MAX_DISTANCE).

    python bench/bench_dedupe_quality.py [--quick] [--per-label N] [--copy-share S]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import sqlalchemy as sa

from lookalike.db import Database, duplicate_groups, images
from lookalike.dedupe import NEAR_DEFAULT_HASH, dedupe_images, default_max_distance
from lookalike.hashing import hash_images
from lookalike.ingest import load_images
from lookalike.samples import render_samples

RADII = (0, 2, 4, 6, 8, 10, 12)          # for the 64-bit hashes
RADII_128 = (0, 4, 8, 10, 12, 14, 16)   # for dhash_rowcol size 8 (128 bits)


def store_hashes(db: Database) -> int:
    """The hash step over every loaded image; returns how many it hashed."""
    return hash_images(db, progress=False).hashed

def true_pairs(root: Path, id_of: dict[str, int]) -> tuple[set[frozenset[int]], dict[frozenset[int], str]]:
    """Copy–original and copy–copy pairs from ground_truth.csv, with the copy transform(s) of each."""
    copies: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with (root / "ground_truth.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            copies[row["original"]].append((row["copy"], row["transform"]))
    pairs, transform = set(), {}
    for original, members in copies.items():
        for copy, how in members:
            pair = frozenset((id_of[original], id_of[copy]))
            pairs.add(pair)
            transform[pair] = how
        for (a, how_a), (b, how_b) in itertools.combinations(members, 2):
            pair = frozenset((id_of[a], id_of[b]))
            pairs.add(pair)
            transform[pair] = f"copy vs copy ({how_a} | {how_b})"
    return pairs, transform


def found_pairs(db: Database, run_id: int) -> set[frozenset[int]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(duplicate_groups.c.group_id, duplicate_groups.c.image_id)
                            .where(duplicate_groups.c.run_id == run_id)).all()
    groups: dict[int, list[int]] = defaultdict(list)
    for group_id, image_id in rows:
        groups[group_id].append(image_id)
    return {frozenset(p) for members in groups.values() for p in itertools.combinations(members, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 originals per label instead of 100")
    parser.add_argument("--per-label", type=int, default=None)
    parser.add_argument("--copy-share", type=float, default=0.10, help="share of originals given copies")
    args = parser.parse_args()
    per_label = args.per_label or (30 if args.quick else 100)

    with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        sample = render_samples(tmp / "samples", per_label=per_label, seed=0, copy_share=args.copy_share)
        rendered = time.perf_counter()
        with Database(f"sqlite:///{tmp / 'bench.db'}", tmp / "store") as db:
            load_images(db, sample.root, progress=False)
            hashed = store_hashes(db)
            prepared = time.perf_counter()
            with db.engine.connect() as conn:
                id_of = {Path(source).relative_to(sample.root.resolve()).as_posix(): image_id
                         for source, image_id in conn.execute(sa.select(images.c.source, images.c.id))}
            truth, transform = true_pairs(sample.root, id_of)
            print(f"sample set: {sample.images} images ({sample.copies} planted copies, {len(truth)} true pairs), "
                  f"{hashed} hashed; render {rendered - started:.0f} s, load+hash {prepared - rendered:.0f} s")

            configs = [("exact", "dhash_rowcol", 3, None), ("exact", "dhash_rowcol", 8, None)]
            configs += [("near", kind, 8, r) for kind in ("phash", "dhash") for r in RADII]
            configs += [("near", "dhash_rowcol", 8, r) for r in RADII_128]
            print(f"\n{'rule':<6} {'hash':<13} {'size':>4} {'radius':>6} {'groups':>6} {'found':>6} "
                  f"{'true':>5} {'precision':>9} {'recall':>7} {'F1':>6}")
            results = {}
            for rule, kind, size, radius in configs:
                summary = dedupe_images(db, rule=rule, hash_kind=kind, size=size, max_distance=radius)
                found = found_pairs(db, summary.run_id)
                hits = found & truth
                precision = len(hits) / len(found) if found else 1.0
                recall = len(hits) / len(truth) if truth else 1.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
                results[rule, kind, size, radius] = hits
                print(f"{rule:<6} {kind:<13} {size:>4} {'-' if radius is None else radius:>6} {summary.groups:>6} "
                      f"{len(found):>6} {len(hits):>5} {precision:>9.3f} {recall:>7.3f} {f1:>6.3f}")

            default = ("near", *NEAR_DEFAULT_HASH, default_max_distance(*NEAR_DEFAULT_HASH))
            hits = results.get(default, set())
            by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for pair in truth:
                ops = {step.split(":")[0] for step in transform[pair].split("(")[-1].replace("|", "+")
                       .rstrip(")").split("+") if step.strip()}
                for op in ops or {"none"}:
                    by_op[op.strip()][0] += pair in hits
                    by_op[op.strip()][1] += 1
            print(f"\nrecall by transform at the default (near, {default[1]} size {default[2]}, "
                  f"radius {default[3]}); a pair counts under every transform it involves:")
            for op, (hit, total) in sorted(by_op.items()):
                print(f"  {op:<10} {hit:>4} / {total:<4} {hit / total:.3f}")
            name_of = {image_id: name for name, image_id in id_of.items()}
            missed = sorted(truth - hits, key=lambda p: sorted(p))
            for pair in missed[:10]:
                print(f"  missed: {' & '.join(name_of[i] for i in sorted(pair))}  {transform[pair]}")


if __name__ == "__main__":
    main()
