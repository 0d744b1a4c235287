"""Near-duplicate pair search: lookalike.neardup.pairs_within against brute force and imagehash.

50,000 hashes: ``pairs_within`` against a blocked brute-force NumPy XOR +
popcount over all pairs (results must be identical), and against the Python
loop a user of imagehash writes, ``h1 - h2`` over every pair (timed on a
sample of pairs and extrapolated). 1,000,000 hashes (200,000 with --quick):
``pairs_within`` alone, checked to find every planted pair. Random 64-bit
hashes with planted near-copies (0..8 bits flipped) and chains. Radius 8.
Target: 1M in <= 60 s on 2 cores, no planted pair missed.

    python bench/bench_neardup.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import imagehash
import numpy as np

from lookalike.neardup import _plan, pairs_within

RADIUS = 8


def planted_hashes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random hashes where about 4% are copies of another with 0..RADIUS bits flipped.

    Returns the hashes and the planted (i, j) pairs, i < j; a third of the
    copies extend a chain (a copy of a copy), so chains a-b-c appear too.
    """
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    rows = rng.permutation(n)[: n // 25 * 2].reshape(2, -1)
    sources, copies = rows
    chained = rng.random(sources.size) < 1 / 3
    sources[1:][chained[1:]] = copies[:-1][chained[1:]]  # copy the previous copy instead
    for source, copy in zip(sources, copies):
        flips = rng.choice(64, size=int(rng.integers(0, RADIUS + 1)), replace=False)
        hashes[copy] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    return hashes, np.sort(np.stack([sources, copies]), axis=0)


def brute_force(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair compared: XOR and popcount, in blocks of rows."""
    found = []
    for lo in range(0, len(hashes), 256):
        dist = np.bitwise_count(hashes[lo:lo + 256, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= radius)
        i += lo
        keep = i < j
        found.append((i[keep], j[keep], dist[i[keep] - lo, j[keep]]))
    i, j, d = (np.concatenate(part) for part in zip(*found))
    return i, j, d


def imagehash_loop_seconds(hashes: np.ndarray, pairs: int) -> float:
    """Seconds for ``pairs`` comparisons written with imagehash, as its users do."""
    bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8)[:, ::-1], axis=1).reshape(-1, 8, 8).astype(bool)
    objects = [imagehash.ImageHash(b) for b in bits]
    start = time.perf_counter()
    found = []
    done = 0
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            if objects[a] - objects[b] <= RADIUS:
                found.append((a, b))
            done += 1
            if done == pairs:
                return time.perf_counter() - start
    return time.perf_counter() - start


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 hashes instead of 1,000,000")
    args = parser.parse_args()
    print(f"radius {RADIUS}, 64-bit hashes, {os.cpu_count()} CPUs")

    n = 50_000
    hashes, planted = planted_hashes(n, seed=1)
    ours_s, ours = timed(pairs_within, hashes, RADIUS)
    brute_s, brute = timed(brute_force, hashes, RADIUS)
    identical = all(np.array_equal(a, b) for a, b in zip(ours, brute))
    sample = 200_000
    loop_s = imagehash_loop_seconds(hashes[:1000], sample) * (n * (n - 1) / 2) / sample
    print(f"\n{n:,} hashes, {len(ours[0]):,} pairs within {RADIUS} ({planted.shape[1]:,} planted)")
    print(f"{'':40} {'seconds':>10} {'ours is':>10}")
    print(f"{'lookalike pairs_within':40} {ours_s:10.2f} {1:9.0f}x")
    print(f"{'brute-force NumPy (all pairs)':40} {brute_s:10.2f} {brute_s / ours_s:9.0f}x")
    print(f"{'imagehash h1 - h2 loop (extrapolated*)':40} {loop_s:10.0f} {loop_s / ours_s:9.0f}x")
    print(f"* timed on {sample:,} of {n * (n - 1) // 2:,} pairs and scaled up")
    print(f"identical to brute force: {identical}")

    n = 200_000 if args.quick else 1_000_000
    hashes, planted = planted_hashes(n, seed=2)
    print(f"\n{n:,} hashes, plan (word, shift, width, chunk radius): {_plan(n, 1, RADIUS)}")
    ours_s, (i, j, d) = timed(pairs_within, hashes, RADIUS)
    found = set(zip(i.tolist(), j.tolist()))
    missed = sum((a, b) not in found for a, b in zip(*planted.tolist()))
    correct = np.array_equal(d, np.bitwise_count(hashes[i] ^ hashes[j])) and bool((i < j).all())
    print(f"lookalike pairs_within: {ours_s:.1f} s, {len(i):,} pairs, "
          f"planted pairs missed: {missed} of {planted.shape[1]:,}, distances correct: {correct}")
    print("target: <= 60 s on 2 cores for 1,000,000 hashes, zero missed")


if __name__ == "__main__":
    main()
