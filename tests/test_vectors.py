"""Vector search: exact against brute force, IVF recall, filters, updates, persistence."""

import numpy as np
import pytest

from lookalike import vectors
from lookalike.vectors import ExactIndex, IVFIndex, build_index, default_nlist, recall_at_k
from synthetic_embeddings import clustered_embeddings


def brute_force_cosine(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    data = data / np.linalg.norm(data, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return 1.0 - queries.astype(np.float64) @ data.T.astype(np.float64)


@pytest.fixture(scope="module")
def small():
    """3000 non-normalised random vectors (no ties) under sparse ids, and 25 queries."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 48)).astype(np.float32) * 3
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    return ids, data, rng.standard_normal((25, 48)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    """20k clustered 384-d embeddings (PCA to 256 applies) and 200 held-out queries."""
    data = clustered_embeddings(20_200, 384, seed=5)
    return np.arange(20_000, dtype=np.int64) * 2 + 1, data[:20_000], data[20_000:]


@pytest.fixture(scope="module")
def ivf(clustered):
    ids, data, _ = clustered
    return IVFIndex.build(ids, data, seed=0)


def test_exact_cosine_equals_brute_force(small):
    ids, data, queries = small
    index = ExactIndex(48)
    index.add(ids, data)
    found, dist = index.search(queries, 10)
    truth = brute_force_cosine(data, queries)
    order = np.argsort(truth, axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(dist, np.take_along_axis(truth, order, axis=1), atol=1e-5)
    assert found.dtype == np.int64 and dist.dtype == np.float32
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_exact_l2_is_squared_euclidean_on_raw_vectors(small):
    ids, data, queries = small
    index = ExactIndex(48, metric="l2")
    index.add(ids, data)
    found, dist = index.search(queries, 5)
    truth = ((queries[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(axis=2)
    order = np.argsort(truth, axis=1)[:, :5]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(dist, np.take_along_axis(truth, order, axis=1), rtol=1e-4)


def test_exact_query_blocks_give_the_same_answer(small, monkeypatch):
    ids, data, queries = small
    index = ExactIndex(48)
    index.add(ids, data)
    whole = index.search(queries, 7)
    monkeypatch.setattr(vectors, "_SCORE_BLOCK_ELEMENTS", 3 * len(data))  # three queries per block
    blocked = index.search(queries, 7)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1], atol=1e-6)  # BLAS kernels differ by block shape


def test_exclude_drops_the_query_itself_and_nothing_else(small):
    ids, data, _ = small
    index = ExactIndex(48)
    index.add(ids, data)
    queries = data[:20]
    found, _ = index.search(queries, 5, exclude=[[i, 10**9] for i in ids[:20]])  # unknown ids are harmless
    truth = brute_force_cosine(data, queries)
    truth[np.arange(20), np.arange(20)] = np.inf
    np.testing.assert_array_equal(found, ids[np.argsort(truth, axis=1)[:, :5]])
    assert not np.any(found == ids[:20, None])


def test_exclude_everything_pads_with_minus_one():
    index = ExactIndex(4)
    index.add([1, 2, 3], np.eye(4, dtype=np.float32)[:3])
    found, dist = index.search(np.eye(4, dtype=np.float32)[:1], 3, exclude=[[1, 2]])
    assert found.tolist() == [[3, -1, -1]]
    assert np.isfinite(dist[0, 0]) and np.all(np.isinf(dist[0, 1:]))


def test_identical_vectors_under_different_ids_are_each_listed_once(clustered, ivf):
    ids, data, queries = clustered
    index = ExactIndex(384)
    index.add(ids[:2000], data[:2000])
    index.add(np.arange(10**6, 10**6 + 2000), data[:2000])  # the same vectors again
    for searched in (index, ivf):
        found, _ = searched.search(queries, 30)
        for row in found:
            assert len(set(row.tolist())) == len(row)


def test_ivf_recall_on_clustered_data(clustered, ivf):
    _, _, queries = clustered
    exact_ids, exact_dist = ivf.exact.search(queries, 10)
    found, dist = ivf.search(queries, 10)
    assert ivf.kind == "ivf" and ivf.nlist == default_nlist(20_000)
    assert recall_at_k(found, exact_ids) >= 0.9
    # Distances come from the exact re-rank, so each is the true cosine distance of its id.
    rows = ivf.exact.rows_of(found).reshape(found.shape)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    recomputed = 1.0 - np.einsum("qkd,qd->qk", ivf.exact.vectors[rows], unit_queries)
    np.testing.assert_allclose(dist, recomputed, atol=1e-5)


def test_ivf_without_pca_on_low_dimensional_vectors():
    data = clustered_embeddings(5200, 64, seed=7)  # 64 <= pca_dim: IVF + SQ8 straight on the vectors
    index = IVFIndex.build(np.arange(5000), data[:5000], nprobe=4)
    truth, _ = index.exact.search(data[5000:], 10)
    assert recall_at_k(index.search(data[5000:], 10)[0], truth) >= 0.9
    allowed = np.arange(0, 5000, 3)
    found, _ = index.search(data[5000:], 10, allowed=allowed)
    assert np.isin(found, allowed).all() and found.shape == (200, 10)


@pytest.mark.parametrize("share", [0.02, 0.3])  # small: exact over the subset; large: faiss id selector
def test_filtered_search_returns_k_allowed_rows(clustered, ivf, share):
    ids, _, queries = clustered
    allowed = ids[np.random.default_rng(1).random(len(ids)) < share]
    mask = np.zeros(ids.max() + 1, dtype=bool)
    mask[allowed] = True
    truth, _ = ivf.exact.search(queries, 10, allowed=allowed)
    assert np.isin(truth, allowed).all() and truth.shape == (len(queries), 10)
    for filter_ in (allowed, mask, set(allowed.tolist())):
        found, _ = ivf.search(queries, 10, allowed=filter_)
        assert found.shape == (len(queries), 10) and np.isin(found, allowed).all()
        assert recall_at_k(found, truth) >= 0.9


def test_a_filtered_ivf_search_re_ranks_more_as_its_probe_widens(clustered, ivf):
    # 10 % allowed: faiss probes 10x the lists, a pool the 4-bit codes order loosely. Re-ranking
    # the plain shortlist gave recall 0.97 here (0.87 at 200k x 1280-d); the widened one 0.999.
    ids, _, queries = clustered
    allowed = ids[np.random.default_rng(1).random(len(ids)) < 0.1]
    truth, _ = ivf.exact.search(queries, 10, allowed=allowed)
    found, _ = ivf.search(queries, 10, allowed=allowed)
    assert recall_at_k(found, truth) >= 0.99


def test_ivf_keeps_k_rows_when_exclusions_eat_the_shortlist(clustered, ivf):
    ids, _, queries = clustered
    nearest, _ = ivf.exact.search(queries[:50], 110)
    exclude = [row[:100] for row in nearest]  # most of the shortlist (SHORTLIST = 128)
    found, _ = ivf.search(queries[:50], 10, exclude=exclude)
    assert found.shape == (50, 10) and not any(np.isin(f, e).any() for f, e in zip(found, exclude))
    # The 101st..110th neighbours sit further out, in lists a probe reaches less often.
    assert recall_at_k(found, nearest[:, 100:110]) >= 0.6


def test_ivf_falls_back_to_exact_when_the_probed_lists_run_dry(clustered, ivf):
    ids, _, queries = clustered
    ranked, _ = ivf.exact.search(queries[:3], len(ids))
    exclude = [row[:-15] for row in ranked]  # only the 15 farthest ids stay eligible
    found, dist = ivf.search(queries[:3], 10, exclude=exclude)
    np.testing.assert_array_equal(found, ranked[:, -15:-5])
    assert np.all(np.isfinite(dist))


def test_exact_add_and_remove_match_a_fresh_index(small):
    ids, data, queries = small
    index = ExactIndex(48)
    index.add(ids[:1000], data[:1000])
    for lo in range(1000, 3000, 500):
        index.add(ids[lo:lo + 500], data[lo:lo + 500])
    gone = ids[::3]
    index.remove(gone)
    kept = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 3))
    fresh = ExactIndex(48)
    fresh.add(ids[kept], data[kept])
    assert len(index) == len(fresh) == len(kept)
    np.testing.assert_array_equal(index.search(queries, 10)[0], fresh.search(queries, 10)[0])
    with pytest.raises(KeyError):
        index.remove(gone[:1])
    with pytest.raises(ValueError):
        index.add(ids[1:2], data[1:2])
    index.add(gone[:1], data[:1])  # a removed id can come back
    assert index.search(data[:1], 1)[0][0, 0] == gone[0]


def test_ivf_add_and_remove_without_rebuilding(clustered):
    ids, data, queries = clustered
    index = IVFIndex.build(ids[:15_000], data[:15_000], nprobe=8)
    index.add(ids[15_000:], data[15_000:])
    assert len(index) == 20_000
    newcomers = data[15_000:15_050]
    found, _ = index.search(newcomers, 1, exclude=None)
    np.testing.assert_array_equal(found[:, 0], ids[15_000:15_050])
    index.remove(ids[15_000:15_050])
    assert len(index) == 19_950
    found, _ = index.search(newcomers, 10)
    assert not np.isin(found, ids[15_000:15_050]).any()
    assert recall_at_k(found, index.exact.search(newcomers, 10)[0]) >= 0.9


def test_ivf_save_load_round_trip(clustered, ivf):
    ids, data, queries = clustered
    blob = ivf.to_bytes()
    order = np.random.default_rng(2).permutation(len(ids))  # vectors may come back in any order
    loaded = IVFIndex.from_bytes(blob, ids[order], data[order])
    assert (loaded.nprobe, loaded.shortlist, len(loaded)) == (ivf.nprobe, ivf.shortlist, len(ivf))
    before, after = ivf.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    with pytest.raises(ValueError, match="not the ids"):
        IVFIndex.from_bytes(blob, ids[1:], data[1:])


def test_build_index_auto_picks_by_size(clustered):
    ids, data, _ = clustered
    assert build_index(ids[:4999], data[:4999], threshold=5000).kind == "exact"
    assert build_index(ids[:5000], data[:5000], threshold=5000).kind == "ivf"
    assert build_index(ids[:5000], data[:5000], threshold=5000, metric="l2").kind == "exact"
    assert build_index(ids[:2000], data[:2000]).kind == "exact"  # default threshold 200k
    with pytest.raises(ValueError):
        build_index(ids[:2000], data[:2000], kind="ivf", metric="l2")


def test_k_larger_than_the_collection_returns_everything(clustered, ivf):
    ids, data, queries = clustered
    index = build_index(ids[:50], data[:50])
    found, dist = index.search(queries[:4], 100)
    assert found.shape == dist.shape == (4, 50)
    assert all(sorted(row) == sorted(ids[:50].tolist()) for row in found.tolist())
    assert ivf.search(queries[:2], 30_000)[0].shape == (2, 20_000)


def test_empty_index_gives_an_empty_result():
    index = build_index(np.zeros(0, dtype=np.int64), np.zeros((0, 8), dtype=np.float32))
    found, dist = index.search(np.ones((3, 8), dtype=np.float32), 5)
    assert len(index) == 0 and found.shape == dist.shape == (3, 0)
    with pytest.raises(ValueError, match="at least 1000"):
        IVFIndex.build(np.arange(10), np.ones((10, 8), dtype=np.float32))


def test_bad_input_is_refused(small):
    ids, data, queries = small
    index = ExactIndex(48)
    index.add(ids, data)
    with pytest.raises(ValueError):
        index.search(queries[:, :10], 5)          # wrong dimension
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 48)), 5)        # a zero query has no direction
    with pytest.raises(ValueError):
        index.add([-1], data[:1])                 # -1 means "no result"
    with pytest.raises(ValueError):
        index.add([10**7, 10**7 + 1], data[:1])   # ids and vectors disagree
    with pytest.raises(ValueError):
        index.search(queries, 5, exclude=[[1]])   # one exclude list per query


def test_recall_at_k_counts_shared_ids_and_ignores_padding():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 2, 9], [6, 5, 4]])) == pytest.approx(5 / 6)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, -1]])) == 1.0


def test_clustered_embeddings_are_non_negative_unit_vectors_with_neighbours():
    data = clustered_embeddings(3000, 256, seed=1)
    assert data.dtype == np.float32 and data.shape == (3000, 256)
    np.testing.assert_allclose(np.linalg.norm(data, axis=1), 1.0, atol=1e-5)
    assert (data < -0.05).mean() < 0.01
    similarity = data[:100] @ data.T
    similarity[np.arange(100), np.arange(100)] = -1
    nearest, typical = similarity.max(axis=1).mean(), np.median(similarity)
    assert nearest > typical + 0.2
    np.testing.assert_array_equal(data, clustered_embeddings(3000, 256, seed=1))
