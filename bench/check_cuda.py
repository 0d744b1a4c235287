"""The CUDA path of featurize, end to end, on a machine with an NVIDIA GPU.

    python bench/check_cuda.py [--per-label 100]

Renders the sample set, loads it into two SQLite files and featurizes one with
``lookalike featurize --device cuda`` and the other on the CPU (ONNX Runtime,
the default engine), each through the CLI as a user runs it. Then it checks
that every image got an embedding on both, that the two agree (cosine distance,
largest element difference), that ``lookalike similar`` answers the same top 10
from both, and prints images/s of each with the machine's GPU and core count.
Exits 1 when they disagree. No GPU here: it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lookalike.db import Database, latest_feature_model, load_embeddings


def lookalike(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lookalike.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lookalike {' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=100, help="sample images per label")
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a dry run)")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device here: nothing to check")
            return 2
        print(torch.cuda.get_device_name(0), end=", ")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lookalike("samples", str(work / "samples"), "--per-label", str(args.per_label), "--db",
                  f"sqlite:///{work}/render.db", "-q")
        vectors, seconds, top = {}, {}, {}
        for device, name in ((args.device, "checked"), ("cpu", "cpu")):
            url = f"sqlite:///{work}/{name}.db"
            lookalike("load", str(work / "samples" / "manifest.tsv"), "--db", url, "-q")
            started = time.perf_counter()
            lookalike("featurize", "--device", device, "--db", url, "-q")
            seconds[name] = time.perf_counter() - started
            with Database(url) as db, db.engine.connect() as conn:
                vectors[name] = load_embeddings(conn, latest_feature_model(conn))
            top[name] = [m["image_id"] for m in json.loads(lookalike("similar", "1", "--json", "--db", url))]
    (gpu_ids, gpu), (cpu_ids, cpu) = vectors["checked"], vectors["cpu"]
    n = len(cpu_ids)
    same_ids = np.array_equal(gpu_ids, cpu_ids)
    distance = 1 - np.sum(gpu * cpu, axis=1) / (np.linalg.norm(gpu, axis=1) * np.linalg.norm(cpu, axis=1))
    largest = float(np.abs(gpu - cpu).max())
    for name, device in (("checked", args.device), ("cpu", "cpu")):
        print(f"featurize --device {device}: {n} images in {seconds[name]:.1f} s, "
              f"{n / seconds[name]:.1f} images/s (the whole command: start, model load, decode, writes)")
    print(f"embeddings for the same {n} images: {same_ids}; cosine distance {args.device}/cpu max "
          f"{distance.max():.2e}, largest element difference {largest:.2e}; same top 10 for image 1: "
          f"{top['checked'] == top['cpu']}")
    ok = same_ids and distance.max() < 1e-4 and top["checked"] == top["cpu"]
    print(f"{args.device} path OK" if ok else f"{args.device} path DISAGREES with the CPU")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
