"""Benchmark vector search: exact (NumPy) and IVF (faiss) against faiss's own exact search.

    python bench/bench_search.py            # exact at 100k, IVF at 1M (about 10 minutes on 2 cores)
    python bench/bench_search.py --quick    # exact at 100k, IVF at 200k

Goals (DESIGN.md): exact <= 50 ms per query at 100k; a 1M IVF index built in
<= 5 minutes, queried in <= 5 ms at recall@10 >= 0.95. Latencies are for one
query per call (p50/p99 over the queries); "batch" is per query when all are
sent in one call. Recall@10 is against exact search, on queries held out of the
collection. The reference library is faiss: ``IndexFlatIP`` for single queries,
``faiss.knn`` (the same kernel, without copying into an index) for ground truth.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import faiss
import numpy as np

from lookalike.vectors import ExactIndex, IVFIndex, recall_at_k
from synthetic_embeddings import clustered_embeddings

K = 10
DATA = ("clustered synthetic embeddings (bench/synthetic_embeddings.py): n/100 cluster centres "
        "of lognormal popularity, n/20 sub-centres, items around those, in a 96-d latent subspace "
        "(anisotropic spread), through a random 1280-d linear layer + positive bias + ReLU, plus "
        "N(0, 0.05^2) noise, 5% near-copies, L2-normalised; queries drawn from the same distribution "
        "and held out of the collection")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def latencies_ms(search, queries: np.ndarray) -> np.ndarray:
    """Milliseconds for each query searched alone."""
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None, :])
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def row(name: str, lat: np.ndarray | None, batch_ms: float | None, recall: float | None, note: str = "") -> str:
    cells = [f"{name:<34}"]
    cells.append(f"{np.median(lat):9.2f} {np.percentile(lat, 99):9.2f}" if lat is not None else f"{'-':>9} {'-':>9}")
    cells.append(f"{batch_ms:9.3f}" if batch_ms is not None else f"{'-':>9}")
    cells.append(f"{recall:9.4f}" if recall is not None else f"{'-':>9}")
    return " ".join(cells) + (f"  {note}" if note else "")


HEADER = f"{'search':<34} {'p50 ms':>9} {'p99 ms':>9} {'batch ms':>9} {'recall@10':>9}"


def bench_exact(n: int, n_queries: int) -> None:
    print(f"\n== exact search, {n:,} x 1280 float32, {n_queries} single queries ==")
    data = clustered_embeddings(n + n_queries, seed=1)
    queries, data = data[n:], data[:n]
    ids = np.arange(n, dtype=np.int64)
    exact = ExactIndex(1280)
    exact.add(ids, data)
    flat = faiss.IndexFlatIP(1280)
    flat.add(data)

    ours = latencies_ms(lambda q: exact.search(q, K), queries)
    theirs = latencies_ms(lambda q: flat.search(q, K), queries)
    (ours_ids, _), ours_batch = timed(exact.search, queries, K)
    (_, theirs_ids), theirs_batch = timed(flat.search, queries, K)
    print(HEADER)
    print(row("ExactIndex (NumPy)", ours, ours_batch * 1e3 / n_queries, None))
    print(row("faiss IndexFlatIP (reference)", theirs, theirs_batch * 1e3 / n_queries, None))
    print(f"ratio ExactIndex / IndexFlatIP: p50 {np.median(ours) / np.median(theirs):.2f}x, "
          f"batch {ours_batch / theirs_batch:.2f}x; same top-{K} ids: "
          f"{recall_at_k(ours_ids, theirs_ids):.4f}; goal p50 <= 50 ms: "
          f"{'met' if np.median(ours) <= 50 else 'MISSED'}")


def bench_ivf(n: int, n_queries: int) -> None:
    print(f"\n== IVF index, {n:,} x 1280 float32, {n_queries} held-out queries ==")
    (data, gen_s) = timed(clustered_embeddings, n + n_queries, seed=2)
    queries, data = data[n:].copy(), data[:n]
    print(f"data generated in {gen_s:.0f} s ({data.nbytes / 2**30:.1f} GiB); peak RSS so far {peak_rss_gb():.1f} GiB")
    (_, truth), truth_s = timed(faiss.knn, queries, data, K, metric=faiss.METRIC_INNER_PRODUCT)

    exact = ExactIndex(1280)
    (_, copy_s) = timed(exact.add, np.arange(n, dtype=np.int64), data)
    del data  # the index holds its own copy; from here on only one copy is alive
    rss_before = peak_rss_gb()
    cpu_start = time.process_time()
    index, build_s = timed(IVFIndex.from_exact, exact)
    build_cpu = time.process_time() - cpu_start
    print(f"IVF build (PCA256 -> IVF{index.nlist} -> PQ 4-bit fast scan, trained on {min(n, 40 * index.nlist):,}; "
          f"shortlist {index.shortlist} re-ranked exactly): {build_s:.0f} s wall, {build_cpu:.0f} s CPU, "
          f"+ {copy_s:.0f} s to copy/normalise into the index; goal <= 300 s: "
          f"{'met' if build_s + copy_s <= 300 else 'MISSED'}")
    print(f"peak RSS {peak_rss_gb():.1f} GiB: {rss_before:.1f} GiB reached while the caller's array and the "
          f"index's copy were both alive, IVF training and codes took it {peak_rss_gb() - rss_before:.1f} GiB higher")

    exact_lat = latencies_ms(lambda q: exact.search(q, K), queries[:20])
    print(HEADER)
    print(row("ExactIndex (NumPy, 20 queries)", exact_lat, truth_s * 1e3 / n_queries, 1.0,
              "batch = faiss.knn ground truth"))
    default_nprobe = index.nprobe
    for nprobe in (default_nprobe // 2, default_nprobe, default_nprobe * 2):
        index.nprobe = nprobe
        lat = latencies_ms(lambda q: index.search(q, K), queries)
        (found, _), batch_s = timed(index.search, queries, K)
        recall = recall_at_k(found, truth)
        label = f"IVFIndex nprobe={nprobe}{' (default)' if nprobe == default_nprobe else ''}"
        print(row(label, lat, batch_s * 1e3 / n_queries, recall,
                  f"{np.median(exact_lat) / np.median(lat):.0f}x faster than exact"))

    index.nprobe = default_nprobe
    allowed = np.arange(0, n, 10)  # "same label only": a tenth of the collection
    mask = np.zeros(n, dtype=bool)
    mask[allowed] = True
    allowed_truth, _ = exact.search(queries, K, allowed=mask)
    for form, filter_ in (("id mask", mask), ("id array", allowed)):
        lat = latencies_ms(lambda q: index.search(q, K, allowed=filter_), queries[:50])
        found, _ = index.search(queries, K, allowed=filter_)
        print(row(f"IVFIndex, 10% allowed by {form}", lat, None, recall_at_k(found, allowed_truth),
                  "nprobe x10 with an id selector"))
    blob, save_s = timed(index.to_bytes)
    print(f"to_bytes: {len(blob) / 2**20:.0f} MiB in {save_s:.1f} s (codes + ids; the full vectors stay "
          f"in the embeddings table)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="IVF at 200k instead of 1M")
    parser.add_argument("--queries", type=int, default=300, help="held-out queries (default 300)")
    args = parser.parse_args(argv)
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {faiss.omp_get_max_threads()} threads")
    print(f"data: {DATA}")
    bench_exact(100_000, min(args.queries, 100))
    bench_ivf(200_000 if args.quick else 1_000_000, args.queries)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
