"""Hashing speed: lookalike.hashing against imagehash and dhash on the same decoded JPEGs.

All three hash the same images, each decoded once by ``open_image``:
``compute_hashes`` (dhash row+col at sizes 1..8, aHash, dHash, pHash, wHash at
8), imagehash's four functions, and the dhash package at its 8 sizes, as a user
of those packages would call them. Every hash is checked for equality. Target:
>= 3x the two references together. One BLAS thread, so every side gets one core.

Also measured: JPEG draft decoding (``open_image(..., draft=DRAFT_SIZE)``), an
opt-in: its decode and hash speed, and how often its hashes equal the full
decode's.

    python bench/bench_hashing.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads: one core for every side

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import dhash
import imagehash
import numpy as np
from PIL import Image, ImageDraw
from skimage import data

from lookalike.phash import DRAFT_SIZE, compute_hashes
from lookalike.images import open_image

PHOTOS = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
          np.stack([data.camera()] * 3, -1), np.stack([data.moon()] * 3, -1), np.stack([data.coins()] * 3, -1)]


def render(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of about 400x400: photo crops, and shapes on gradients."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        size = (400, 400) if k % 3 else (400, 300)
        if k % 4:
            photo = PHOTOS[k % len(PHOTOS)]
            h, w = photo.shape[:2]
            ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BICUBIC)
        else:
            yy, xx = np.mgrid[0:size[1], 0:size[0]] / 400.0
            colours = rng.integers(0, 256, (2, 3))
            ramp = colours[0] * (1 - xx[..., None]) + colours[1] * yy[..., None]
            image = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x0, y0 = int(rng.integers(0, 350)), int(rng.integers(0, 250))
                box = [x0, y0, x0 + int(rng.integers(20, 150)), y0 + int(rng.integers(20, 150))]
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        path = folder / f"{k:04d}.jpg"
        image.save(path, "JPEG", quality=int(rng.integers(75, 96)))
        paths.append(path)
    return paths


def ours(img: Image.Image) -> list[str]:
    return [h.hex for h in compute_hashes(img)]


def imagehash_four(img: Image.Image) -> list[str]:
    return [str(f(img)) for f in (imagehash.average_hash, imagehash.dhash, imagehash.phash, imagehash.whash)]


def dhash_eight(img: Image.Image) -> list[str]:
    return [dhash.format_hex(*dhash.dhash_row_col(img, size=n), size=n) for n in range(1, 9)]


def best_time(fn, items, rounds: int) -> tuple[float, list]:
    """Fastest of ``rounds`` passes over ``items`` (the machine is shared), and the last results."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        results = [fn(item) for item in items]
        best = min(best, time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, one round")
    args = parser.parse_args()
    count, rounds = (60, 1) if args.quick else (300, 3)
    warnings.filterwarnings("ignore", "Image.Image.getdata is deprecated")  # inside the dhash package

    with tempfile.TemporaryDirectory() as tmp:
        paths = render(Path(tmp), count)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        decode_s, images = best_time(open_image, paths, rounds)
        ours(images[0]), imagehash_four(images[0]), dhash_eight(images[0])  # warm up

        ours_s, ours_hex = best_time(ours, images, rounds)
        ih_s, ih_hex = best_time(imagehash_four, images, rounds)
        dh_s, dh_hex = best_time(dhash_eight, images, rounds)
        same = sum(o == d + i for o, i, d in zip(ours_hex, ih_hex, dh_hex))

        draft_decode_s, drafts = best_time(lambda p: open_image(p, draft=DRAFT_SIZE), paths, rounds)
        draft_hash_s, _ = best_time(ours, drafts, rounds)
        full_values = [[h.value for h in compute_hashes(img)] for img in images]
        draft_values = [[h.value for h in compute_hashes(img)] for img in drafts]

    n = len(paths)
    ref_s = ih_s + dh_s
    print(f"{n} JPEGs {images[0].size[0]}x{images[0].size[1]} and {images[1].size[0]}x{images[1].size[1]}, "
          f"mean {kb:.0f} KB; hashes on the decoded image, one thread, best of {rounds}")
    print(f"{'':34} {'ms/image':>9} {'images/s':>9} {'ours is':>9}")
    rows = [("lookalike compute_hashes (12)", ours_s), ("imagehash a/d/p/w hash (4)", ih_s),
            ("dhash row+col sizes 1..8 (8)", dh_s), ("references together (12)", ref_s)]
    for name, seconds in rows:
        print(f"{name:34} {seconds / n * 1000:9.2f} {n / seconds:9.0f} {seconds / ours_s:8.2f}x")
    print(f"identical to the references: {same}/{n} images, all 12 hashes  (target: all, and >= 3x)")
    print(f"decode (open_image, full)          {decode_s / n * 1000:9.2f} ms/image")
    print(f"decode + hash, full:  ours {n / (decode_s + ours_s):6.0f} images/s, "
          f"references {n / (decode_s + ref_s):6.0f} images/s ({(decode_s + ref_s) / (decode_s + ours_s):.2f}x)")

    print(f"\nopt-in draft decode, draft={DRAFT_SIZE} -> {drafts[0].size[0]}x{drafts[0].size[1]}: "
          f"decode {draft_decode_s / n * 1000:.2f} ms, hash {draft_hash_s / n * 1000:.2f} ms per image; "
          f"decode + hash {n / (draft_decode_s + draft_hash_s):.0f} images/s "
          f"({(decode_s + ours_s) / (draft_decode_s + draft_hash_s):.2f}x the full decode)")
    print(f"{'hash':18} {'same as full decode':>20} {'mean bits apart':>16}")
    names = [f"dhash_rowcol {s}" for s in range(1, 9)] + ["ahash 8", "dhash 8", "phash 8", "whash 8"]
    for k, name in enumerate(names):
        apart = [(f[k] ^ d[k]).bit_count() for f, d in zip(full_values, draft_values)]
        print(f"{name:18} {np.mean(np.array(apart) == 0):19.1%} {np.mean(apart):16.2f}")


if __name__ == "__main__":
    main()
