"""All pairs of hashes within a Hamming distance, exactly.

Multi-index hashing: cut the hash bits into chunks and give chunk ``c`` a
radius ``r_c`` with ``sum(r_c + 1) >= r + 1``. If two hashes differ in at most
``r`` bits, some chunk differs in at most ``r_c`` bits (pigeonhole), so every
such pair is found by looking, per chunk, for chunk values within ``r_c`` of
each other: equal values by sorting, and values at distance 1..r_c by
flipping bits and looking the result up in a dense table of chunk values.
Every candidate is then checked on the full hash with a popcount, and a pair
is kept only from the first chunk able to find it, so no pair is reported
twice. Nothing is approximate: the result equals a brute-force comparison.

The chunking is chosen per call from a cost estimate (for 64-bit hashes at
radius 8: three chunks of 21-22 bits, radius 2 each); very wide radii or few
hashes go to a blocked brute force instead.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import combinations
from math import comb

import numpy as np

from .errors import BadInput
from .hamming import hamming_rows, popcount_rows

_BLOCK = 1 << 20          # candidate pairs handled at once: bounds memory on adversarial input
_MAX_TABLE_BITS = 22      # widest chunk that gets a dense lookup table (2**22 entries)
# Rough relative costs per unit of work, measured on NumPy: used only to pick a plan.
_COST_SORT = 40.0         # per hash per chunk
_COST_LOOKUP = 6.0        # per bit-flipped lookup
_COST_CANDIDATE = 12.0    # per candidate pair (expand, check, dedupe)
_COST_BRUTE = 3.0         # per pair per 64-bit word in the brute force


def _as_words(hashes: np.ndarray) -> np.ndarray:
    words = np.asarray(hashes)
    if words.dtype != np.uint64:
        raise TypeError(f"hashes must be uint64, not {words.dtype}")
    if words.ndim == 1:
        words = words[:, None]
    if words.ndim != 2:
        raise BadInput("hashes must be 1-D (64-bit) or 2-D (n, words)")
    return np.ascontiguousarray(words)


# --- choosing the chunks -----------------------------------------------------------


def _layout(m: int, nwords: int) -> list[tuple[int, int, int]]:
    """m disjoint chunks as (word, shift, width), spread evenly over the words.

    With fewer chunks than words some words are left out: the pigeonhole only
    needs the chunks to be disjoint, not to cover every bit.
    """
    chunks = []
    for word in range(min(m, nwords)):
        parts = m // nwords + (word < m % nwords)
        bounds = [round(64 * p / parts) for p in range(parts + 1)]
        chunks += [(word, lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    return chunks


def _plan(n: int, nwords: int, radius: int) -> list[tuple[int, int, int, int]] | None:
    """Cheapest chunking as (word, shift, width, chunk radius), or None for brute force."""
    pairs = n * (n - 1) / 2
    best, best_cost = None, _COST_BRUTE * pairs * nwords
    for m in range(1, min(radius + 1, 64 * nwords) + 1):
        chunks = sorted(_layout(m, nwords), key=lambda c: -c[2])
        spare = radius + 1 - m  # radii r_c >= 0 with sum(r_c + 1) == radius + 1, wider chunks first
        radii = [spare // m + (k < spare % m) for k in range(m)]
        cost = 0.0
        for (_, _, width), r in zip(chunks, radii):
            if r > 0 and width > _MAX_TABLE_BITS:
                cost = float("inf")
                break
            variants = sum(comb(width, k) for k in range(r + 1))
            cost += (_COST_SORT * n + _COST_LOOKUP * n / 2 * (variants - 1)
                     + _COST_CANDIDATE * pairs * variants / 2.0 ** width)
        if cost < best_cost:
            best, best_cost = [c + (r,) for c, r in zip(chunks, radii)], cost
    return best


# --- candidate generation ------------------------------------------------------------


def _expand(sources: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    """Yield (p, q) blocks: source k paired with each of starts[k] .. starts[k] + counts[k] - 1.

    ``counts`` are all >= 1. Blocks hold about _BLOCK pairs, so even n**2 pairs
    (all hashes equal) never materialise at once.
    """
    single = counts == 1  # the common case: one partner
    if single.any():
        yield sources[single], starts[single]
    sources, starts, counts = sources[~single], starts[~single], counts[~single]
    if counts.size == 0:
        return
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(_BLOCK, int(ends[-1]), _BLOCK), side="right")
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, counts.size]):
        if lo == hi:
            continue
        c = counts[lo:hi]
        first = np.repeat(np.cumsum(c) - c, c)
        yield np.repeat(sources[lo:hi], c), np.repeat(starts[lo:hi], c) + np.arange(first.size) - first


class _Chunk:
    """One chunk of the hashes, with the rows sorted by its key.

    Candidates are (p, q) positions in that order: the hashes are copied in
    the same order, so checking candidates reads memory nearly sequentially.
    """

    def __init__(self, words: np.ndarray, word: int, shift: int, width: int, radius: int):
        self.width, self.radius = width, radius
        keys = (words[:, word] >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        if radius > 0:  # narrow enough for a table; signed keys make index arithmetic simple
            keys = keys.astype(np.int64)
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        self.sorted_words = words[self.order]
        if radius > 0:
            offsets = np.zeros((1 << width) + 1, dtype=np.int32 if words.shape[0] < 2**31 else np.int64)
            np.cumsum(np.bincount(keys, minlength=1 << width), out=offsets[1:])
            self.offsets = offsets

    def equal_keys(self):
        """Yield (p, q) for equal keys: each position with the later positions of its run."""
        keys = self.sorted_keys
        run_start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        run_end = np.r_[run_start[1:], keys.size]
        position = np.arange(keys.size)
        later = np.repeat(run_end, run_end - run_start) - position - 1
        has_later = later > 0
        yield from _expand(position[has_later], position[has_later] + 1, later[has_later])

    def flipped_keys(self, top: int):
        """Yield (p, q) for keys differing by a mask whose highest set bit is ``top``.

        Only positions with bit ``top`` clear look up their partners, so each
        pair comes once; going through them in key order keeps the table
        lookups nearly sequential.
        """
        sources = np.flatnonzero(((self.sorted_keys >> top) & 1) == 0)
        source_keys = self.sorted_keys[sources]
        starts_of, ends_of = self.offsets[:-1], self.offsets[1:]
        for flips in range(self.radius):
            for low in combinations(range(top), flips):
                targets = source_keys ^ ((1 << top) | sum(1 << bit for bit in low))
                starts = starts_of[targets]
                counts = ends_of[targets] - starts
                hit = np.flatnonzero(counts)
                yield from _expand(sources[hit], starts[hit], counts[hit])


def _brute_force(words: np.ndarray, radius: int, lo: int, hi: int):
    """(a, b, distance) for pairs a in [lo, hi), b > a within radius, comparing all."""
    dist = hamming_rows(words[lo:hi, None, :], words[None, lo:, :])
    a, b = np.nonzero(dist <= radius)
    upper = a < b
    a, b = a[upper], b[upper]
    return _keyed(a + lo, b + lo, dist[a, b], words.shape[0])


def _chunk_distance(xor: np.ndarray, word: int, shift: int, width: int) -> np.ndarray:
    mask = np.uint64((1 << width) - 1)
    return np.bitwise_count((xor[:, word] >> np.uint64(shift)) & mask)


def _checked(chunk: _Chunk, radius: int, earlier: list, candidates) -> tuple[np.ndarray, np.ndarray]:
    """Keyed pairs among ``candidates()`` within radius that no ``earlier`` chunk finds."""
    found = []
    for p, q in candidates():
        xor = chunk.sorted_words[p] ^ chunk.sorted_words[q]
        dist = popcount_rows(xor)
        keep = dist <= radius
        for word, shift, width, chunk_radius in earlier:  # a pair belongs to the first chunk that finds it
            keep &= _chunk_distance(xor, word, shift, width) > chunk_radius
        found.append(_keyed(chunk.order[p[keep]], chunk.order[q[keep]], dist[keep], len(chunk.order)))
    return _concat(found)


def _keyed(a: np.ndarray, b: np.ndarray, dist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as one sortable int64 key, min(a, b) * n + max(a, b), with int16 distances."""
    return np.minimum(a, b) * n + np.maximum(a, b), dist.astype(np.int16)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    return np.concatenate([key for key, _ in parts]), np.concatenate([dist for _, dist in parts])


