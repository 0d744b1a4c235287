"""Export throughput: lookalike's concurrent export against a one-at-a-time loop, in the same run.

The rendered sample set (~330 JPEG/PNG images at per_label=100) is loaded and
split, then exported to a local folder and to Azurite (the Azure Blob emulator,
from scripts/install-azurite.sh) by:

- ``export_images`` (thread pool, concurrency 8, content hashes, manifests), and
- a naive loop: the same objects copied / uploaded one after another with the
  stock client, no checks, no manifests.

A second ``export_images`` run, with everything already there, shows what a
resumed or repeated export costs. Timings on a shared 2-core machine are noisy.

    python bench/bench_export.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # for support.azurite

from lookalike.db import Database  # noqa: E402
from lookalike.export import ExportObject, export_images, plan_export  # noqa: E402
from lookalike.ingest import load_images  # noqa: E402
from lookalike.samples import render_samples  # noqa: E402
from lookalike.split import split_images  # noqa: E402
from support.azurite import Azurite, find_azurite  # noqa: E402

ENV = "AZURE_STORAGE_CONNECTION_STRING"


def naive_folder(db: Database, objects: tuple[ExportObject, ...], root: Path) -> None:
    for obj in objects:
        target = root / obj.key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(db.store.path(obj.sha256), target)


def naive_blobs(db: Database, objects: tuple[ExportObject, ...], conn_str: str, container: str) -> None:
    from azure.storage.blob import ContainerClient, ContentSettings
    with ContainerClient.from_connection_string(conn_str, container) as client:
        for obj in objects:
            client.upload_blob(obj.key, db.store.get(obj.sha256), overwrite=True,
                               content_settings=ContentSettings(content_type=obj.content_type))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~66 images instead of ~330")
    args = parser.parse_args()
    per_label = 20 if args.quick else 100

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        render_samples(work / "samples", per_label=per_label, seed=0)
        db = Database(f"sqlite:///{work}/bench.db", work / "store")
        load_images(db, work / "samples", progress=False)
        split_images(db)
        objects = plan_export(db).objects
        megabytes = sum(o.byte_size for o in objects) / 1e6
        print(f"{len(objects)} images, {megabytes:.1f} MB, concurrency 8\n")
        rows = []

        naive = timed(lambda: naive_folder(db, objects, work / "naive"))
        ours = timed(lambda: export_images(db, str(work / "out"), progress=False))
        again = timed(lambda: export_images(db, str(work / "out"), progress=False))
        rows += [("folder", "naive copy loop", naive, naive), ("folder", "export_images", ours, naive),
                 ("folder", "export_images, all there", again, None)]

        if find_azurite() is None:
            print("Azurite not installed (scripts/install-azurite.sh): blob rows skipped\n")
        else:
            with Azurite() as azurite:
                from azure.storage.blob import BlobServiceClient
                service = BlobServiceClient.from_connection_string(azurite.connection_string)
                naive_container, container = (f"bench-{uuid.uuid4().hex[:8]}" for _ in range(2))
                service.create_container(naive_container)
                service.create_container(container)
                os.environ[ENV] = azurite.connection_string
                naive = timed(lambda: naive_blobs(db, objects, azurite.connection_string, naive_container))
                ours = timed(lambda: export_images(db, f"az://{container}/x", progress=False))
                again = timed(lambda: export_images(db, f"az://{container}/x", progress=False))
                rows += [("azurite", "naive upload loop", naive, naive), ("azurite", "export_images", ours, naive),
                         ("azurite", "export_images, all there", again, None)]
        db.close()

    print(f"{'target':<9} {'method':<26} {'seconds':>8} {'images/s':>9} {'MB/s':>7} {'vs naive':>9}")
    for target, method, seconds, reference in rows:
        ratio = f"{reference / seconds:.2f}x" if reference else ""
        print(f"{target:<9} {method:<26} {seconds:>8.2f} {len(objects) / seconds:>9.0f} "
              f"{megabytes / seconds:>7.1f} {ratio:>9}")


if __name__ == "__main__":
    main()
