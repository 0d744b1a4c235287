"""Benchmark the persistent vector index against the old load-everything search, on SQLite.

    python bench/bench_index.py            # 1,000,000 stored 1280-d vectors (about 20 minutes on 2 cores)
    python bench/bench_index.py --quick    # 100,000

N clustered synthetic embeddings (bench/synthetic_embeddings.py) are written into a
SQLite file; then each measurement runs in a fresh process (wall time and that
process's peak RSS, from wait4):

- the index build (`lookalike index rebuild`; IVF from 200,000 vectors);
- a cold `lookalike similar ID` by id: Python start, imports, opening the index, the search;
- the old path in the same run: every vector loaded from the database into an in-memory
  index (what each process did before), then the same search;
- 1,000 embeddings added by another writer, then a cold `similar` again (catch-up, no rebuild);
- recall@10 of the IVF search on a sample (`lookalike index status`) and its p50 latency in-process.

``--space``: the same in the ``pca`` similarity space (`lookalike fit` after the write, which builds
the space's own index folder; `similar` then answers in it by default), against the old path of a
space search: every stored space vector loaded into memory in each process.

Goals (issue 11), at 1M: cold by-id <= 1.5 s and <= 1.5 GB; add 1,000 + search <= 2 s without a
rebuild; IVF build <= 3 GiB and <= 5 min; recall@10 >= 0.95 at p50 <= 5 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).parent
ADDED = 1000
WRITE_ROWS = 20_000

_WRITE = """
import sys, numpy as np, sqlalchemy as sa
sys.path.insert(0, {here!r})
from synthetic_embeddings import clustered_embeddings
from lookalike.db import Database, embeddings, feature_models, images, now, vector_bytes
n, start, seed = {n}, {start}, {seed}
db = Database({url!r})
with db.begin() as conn:
    model = conn.execute(sa.select(feature_models.c.id)).scalar() or conn.execute(sa.insert(feature_models).values(
        name="efficientnet-lite0", weights_sha256="b" * 64, dim=1280, input_size=224, preprocessing="bench",
        created_at=now()).returning(feature_models.c.id)).scalar_one()
vectors = clustered_embeddings(n, seed=seed)
stamp = now()
for lo in range(0, n, {rows}):
    ids = range(start + lo, start + min(n, lo + {rows}))
    with db.begin() as conn:
        conn.execute(sa.insert(images), [dict(id=i, sha256=f"{{i:064x}}", source=f"bench/{{i}}.jpg", byte_size=1,
                                              status="ok", loaded_at=stamp, label=f"l{{i % 10}}") for i in ids])
        conn.execute(sa.insert(embeddings), [dict(image_id=i, model_id=model, vector=vector_bytes(vectors[i - start]))
                                             for i in ids])
"""

_OLD_PATH = """
import sys, numpy as np
from lookalike.db import Database
from lookalike.db import latest_feature_model, load_embeddings
from lookalike.vectors import build_index
db = Database({url!r})
with db.engine.connect() as conn:
    ids, matrix = load_embeddings(conn, latest_feature_model(conn))
index = build_index(ids, matrix)
query = int({query})
found, _ = index.search(matrix[np.flatnonzero(ids == query)[0]][None, :], 10, exclude=[[query]])
print(found[0].tolist())
"""

_OLD_SPACE_PATH = """
import sys, numpy as np, sqlalchemy as sa
from lookalike.db import Database, latest_feature_model, space_vectors, embeddings, vector_from_bytes
from lookalike.projection import load_space
from lookalike.vectors import build_index
db = Database({url!r})
with db.engine.connect() as conn:
    space = load_space(conn, "pca", latest_feature_model(conn))
    rows = conn.execute(sa.select(space_vectors.c.image_id, space_vectors.c.vector)
                        .join(embeddings, sa.and_(embeddings.c.image_id == space_vectors.c.image_id,
                                                  embeddings.c.model_id == space.feature_model_id))
                        .where(space_vectors.c.space_id == space.id).order_by(space_vectors.c.image_id)).all()
ids = np.array([r.image_id for r in rows], dtype=np.int64)
matrix = np.stack([vector_from_bytes(r.vector) for r in rows])
index = build_index(ids, matrix)
query = int({query})
found, _ = index.search(matrix[np.flatnonzero(ids == query)[0]][None, :], 10, exclude=[[query]])
print(found[0].tolist())
"""

_LATENCY = """
import json, time, numpy as np
from lookalike.db import Database
from lookalike.index import open_index
from lookalike.projection import load_space
db = Database({url!r})
with db.engine.connect() as conn:
    space = load_space(conn, "pca", 1) if {space} else None
