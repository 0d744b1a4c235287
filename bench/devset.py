"""The dedupe dev set: real photographs from Debian and PyPI packages, with planted copies and hard negatives.

    python bench/devset.py [OUT] [--seed 0] [--cache DIR] [--families N]

OUT (default bench/out/devset) receives, in one folder per source package:

- ``<stem>.jpg``: an original, the source photograph scaled to at most
  ``MAX_SIDE`` pixels on its long side;
- ``<stem>_copyK.jpg``: ``COPIES`` copies of each original, each by another of
  ``TRANSFORMS`` (lookalike.samples.copy_image, the sample renderer's
  transforms; a few combined, e.g. ``mirror+crop:0.12``);
- ``<stem>_recolour.jpg``: the original with its hues turned (the same design in
  another colour), for colourful originals;
- ``<stem>_pattern1.jpg``, ``_pattern2.jpg``: two non-overlapping crops of a
  photograph of a repetitive surface (different photos of one tiled pattern);
- ``<stem>_framing1.jpg``, ``_framing2.jpg``: two crops of one photograph that
  overlap by 20–35 % (near-identical shots that are not copies).

and ``ground_truth.csv`` (``copy,original,transform``), ``hard_negatives.csv``
(``a,b,kind``: pairs that must never be merged), ``manifest.tsv`` (headerless
``label<TAB>path``, for ``lookalike load``; label = source package) and
``sources.tsv`` (each original and negative source: package, version, path in
the package, sha256 of the source file). Paths are relative to OUT; ``<stem>``
is the source file's stem, with its folder in front where two sources share
one. The same seed and the same source packages give byte-identical files.

Where the photographs come from (none of plasma-workspace-wallpapers,
gnome-backgrounds, gimp-data or scikit-image's photos, which are kept for an
independent check):

- Debian 12 packages, fetched on first use with ``apt-get download`` (no root
  needed, nothing installed) into ``<cache>/debs``, and the files used are
  unpacked with ``dpkg-deb`` and ``tar`` into ``<cache>/pkgs``; the cache defaults to ``.cache/devset``
  at the repository root. apt's package lists must exist (``apt-get update``
  once, as root). About 180 MB, most of it opencv-doc. To build offline, put the
  ``.deb`` files into ``<cache>/debs`` yourself.
- PyPI packages already in requirements.txt: scikit-learn's and matplotlib's
  sample photographs, found in the installed packages.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.images import open_image
from lookalike.samples import copy_image

MAX_SIDE = 1024        # originals are scaled to this long side: copies of huge wallpapers stay cheap
ORIGINAL_QUALITY = 92  # JPEG quality of originals and negatives
COPIES = 5             # copies per original
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "devset"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "devset"

MATE = "usr/share/backgrounds/mate/nature/"
LOMIRI = "usr/share/backgrounds/"
OPENCV = "usr/share/doc/opencv-doc/examples/"

# (package, path inside it): photographs that become originals with copies.
FAMILIES = [
    *(("mate-backgrounds", MATE + name) for name in (
        "Aqua.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "LadyBird.jpg", "Storm.jpg", "TwoWings.jpg",
        "YellowFlower.jpg")),
    *(("lomiri-wallpapers-16.04", LOMIRI + name) for name in (
        "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg",
        "Wine_by_Jakkub_Mede.jpg", "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg", "seeding_by_Clements_Engelhardt.jpg")),
    ("lomiri-wallpapers-20.04", LOMIRI + "Infinite-Sea_by_Aury88.jpg"),
    *(("opencv-doc", OPENCV + "data/" + name) for name in (
        "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "box.png", "box_in_scene.png",
        "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png",
        "home.jpg", "left.jpg", "left01.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg",
        "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg", "sudoku.png")),
    *(("opencv-doc", OPENCV + name) for name in (
        "alphamat/input_images/plant.jpg", "dnn_superres/butterfly.png", "hfs/data/000.jpg", "reg/home.png",
        "text/scenetext01.jpg", "text/scenetext02.jpg", "text/scenetext03.jpg", "text/scenetext04.jpg",
        "text/scenetext05.jpg", "text/scenetext06.jpg", "text/scenetext_segmented_word01.jpg",
        "text/scenetext_segmented_word02.jpg", "text/scenetext_segmented_word04.jpg")),
    ("scikit-learn", "sklearn/datasets/images/china.jpg"),
    ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
    ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
]
# Photographs of repetitive surfaces: two non-overlapping crops each.
PATTERNS = [
    *(("mate-backgrounds", MATE + name) for name in ("Blinds.jpg", "GreenMeadow.jpg", "RainDrops.jpg", "Wood.jpg")),
    ("lomiri-wallpapers-16.04", LOMIRI + "analogpattern_by_Peter_Nerlich.jpg"),
    ("mypaint-data-extras", "usr/share/mypaint/backgrounds/ramon/HR_Cork.png"),
    ("opencv-doc", OPENCV + "data/board.jpg"),
]
# Wide photographs: two crops with different framing.
FRAMINGS = [
    *(("lomiri-wallpapers-16.04", LOMIRI + name) for name in (
        "Bridge_by_Sander_Klootwijk.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg", "sunset_by_Aitzol_Berasategi.jpg")),
    ("lomiri-wallpapers-20.04", LOMIRI + "Kleiber_by_Lukas_Baubkus.jpg"),
]
PYPI = {"scikit-learn": "sklearn", "matplotlib": "matplotlib"}  # distribution -> top-level package

# Copy transforms (ops of lookalike.samples.COPY_OPS, "+" combines), dealt so each gets about as many copies.
TRANSFORMS = ("mirror", "crop", "rotate", "resize", "jpeg", "light", "grey", "blur", "text", "watermark",
              "squash", "border", "pad", "mirror+crop", "resize+jpeg")
RECOLOUR_MIN_SATURATION = 0.25  # mean HSV saturation (0..1) an original needs for a recoloured twin


class DevsetError(Exception):
    """A source package is missing or cannot be fetched; the message says what to do."""


@dataclass(frozen=True)
class Devset:
    root: Path
    images: int
    copies: int
    negatives: int
    manifest: Path
    ground_truth: Path
    hard_negatives: Path


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Package:
    root: Path
    version: str


def _debian(package: str, cache: Path, wanted: list[str]) -> _Package:
    """The package's ``wanted`` files, unpacked from its .deb (downloaded into the cache on first use)."""
    debs, unpacked = cache / "debs", cache / "pkgs" / package
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        debs.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", "-q", package], cwd=debs, check=True, timeout=600,
                           capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise DevsetError(f"Debian package {package} is missing from {debs} and 'apt-get download {package}' "
                              f"failed ({detail.strip().splitlines()[-1] if detail.strip() else err}); run "
                              f"'apt-get update' as root, or put {package}_*.deb into {debs}") from None
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    try:
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        stamp = unpacked / ".version"
        if not stamp.exists() or stamp.read_text() != version or not all((unpacked / p).exists() for p in wanted):
            shutil.rmtree(unpacked, ignore_errors=True)
            unpacked.mkdir(parents=True)
            tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(unpacked), *(f"./{p}" for p in wanted)], input=tar, check=True,
                           capture_output=True)
            stamp.write_text(version)
    except (OSError, subprocess.CalledProcessError) as err:
        raise DevsetError(f"cannot unpack {deb.name} ({err}); it needs dpkg-deb and tar, and these files in it: "
                          f"{', '.join(wanted)}") from None
    return _Package(unpacked, version)


