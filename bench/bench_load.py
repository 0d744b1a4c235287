"""Load speed: 5,000 local ~50 KB JPEGs into a new SQLite database (target >= 300 images/s).

Also timed in the same run, as the floor any loader pays: reading every file
and hashing its bytes (sha256) with nothing else. The files are photo-like
noise-textured JPEGs of about 50 KB, written once into a temp folder (one
sub-folder per label, the ImageStore layout).

    python bench/bench_load.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.db import Database
from lookalike.ingest import load_images


def write_jpegs(root: Path, count: int) -> int:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    total = 0
    for i in range(count):
        label = ("dotted", "striped", "leopard")[i % 3]
        noise = rng.integers(-40, 40, (96, 128, 3))
        tile = Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)).resize((420, 320))
        buffer = io.BytesIO()
        tile.save(buffer, "JPEG", quality=80)
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{label}_{i:05d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 files instead of 5,000")
    args = parser.parse_args()
    count = 1_000 if args.quick else 5_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        size = write_jpegs(root, count)
        print(f"{count} JPEGs, mean {size / count / 1024:.0f} KB")

        started = time.perf_counter()
        for path in root.rglob("*.jpg"):
            hashlib.sha256(path.read_bytes()).hexdigest()
        floor = time.perf_counter() - started

        started = time.perf_counter()
        with Database(f"sqlite:///{tmp}/load.db", Path(tmp) / "store") as db:
            summary = load_images(db, root, progress=False)
        seconds = time.perf_counter() - started
        assert summary.loaded == count, summary.lines()
        print(f"read+sha256 only : {count / floor:8.0f} images/s")
        print(f"lookalike load   : {count / seconds:8.0f} images/s  ({seconds:.1f} s; target >= 300)")


if __name__ == "__main__":
    main()