index = open_index(db, 1, space=space)
rows = np.random.default_rng(1).choice(index.ids, 200, replace=False)
p50 = []
for _pass in ("cold", "warm"):   # cold: the mapped IVF codes are first touched by these queries
    times = []
    for image_id in rows.tolist():
        q = index.vector(image_id)
        t = time.perf_counter(); index.search(q, 10, exclude={{image_id}}); times.append(time.perf_counter() - t)
    p50.append(1e3 * float(np.median(times)))
print(json.dumps({{"kind": index.kind, "cold_ms": p50[0], "warm_ms": p50[1]}}))
"""


def measured(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of a fresh process, reaped with wait4 for its own rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(argv[:4])} failed ({child.returncode}): {err.read().strip()[-2000:]}")
        return wall, usage.ru_maxrss / 2**20, out.read()


def lookalike(*args: str) -> list[str]:
    return [sys.executable, "-m", "lookalike.cli", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 vectors instead of 1,000,000")
    parser.add_argument("-n", type=int, help="vectors to store (overrides --quick)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--skip-old", action="store_true", help="do not measure the old load-everything path")
    parser.add_argument("--keep", action="store_true", help="keep the database and index (in --dir) afterwards")
    parser.add_argument("--space", action="store_true", help="search in a fitted pca space instead of the "
                        "embeddings")
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    with contextlib.nullcontext(tempfile.mkdtemp(prefix="bench-index-", dir=args.dir)) if args.keep else \
            tempfile.TemporaryDirectory(prefix="bench-index-", dir=args.dir) as work:
        url = f"sqlite:///{work}/bench.db"
        print(f"bench_index: {n:,} clustered 1280-d vectors in SQLite ({work}), 2 cores", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _WRITE.format(here=str(HERE), n=n, start=1, seed=0, url=url,
                                                             rows=WRITE_ROWS)], check=True)
        print(f"  wrote {n:,} embeddings in {time.perf_counter() - started:.0f} s "
              f"({os.path.getsize(f'{work}/bench.db') / 2**30:.2f} GiB)", flush=True)
        query = str(n // 2)
        results = {}
        results["build"] = measured(lookalike("fit", "--db", url) if args.space else
                                    lookalike("index", "rebuild", "--db", url))
        print(f"  {results['build'][2].strip()}", flush=True)
        folder = next(Path(work, "bench.store.index").glob("model-1-space-*")) if args.space else \
            Path(work, "bench.store.index", "model-1")
        colds = [measured(lookalike("similar", query, "--json", "--db", url)) for _ in range(3)]
        results["cold"] = sorted(colds)[1]
        new_ids = json.loads(results["cold"][2])
        if not args.skip_old:
            results["old"] = measured([sys.executable, "-c", (_OLD_SPACE_PATH if args.space else _OLD_PATH)
                                       .format(url=url, query=query)])
            old_ids = json.loads(results["old"][2])
        epoch = json.loads((folder / "header.json").read_text())["header"]["epoch"]
        subprocess.run([sys.executable, "-c", _WRITE.format(here=str(HERE), n=ADDED, start=n + 1, seed=1, url=url,
                                                             rows=WRITE_ROWS)], check=True)
        results["added"] = measured(lookalike("similar", query, "--json", "--db", url))
        header = json.loads((folder / "header.json").read_text())["header"]
        status = measured(lookalike("index", "status", "--db", url))[2]
        latency = json.loads(measured([sys.executable, "-c", _LATENCY.format(url=url, space=args.space)])[2])

    print(f"\n{'measure':<44} {'wall s':>8} {'peak GiB':>9}")
    names = {"build": "lookalike fit (pca, and its index)" if args.space else "index build (lookalike index rebuild)", "cold": "cold `similar ID` (index), median of 3",
             "old": "cold `similar ID` (old: load everything)", "added": f"+{ADDED} embeddings, cold `similar ID`"}
    for key, label in names.items():
        if key in results:
            print(f"{label:<44} {results[key][0]:8.2f} {results[key][1]:9.2f}")
    if "old" in results:
        print(f"ratios old/index: wall {results['old'][0] / results['cold'][0]:.1f}x, "
              f"peak RSS {results['old'][1] / results['cold'][1]:.1f}x; same top-10 as the old path: "
              f"{[m['image_id'] for m in new_ids] == old_ids}")
    print(f"after +{ADDED}: rebuilt: {header['epoch'] != epoch}, {header['live']:,} vectors, "
          f"generation {header['generation']}")
    print(f"search in-process ({latency['kind']}), 200 queries: p50 {latency['cold_ms']:.2f} ms on first touch, "
          f"{latency['warm_ms']:.2f} ms warm")
    print(status.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
