"""pairs_within finds exactly the pairs a brute-force comparison finds; groups are transitive."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.neardup import _BLOCK, _plan, pairs_within


def brute_force(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    words = hashes if hashes.ndim == 2 else hashes[:, None]
    dist = np.bitwise_count(words[:, None, :] ^ words[None, :, :]).sum(axis=2)
    i, j = np.nonzero((dist <= radius) & np.triu(np.ones(dist.shape, dtype=bool), k=1))
    return i, j, dist[i, j]


def clustered(rng: np.random.Generator, n: int, words: int, max_flips: int) -> np.ndarray:
    """n hashes drawn from n // 8 centres, each with up to ``max_flips`` random bits flipped."""
    centres = rng.integers(0, 2**64, (max(1, n // 8), words), dtype=np.uint64, endpoint=False)
    hashes = centres[rng.integers(0, len(centres), n)]
    for _ in range(max_flips):
        bit = rng.integers(0, 64 * words, n)
        flip = rng.random(n) < 0.5
        hashes[np.flatnonzero(flip), bit[flip] // 64] ^= np.uint64(1) << (bit[flip] % 64).astype(np.uint64)
    return hashes


def assert_same_as_brute_force(hashes: np.ndarray, radius: int) -> int:
    i, j, d = pairs_within(hashes, radius)
    ei, ej, ed = brute_force(hashes, radius)
    assert i.dtype == j.dtype == np.int64 and d.dtype == np.int16
    assert np.array_equal(i, ei) and np.array_equal(j, ej) and np.array_equal(d, ed)
    return len(i)


@pytest.mark.parametrize("words, n, radius", [
    (1, 1500, 8), (1, 1500, 3), (1, 1500, 1), (1, 1500, 0), (1, 600, 12), (1, 300, 30),
    (2, 800, 10), (2, 800, 0), (4, 800, 24), (4, 800, 4), (4, 300, 100),
])
def test_same_pairs_as_brute_force(words: int, n: int, radius: int) -> None:
    rng = np.random.default_rng(words * 1000 + radius)
    hashes = clustered(rng, n, words, max_flips=max(1, radius // 2))
    found = assert_same_as_brute_force(hashes[:, 0] if words == 1 else hashes, radius)
    assert found > n // 4  # the clusters give real work, not an empty answer


def test_the_multi_index_search_is_what_runs_at_these_sizes() -> None:
    # Guards the test above: its cases go through the chunked search, not only the brute force.
    for words, n, radius in [(1, 1500, 8), (1, 1500, 0), (2, 800, 10), (4, 800, 24)]:
        assert _plan(n, words, radius) is not None
    assert _plan(1500, 1, 8)[0][3] > 0  # a chunk with a radius: bit-flip lookups run too
    assert _plan(300, 4, 100) is None


def test_all_equal_hashes_give_every_pair_in_blocks() -> None:
    n = int(np.sqrt(2 * _BLOCK)) + 100  # more pairs than one block holds
    hashes = np.full(n, 0xDEADBEEF12345678, dtype=np.uint64)
    for radius in (0, 8):
        i, j, d = pairs_within(hashes, radius)
        assert len(i) == n * (n - 1) // 2 > _BLOCK
        assert (i < j).all() and not d.any()
        order = np.lexsort((j, i))
        assert np.array_equal(order, np.arange(len(i)))


def test_two_groups_one_bit_apart() -> None:
    # Every lookup of a bit-flipped key hits a large group: many blocks of candidates.
    hashes = np.array([0x0F0F_0000_FFFF_1234] * 40 + [0x0F0F_0000_FFFF_1235] * 40, dtype=np.uint64)
    assert assert_same_as_brute_force(hashes, 1) == 80 * 79 // 2
    assert assert_same_as_brute_force(hashes, 0) == 2 * (40 * 39 // 2)


def test_chain_links_only_near_neighbours() -> None:
    a = 0x0123_4567_89AB_CDEF
    b = a ^ 0b11111            # 5 bits from a
    c = b ^ (0b11111 << 40)    # 5 bits from b, 10 from a
    far = ~a & (2**64 - 1)
    hashes = np.array([a, far, b, c], dtype=np.uint64)
    i, j, d = pairs_within(hashes, 8)
    assert list(zip(i, j, d)) == [(0, 2, 5), (2, 3, 5)]


def test_radius_zero_finds_exact_duplicates_only() -> None:
    hashes = np.array([5, 7, 5, 5, 4, 7], dtype=np.uint64)
    i, j, d = pairs_within(hashes, 0)
    assert list(zip(i, j)) == [(0, 2), (0, 3), (1, 5), (2, 3)] and not d.any()


def test_radius_64_gives_every_pair() -> None:
    hashes = np.random.default_rng(2).integers(0, 2**64, 200, dtype=np.uint64, endpoint=False)
    assert assert_same_as_brute_force(hashes, 64) == 200 * 199 // 2


def test_empty_and_single() -> None:
    for n in (0, 1):
        i, j, d = pairs_within(np.zeros(n, dtype=np.uint64), 5)
        assert len(i) == len(j) == len(d) == 0


def test_threads_give_the_same_answer() -> None:
    hashes = clustered(np.random.default_rng(9), 3000, 1, 5)[:, 0]
    one = pairs_within(hashes, 8, workers=1)
    two = pairs_within(hashes, 8, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))


def test_bad_input_is_refused() -> None:
    with pytest.raises(TypeError):
        pairs_within(np.array([1, 2], dtype=np.int64), 3)
    with pytest.raises(ValueError):
        pairs_within(np.array([1, 2], dtype=np.uint64), -1)
    with pytest.raises(ValueError):
        pairs_within(np.zeros((2, 2, 2), dtype=np.uint64), 3)
