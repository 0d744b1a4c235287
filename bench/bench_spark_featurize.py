"""Spark featurize speed: images/s per core of `lookalike spark featurize` in local[2] against the
single-machine `lookalike featurize` on the same cores, in the same run (issue 12's target: >= 0.8x).

Both embed the same rendered sample images (about 50 KB JPEGs) from the image store of a SQLite database
and write the embeddings into it. The single-machine step uses both cores (two decode-and-embed threads);
Spark runs two tasks, one per core, each Python worker loading the model once. The Spark figure is a
warm job (the JVM, the Python workers and their model loaded by a small job first), as on a long run where
those costs are spread over millions of images; the cold job's wall time is printed beside it.

    python bench/bench_spark_featurize.py [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lookalike.db import Database
from lookalike.features import featurize_images
from lookalike.ingest import load_images
from lookalike.samples import render_samples
from lookalike.spark.featurize import spark_featurize
from lookalike.spark.session import spark_session

CORES = 2


def loaded(folder: Path, name: str, manifest: Path) -> Database:
    db = Database(f"sqlite:///{folder}/{name}.db", folder / f"{name}-store")
    load_images(db, manifest, progress=False)
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images")
    parser.add_argument("--images", type=int, help="images per label (default 400, quick 40)")
    args = parser.parse_args()
    per_label = args.images or (40 if args.quick else 400)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        samples = render_samples(folder / "samples", per_label=per_label, seed=5, copy_share=0.0)
        warm_samples = render_samples(folder / "warm", per_label=4, seed=6, copy_share=0.0)
        print(f"{samples.images} images, {os.cpu_count()} cores on this machine, local[{CORES}]; "
              f"load average {os.getloadavg()[0]:.1f} at the start")

        with loaded(folder, "single", samples.manifest) as db:
            featurize_images(db, progress=False)   # the model loaded, ONNX exported: not timed
        with loaded(folder, "single2", samples.manifest) as db:
            started = time.perf_counter()
            single = featurize_images(db, progress=False)
            single_s = time.perf_counter() - started
        single_rate = single.embedded / single_s / CORES

        started = time.perf_counter()
        spark = spark_session(f"local[{CORES}]", app="bench-spark-featurize")
        spark.conf.set("spark.sql.shuffle.partitions", str(CORES))
        with loaded(folder, "warm", warm_samples.manifest) as db:
            spark_featurize(db, session=spark, out=folder / "warm-out")
        cold_s = time.perf_counter() - started
        with loaded(folder, "spark", samples.manifest) as db:
            started = time.perf_counter()
            job = spark_featurize(db, session=spark, out=folder / "spark-out")
            spark_s = time.perf_counter() - started
        spark.stop()
        spark_rate = job.step.embedded / spark_s / CORES

        print(f"single-machine featurize: {single.embedded} images in {single_s:.1f} s, "
              f"{single_rate:.1f} images/s per core")
        print(f"spark featurize local[{CORES}] (warm job, Parquet and the database write included): "
              f"{job.step.embedded} images in {spark_s:.1f} s, {spark_rate:.1f} images/s per core")
        print(f"  cold start (JVM, Python workers, model loads, a {warm_samples.images}-image job): {cold_s:.1f} s")
        print(f"ratio spark / single per core: {spark_rate / single_rate:.2f}x (target >= 0.8x); "
              f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