def pairs_within(hashes: np.ndarray, max_distance: int, *,
                 workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of hashes at Hamming distance <= ``max_distance``, exactly.

    ``hashes`` is uint64: shape (n,) for 64-bit hashes, or (n, words) for longer
    ones (e.g. 4 words for 256-bit hashes). Returns ``(i, j, distance)``:
    int64 row indices with i < j and int16 distances, sorted by (i, j).
    ``workers`` threads share the work (default: one per CPU, at most 8).
    """
    if max_distance < 0:
        raise BadInput("max_distance must be >= 0")
    words = _as_words(hashes)
    n, nwords = words.shape
    plan = _plan(n, nwords, max_distance) if n > 1 else None
    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        run = pool.map if pool else map  # NumPy releases the GIL, so threads share the cores
        if n <= 1:
            tasks = []
        elif plan is None:
            rows = max(1, _BLOCK // n)
            tasks = [partial(_brute_force, words, max_distance, lo, min(n, lo + rows))
                     for lo in range(0, n, rows)]
        else:
            tasks = []
            for index, chunk in enumerate(run(lambda spec: _Chunk(words, *spec), plan)):
                sources = [chunk.equal_keys] + [partial(chunk.flipped_keys, top)
                                                for top in range(chunk.width if chunk.radius else 0)]
                tasks += [partial(_checked, chunk, max_distance, plan[:index], source) for source in sources]
        keys, dist = _concat(list(run(lambda task: task(), tasks)))
    order = np.argsort(keys)
    keys = keys[order]
    i = keys // max(n, 1)
    return i, keys - i * n, dist[order]
