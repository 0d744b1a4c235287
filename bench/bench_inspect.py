"""Benchmark of `lookalike inspect`: does it find planted blurry, dark, bright, low-information,
odd-aspect and tiny images among clean ones, and how fast?

    python bench/bench_inspect.py [--quick | --full] [--devset DIR] [--per-label N]

Clean images: the originals of the dev set (bench/devset.py: real photographs from Debian and PyPI
packages, never their planted copies) and of the sample set (lookalike.samples). Each clean image
also gets one planted copy, the kinds dealt in turn:

- blurry: a Gaussian blur of radius 1 % of the long side;
- dark: brightness x 0.25;
- bright: blended 80 % toward white (washed out);
- low-information: the image's mean colour with 4 % of the image left;
- tiny: scaled to 64 px on the long side;
- odd-aspect: a horizontal strip a quarter as high as it is wide.

All are saved as JPEG (quality 90), loaded into SQLite and inspected. Printed per set and flag:
planted, flagged, precision and recall (a clean image with a flag counts against precision), the
clean images that got a flag, and the images/s of the inspect step (decode included).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from lookalike.db import Database
from lookalike.images import open_image
from lookalike.ingest import load_images
from lookalike.quality import FLAGS, quality_report, inspect_images
from lookalike.samples import render_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devset import DevsetError, build_devset  # noqa: E402


def _blurry(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(max(img.size) / 100))


def _dark(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(0.25)


def _bright(img: Image.Image) -> Image.Image:
    return Image.blend(img, Image.new("RGB", img.size, "white"), 0.8)


def _low_information(img: Image.Image) -> Image.Image:
    mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(axis=0))
    return Image.blend(Image.new("RGB", img.size, mean), img, 0.04)


def _tiny(img: Image.Image) -> Image.Image:
    small = img.copy()
    small.thumbnail((64, 64))
    return small


def _odd_aspect(img: Image.Image) -> Image.Image:
    width, height = img.size
    strip = max(1, width // 4)
    top = (height - strip) // 2 if height > strip else 0
    return img.crop((0, top, width, top + min(strip, height)))


PLANTS = {"blurry": _blurry, "dark": _dark, "bright": _bright, "low-information": _low_information,
          "tiny": _tiny, "odd-aspect": _odd_aspect}


def originals(root: Path) -> list[Path]:
    """The images of a dev or sample set that are not its planted near-copies."""
    copies = {row["copy"] for row in csv.DictReader((root / "ground_truth.csv").open(encoding="utf-8"))}
    lines = (root / "manifest.tsv").read_text(encoding="utf-8").splitlines()
    paths = [line.split("\t")[-1] for line in lines if line.strip()]
    return [root / p for p in paths if p not in copies]


def plant(name: str, sources: list[Path], out: Path) -> dict[str, set[str]]:
    """Each source as it is and one planted copy into ``out/name``; returns file name -> flags planted."""
    folder = out / name
    folder.mkdir(parents=True)
    truth: dict[str, set[str]] = {}
    kinds = list(PLANTS)
    for i, path in enumerate(sources):
        image = open_image(path)
        stem = f"{name}_{i:04d}"
        image.save(folder / f"{stem}.jpg", quality=90)
        truth[f"{stem}.jpg"] = set()
        kind = kinds[i % len(kinds)]
        PLANTS[kind](image).save(folder / f"{stem}_{kind}.jpg", quality=90)
        truth[f"{stem}_{kind}.jpg"] = {kind}
    return truth


def report(name: str, truth: dict[str, set[str]], found: dict[str, set[str]]) -> None:
    print(f"\n{name}: {sum(1 for t in truth.values() if not t)} clean, "
          f"{sum(1 for t in truth.values() if t)} planted")
    print(f"  {'flag':<16} {'planted':>7} {'flagged':>7} {'found':>5} {'precision':>9} {'recall':>6}")
    for flag in FLAGS:
        planted = {f for f, t in truth.items() if flag in t}
        flagged = {f for f in truth if flag in found.get(f, set())}
        hit = len(planted & flagged)
        precision = f"{hit / len(flagged):.3f}" if flagged else "-"
        recall = f"{hit / len(planted):.3f}" if planted else "-"
        print(f"  {flag:<16} {len(planted):>7} {len(flagged):>7} {hit:>5} {precision:>9} {recall:>6}")
    clean_flagged = sorted((f, sorted(found[f])) for f, t in truth.items() if not t and found.get(f))
    print(f"  clean images flagged: {len(clean_flagged)}"
          + "".join(f"\n    {f}: {', '.join(flags)}" for f, flags in clean_flagged))
    extra = sorted((f, sorted(found.get(f, set()) - t)) for f, t in truth.items() if t and found.get(f, set()) - t)
    print(f"  planted images with another flag too: {len(extra)}"
          + "".join(f"\n    {f}: {', '.join(flags)}" for f, flags in extra))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="8 dev-set families, 20 samples per label")
    size.add_argument("--full", action="store_true", help="the whole dev set, 100 samples per label")
    parser.add_argument("--devset", type=Path, default=None, help="a dev set already built by bench/devset.py")
    parser.add_argument("--per-label", type=int, default=None, help="sample-set originals per label")
    args = parser.parse_args()
    per_label = args.per_label or (20 if args.quick else 100)

    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        tmp = Path(tmp)
        truths: dict[str, dict[str, set[str]]] = {}
        try:
            devset = args.devset or build_devset(tmp / "devset", families=8 if args.quick else None).root
            truths["dev set (real photographs)"] = plant("dev", originals(devset), tmp / "planted")
        except DevsetError as err:
            print(f"dev set skipped: {err}")
        samples = render_samples(tmp / "samples", per_label=per_label, seed=0, copy_share=0.0)
        truths[f"sample set ({per_label} per label)"] = plant("sample", originals(samples.root), tmp / "planted")

        with Database(f"sqlite:///{tmp / 'bench.db'}", tmp / "store") as db:
            load_images(db, str(tmp / "planted"))
            started = time.perf_counter()
            summary = inspect_images(db, all_images=True)
            seconds = time.perf_counter() - started
            found: dict[str, set[str]] = {}
            for flag in FLAGS:
                for row in quality_report(db, flag=flag).rows:
                    found.setdefault(Path(row.source).name, set()).add(flag)
        print("\n".join(summary.lines()))
        print(f"inspect: {summary.inspected} images in {seconds:.1f} s: {summary.inspected / seconds:.1f} images/s "
              f"(decode included, 2 threads)")
        for name, truth in truths.items():
            report(name, truth, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
