"""Web API speed: /api/similar over loopback against the in-process search step it wraps, in the same run.

The collection is SQLite with 100,000 stored vectors (--quick: 10,000): synthetic unit
vectors shaped like CNN embeddings (``bench/synthetic_embeddings.py``) written straight
into ``embeddings`` under the real backbone's feature-model row, with an image row each
(featurizing 100k images would take hours here). Queries by a new image therefore run
the real EfficientNet-Lite0 on the query, then search the synthetic vectors.

The server is ``lookalike.web.serve`` (uvicorn) in a subprocess; the client is httpx.
Measured per case: latency p50/p99 with one client, and requests/s with 1 and 4
concurrent clients. The reference is ``search.similar_images`` called in this process
(same database, same k), and the index search alone; "API / step" is the p50 ratio, of
calls interleaved one for one with the API's (so that load from elsewhere on a shared
machine weighs on both alike). Issue 11's goal: by id, API <= 1.2x the step.

    python bench/bench_api.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

from lookalike.backbones import load_backbone
from lookalike.db import Database, embeddings, feature_models, images, now, vector_bytes
from lookalike.samples import render_samples
from lookalike.search import collection, similar_images
from synthetic_embeddings import clustered_embeddings

LABELS = ("dotted", "striped", "leopard")
K = 10
ROWS_PER_INSERT = 5_000


def build_collection(db: Database, n: int) -> None:
    """n image rows and their synthetic embeddings under the real backbone's model row."""
    info = load_backbone().info
    vectors = clustered_embeddings(n, info.dim, seed=0)
    stamp = now()
    with db.begin() as conn:
        model_id = conn.execute(sa.insert(feature_models).values(
            name=info.name, weights_sha256=info.weights_sha256, dim=info.dim, input_size=info.input_size,
            preprocessing=info.preprocessing, created_at=stamp).returning(feature_models.c.id)).scalar_one()
    for start in range(0, n, ROWS_PER_INSERT):
        stop = min(n, start + ROWS_PER_INSERT)
        with db.begin() as conn:
            conn.execute(sa.insert(images), [
                {"id": i + 1, "sha256": hashlib.sha256(f"synthetic {i}".encode()).hexdigest(),
                 "label": LABELS[i % 3], "source": f"synthetic:{i}", "width": 224, "height": 224,
                 "format": "JPEG", "byte_size": 0, "status": "ok", "loaded_at": stamp}
                for i in range(start, stop)])
            conn.execute(sa.insert(embeddings), [
                {"image_id": i + 1, "model_id": model_id, "vector": vector_bytes(vectors[i])}
                for i in range(start, stop)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db_url: str, store: Path, port: int) -> subprocess.Popen:
    code = f"from lookalike.web.app import serve; serve({db_url!r}, {str(store)!r}, port={port})"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # start-up loads the index and the backbone before it answers
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not start in time")


def latencies(call, count: int) -> np.ndarray:
    out = np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        call(i)
        out[i] = time.perf_counter() - start
    return out


def paired(call, reference, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Latencies of ``call`` and ``reference``, alternated call by call (which goes first alternates too)."""
    out, ref = np.empty(count), np.empty(count)
    for i in range(count):
        for fn, times in ((call, out), (reference, ref))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            fn(i)
            times[i] = time.perf_counter() - start
    return out, ref


def throughput(call, count: int, clients: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, range(count)))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 vectors and fewer requests")
    args = parser.parse_args()
    n = 10_000 if args.quick else 100_000
    id_requests, upload_requests = (60, 16) if args.quick else (300, 60)

    with tempfile.TemporaryDirectory(prefix="bench-api-") as folder:
        root = Path(folder)
        db_url = f"sqlite:///{root}/bench.db"
        db = Database(db_url, root / "store")
        started = time.perf_counter()
        build_collection(db, n)
        print(f"collection: {n:,} synthetic 1280-d vectors written in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        coll = collection(db)
        print(f"index: {type(coll.index).__name__} built in {time.perf_counter() - started:.1f} s")
        uploads = [p.read_bytes() for p in sorted(render_samples(root / "samples", per_label=2, seed=3).root
                                                   .rglob("*.jpg"))]
        rng = np.random.default_rng(0)
        query_ids = [int(i) for i in rng.integers(1, n + 1, size=max(id_requests, 64))]

        # In-process references: the search step, and the index alone.
        similar_images(db, uploads[0], k=K)  # loads the backbone
        step_id = latencies(lambda i: similar_images(db, query_ids[i % len(query_ids)], k=K), id_requests)
        step_upload = latencies(lambda i: similar_images(db, uploads[i % len(uploads)], k=K), upload_requests)
        index_only = latencies(lambda i: coll.search(coll.stored_vector(query_ids[i % len(query_ids)]), K,
                                                    {query_ids[i % len(query_ids)]}), id_requests)

        port = free_port()
        server = start_server(db_url, root / "store", port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                              limits=httpx.Limits(max_connections=8)) as client:
                def post_id(i):
                    response = client.post("/api/similar", json={"id": query_ids[i % len(query_ids)], "k": K})
                    assert response.status_code == 200 and len(response.json()["results"]) == K, response.text

                def get_id(i):
                    response = client.get(f"/api/images/{query_ids[i % len(query_ids)]}/similar", params={"k": K})
                    assert response.status_code == 200 and len(response.json()["results"]) == K, response.text

                def post_upload(i):
                    response = client.post("/api/similar", files={"file": ("q.jpg", uploads[i % len(uploads)])},
                                           data={"k": str(K)})
                    assert response.status_code == 200 and len(response.json()["results"]) == K, response.text

                post_upload(0), post_id(0)  # first requests: connection set-up
                by_id = lambda i: similar_images(db, query_ids[i % len(query_ids)], k=K)  # noqa: E731
                by_bytes = lambda i: similar_images(db, uploads[i % len(uploads)], k=K)  # noqa: E731
                cases = [("POST /api/similar {id}", post_id, id_requests, by_id),
                         ("GET /api/images/{id}/similar", get_id, id_requests, by_id),
                         ("POST /api/similar file (new image)", post_upload, upload_requests, by_bytes)]
                rows = []
                for name, call, count, reference in cases:
                    lat, ref = paired(call, reference, count)
                    rows.append((name, count, np.percentile(lat, 50), np.percentile(lat, 99), 1 / lat.mean(),
                                 throughput(call, count, 4), np.percentile(lat, 50) / np.percentile(ref, 50)))
        finally:
            server.terminate()
            server.wait(timeout=30)
        db.close()

    print(f"\n{n:,} vectors, k={K}, {os.cpu_count()} CPUs, loopback HTTP (uvicorn subprocess, httpx client)")
    print(f"{'case':<36}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'req/s x1':>10}{'req/s x4':>10}{'API/step':>10}")
    for name, count, p50, p99, rate1, rate4, ratio in rows:
        print(f"{name:<36}{count:>9}{p50 * 1e3:>9.1f}{p99 * 1e3:>9.1f}{rate1:>10.1f}{rate4:>10.1f}{ratio:>10.2f}")
    print(f"{'in-process similar_images(id)':<36}{id_requests:>9}{np.percentile(step_id, 50) * 1e3:>9.1f}"
          f"{np.percentile(step_id, 99) * 1e3:>9.1f}{1 / step_id.mean():>10.1f}")
    print(f"{'in-process similar_images(bytes)':<36}{upload_requests:>9}{np.percentile(step_upload, 50) * 1e3:>9.1f}"
          f"{np.percentile(step_upload, 99) * 1e3:>9.1f}{1 / step_upload.mean():>10.1f}")
    print(f"{'index search alone':<36}{id_requests:>9}{np.percentile(index_only, 50) * 1e3:>9.1f}"
          f"{np.percentile(index_only, 99) * 1e3:>9.1f}{1 / index_only.mean():>10.1f}")


if __name__ == "__main__":
    main()
