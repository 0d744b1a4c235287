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

from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import combinations
from math import comb

import numpy as np

from .errors import BadInput
from .hamming import hamming_rows, popcount_rows
from .workpool import cores

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
    if counts.size == 0:
        return
    ends = np.cumsum(counts)
    cuts = np.searchsorted(ends, np.arange(_BLOCK, int(ends[-1]), _BLOCK), side="right")
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, counts.size]):
        if lo == hi:
            continue
        c = counts[lo:hi]
        # Partner t of the block is starts[k] + (t - where source k's partners begin): two repeats, one add.
        partners = np.repeat(starts[lo:hi] - (np.cumsum(c) - c), c)
        partners += np.arange(partners.size)
        yield np.repeat(sources[lo:hi], c), partners


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

    def equal_keys(self, lo: int, hi: int):
        """Yield (p, q) for equal keys: each position in [lo, hi) with the later positions of its run."""
        keys = self.sorted_keys
        run_start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        run_end = np.r_[run_start[1:], keys.size]
        position = np.arange(lo, hi)
        later = np.repeat(run_end, run_end - run_start)[lo:hi] - position - 1
        has_later = later > 0
        yield from _expand(position[has_later], position[has_later] + 1, later[has_later])

    def flipped_keys(self, top: int, lo: int, hi: int):
        """Yield (p, q), p in [lo, hi), for keys differing by a mask whose highest set bit is ``top``.

        Only positions with bit ``top`` clear look up their partners, so each
        pair comes once; going through them in key order keeps the table
        lookups nearly sequential.
        """
        sources = lo + np.flatnonzero(((self.sorted_keys[lo:hi] >> top) & 1) == 0)
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
        dist = popcount_rows(xor, np.int16)
        near = np.flatnonzero(dist <= radius)   # few of the candidates: the rest is checked on these only
        close, first = xor[near], np.ones(near.size, dtype=bool)
        for word, shift, width, chunk_radius in earlier:  # a pair belongs to the first chunk that finds it
            first &= _chunk_distance(close, word, shift, width) > chunk_radius
        near = near[first]
        found.append(_keyed(chunk.order[p[near]], chunk.order[q[near]], dist[near], len(chunk.order)))
    return _concat(found)


def _keyed(a: np.ndarray, b: np.ndarray, dist: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs as one sortable int64 key, min(a, b) * n + max(a, b), with int16 distances."""
    return np.minimum(a, b) * n + np.maximum(a, b), dist.astype(np.int16)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    return np.concatenate([key for key, _ in parts]), np.concatenate([dist for _, dist in parts])


class Search:
    """One all-pairs search, cut into independent tasks.

    A task is a small ``(chunk, source, lo, hi)`` tuple: chunk ``c`` of the
    plan with its equal keys (source -1) or its keys flipped at highest bit
    ``source``, for the rows at positions ``lo`` to ``hi`` in its key order;
    or (chunk -1) the brute force of rows ``lo`` to ``hi``.
    Any process holding the same hashes runs any task (:meth:`run`); the
    tasks' results together, in any order, are the pairs (:meth:`pairs`).
    :func:`pairs_within` runs them on threads, the Spark job
    (:mod:`lookalike.spark.neardup`) on executors.
    """

    def __init__(self, hashes: np.ndarray, max_distance: int):
        if max_distance < 0:
            raise BadInput("max_distance must be >= 0")
        self.words, self.radius = _as_words(hashes), max_distance
        n, nwords = self.words.shape
        self.plan = _plan(n, nwords, max_distance) if n > 1 else None
        self._rows = max(1, _BLOCK // max(n, 1))   # brute-force rows per task
        self._chunks: dict[int, _Chunk] = {}

    def tasks(self, parts: int = 1) -> list[tuple[int, int, int, int]]:
        """Every task of this search, once; each chunk's cut into ``parts`` row ranges (for many workers)."""
        n = self.words.shape[0]
        if n <= 1:
            return []
        if self.plan is None:
            return [(-1, -1, lo, min(n, lo + self._rows)) for lo in range(0, n, self._rows)]
        cuts = sorted({n * k // parts for k in range(parts + 1)})
        return [(index, source, lo, hi) for index, (_, _, width, radius) in enumerate(self.plan)
                for source in range(-1, width if radius else 0) for lo, hi in zip(cuts, cuts[1:])]

    def cost(self, task: tuple[int, int, int, int]) -> float:
        """Rough work of a task: rows looked up, each with the rows its bucket holds (to balance tasks)."""
        n = self.words.shape[0]
        index, source, lo, hi = task
        if index < 0:
            return float((hi - lo) * n)
        per_bucket = n / 2.0 ** self.plan[index][2]
        if source < 0:
            return (hi - lo) * (1 + per_bucket / 2)
        return (hi - lo) / 2 * (1 + per_bucket) * sum(comb(source, flips) for flips in range(self.plan[index][3]))

    def chunk(self, index: int) -> _Chunk:
        """Chunk ``index`` of the plan, built on first use and kept."""
        if index not in self._chunks:
            self._chunks[index] = _Chunk(self.words, *self.plan[index])
        return self._chunks[index]

    def run(self, task: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The pairs one task finds, keyed (see :meth:`pairs`)."""
        index, source, lo, hi = task
        if index < 0:
            return _brute_force(self.words, self.radius, lo, hi)
        chunk = self.chunk(index)
        candidates = partial(chunk.equal_keys, lo, hi) if source < 0 else partial(chunk.flipped_keys, source, lo, hi)
        return _checked(chunk, self.radius, self.plan[:index], candidates)

    def pairs(self, found: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i, j, distance)`` sorted by (i, j) from all tasks' results."""
        n = max(self.words.shape[0], 1)
        keys, dist = _concat(found)
        order = np.argsort(keys)
        keys = keys[order]
        i = keys // n
        return i, keys - i * n, dist[order]


def pairs_within(hashes: np.ndarray, max_distance: int, *,
                 workers: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of hashes at Hamming distance <= ``max_distance``, exactly.

    ``hashes`` is uint64: shape (n,) for 64-bit hashes, or (n, words) for longer
    ones (e.g. 4 words for 256-bit hashes). Returns ``(i, j, distance)``:
    int64 row indices with i < j and int16 distances, sorted by (i, j).
    ``workers`` threads share the work (default: one per CPU, at most 8).
    """
    search = Search(hashes, max_distance)
    workers = workers or cores(at_most=8)
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        run = pool.map if pool else map  # NumPy releases the GIL, so threads share the cores
        list(run(search.chunk, range(len(search.plan or ()))))   # built side by side, before the tasks
        return search.pairs(list(run(search.run, search.tasks())))