def _pypi(distribution: str) -> _Package:
    spec = util.find_spec(PYPI[distribution])  # locates the package without importing it
    if spec is None or not spec.origin:
        raise DevsetError(f"PyPI package {distribution} is not installed: pip install {distribution}")
    return _Package(Path(spec.origin).parent.parent, metadata.version(distribution))


def _packages(cache: Path) -> dict[str, _Package]:
    wanted: dict[str, list[str]] = {}
    for package, inside in FAMILIES + PATTERNS + FRAMINGS:
        wanted.setdefault(package, []).append(inside)
    found, missing = {}, []
    for name in sorted(wanted):
        try:
            found[name] = _pypi(name) if name in PYPI else _debian(name, cache, wanted[name])
        except DevsetError as err:
            missing.append(str(err))
    if missing:
        raise DevsetError("cannot build the dev set:\n  " + "\n  ".join(missing))
    return found


# --------------------------------------------------------------------------- hard negatives


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _recolour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Turn every hue by 90–270°: the same design in another colour."""
    h, s, v = image.convert("HSV").split()
    shift = int(rng.integers(64, 193))
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _saturation(image: Image.Image) -> float:
    return float(np.asarray(image.convert("HSV"))[..., 1].mean() / 255)


def _two_crops(image: Image.Image, overlap: tuple[float, float] | None,
               rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Two crops of 48 % of the width side by side: apart (``overlap`` None) or overlapping by that share."""
    w, h = image.size
    cw, ch = round(w * 0.48), round(h * 0.8)
    if overlap is None:
        lefts = (int(rng.integers(0, w // 2 - cw + 1)), w // 2 + int(rng.integers(0, w - w // 2 - cw + 1)))
    else:
        shift = round(cw * (1 - rng.uniform(*overlap)))
        first = int(rng.integers(0, w - cw - shift + 1))
        lefts = (first, first + shift)
    tops = [int(rng.integers(0, h - ch + 1)) for _ in lefts]
    a, b = (image.crop((left, top, left + cw, top + ch)) for left, top in zip(lefts, tops))
    return a, b


# --------------------------------------------------------------------------- the set


def _open(package: _Package, inside: str) -> tuple[Image.Image, str]:
    path = package.root / inside
    data = path.read_bytes()
    image = open_image(data)
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return image, hashlib.sha256(data).hexdigest()


def _stem(inside: str) -> str:
    """The file name's stem, with its folder in front where another source has the same stem."""
    path = Path(inside)
    same = [p for _, p in FAMILIES + PATTERNS + FRAMINGS if Path(p).stem == path.stem]
    return path.stem if len(same) == 1 else f"{path.parent.name}_{path.stem}"


def build_devset(out_dir: str | Path = DEFAULT_OUT, *, seed: int = 0, cache: str | Path = DEFAULT_CACHE,
                 families: int | None = None) -> Devset:
    """Build the dev set into ``out_dir`` (replacing an earlier one there); ``families`` keeps the first N
    originals (the hard negatives are always all there)."""
    packages = _packages(Path(cache))
    root = Path(out_dir)
    if (root / "ground_truth.csv").exists():
        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        raise DevsetError(f"{root} exists and is not a dev set; give an empty or new folder")

    chosen = FAMILIES[:families] if families else FAMILIES
    # Family i takes the next COPIES transforms of a shuffled cycle: none twice in a family (a
    # parameter-free transform twice would be one file twice), each about equally often overall.
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))).permutation(len(TRANSFORMS))
    deck = [TRANSFORMS[order[i % len(TRANSFORMS)]] for i in range(len(chosen) * COPIES)]

    images, truth, negatives, sources = [], [], [], []

    def save(label: str, name: str, data: bytes) -> str:
        (root / label).mkdir(parents=True, exist_ok=True)
        rel = f"{label}/{name}"
        with (root / rel).open("xb") as f:  # "x": two sources must never share a file name
            f.write(data)
        images.append((label, rel))
        return rel

    for index, (label, inside) in enumerate(chosen):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
        image, digest = _open(packages[label], inside)
        stem = _stem(inside)
        original = save(label, f"{stem}.jpg", _jpeg(image, ORIGINAL_QUALITY))
        sources.append((original, label, packages[label].version, inside, digest))
        for k, kind in enumerate(deck[index * COPIES:(index + 1) * COPIES], start=1):
            data, _, transform = copy_image(image, kind.split("+"), rng)
            truth.append((save(label, f"{stem}_copy{k}.jpg", data), original, transform))
        if _saturation(image) >= RECOLOUR_MIN_SATURATION:
            twin = save(label, f"{stem}_recolour.jpg", _jpeg(_recolour(image, rng), ORIGINAL_QUALITY))
            negatives.append((twin, original, "recolour"))

    for key, (kind, listing, overlap) in enumerate((("pattern", PATTERNS, None), ("framing", FRAMINGS, (0.2, 0.35))),
                                                   start=2):
        for index, (label, inside) in enumerate(listing):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, index)))
            image, digest = _open(packages[label], inside)
            stem = _stem(inside)
            a, b = (save(label, f"{stem}_{kind}{k}.jpg", _jpeg(part, ORIGINAL_QUALITY))
                    for k, part in enumerate(_two_crops(image, overlap, rng), start=1))
            negatives.append((a, b, kind))
            sources.append((a, label, packages[label].version, inside, digest))

    manifest = root / "manifest.tsv"
    manifest.write_text("".join(f"{label}\t{rel}\n" for label, rel in images), encoding="utf-8")
    tables = {"ground_truth.csv": (("copy", "original", "transform"), truth),
              "hard_negatives.csv": (("a", "b", "kind"), negatives)}
    for name, (header, rows) in tables.items():
        with (root / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    with (root / "sources.tsv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("image", "package", "version", "path_in_package", "sha256"))
        writer.writerows(sources)
    return Devset(root=root, images=len(images), copies=len(truth), negatives=len(negatives), manifest=manifest,
                  ground_truth=root / "ground_truth.csv", hard_negatives=root / "hard_negatives.csv")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=DEFAULT_OUT, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where source packages are kept")
    parser.add_argument("--families", type=int, default=None, help="keep only the first N originals")
    args = parser.parse_args()
    try:
        devset = build_devset(args.out, seed=args.seed, cache=args.cache, families=args.families)
    except DevsetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"dev set in {devset.root}: {devset.images} images, {devset.copies} copies, "
          f"{devset.negatives} hard-negative pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
