"""The texture dev set: real material photographs from a Debian package, labelled by material.

    python bench/texture_devset.py [OUT] [--cache DIR]

The photographs are the ground, wall and floor textures of the game UFO: Alien
Invasion (Debian package ``ufoai-textures``, 336 MB, fetched on first use with
``apt-get download`` into the same cache as bench/devset.py). Most are
photographs of real surfaces (bricks, carpets, concrete, grass, rock, wood…)
cropped to tiles; a few are painted. The label is the material, read from the
file name (``wood_b_10.jpg`` → wood), for the materials with at least
``MIN_PER_LABEL`` usable images. Normal, specular and glow maps are left out, and
so are images that are too small or nearly flat (a tile whose colour lives in
its alpha channel decodes black).

OUT (default bench/out/texture-devset) receives ``<label>/<folder>_<stem>.jpg``
(RGB, quality 92) and ``manifest.tsv`` (headerless ``label<TAB>path``, for
``lookalike load``) and ``sources.tsv`` (image, package, version, path in the
package, sha256 of the source file). The same package gives the same files.

Left out on purpose (kept for an independent check): gimp-data's patterns and
scikit-image's photographs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devset import DEFAULT_CACHE, DevsetError, _debian  # noqa: E402  (the same .deb cache and unpacking)

PACKAGE = "ufoai-textures"
ARCHIVE = "usr/share/games/ufoai/base/0textures.pk3"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "texture-devset"
# File-name prefix -> material. Prefixes that name an object (door, sign, box…) are not materials.
MATERIALS = {"bricks": "bricks", "carpet": "carpet", "concrete": "concrete", "desert": "sand", "dirt": "dirt",
             "grass": "grass", "metal": "metal", "metall": "metal", "rock": "rock", "tile": "tiles",
             "tiles": "tiles", "wallpaper": "wallpaper", "wood": "wood"}
MAPS = re.compile(r"_(nm|sm|g|gm|bm|rm|hm|glow)\.", re.IGNORECASE)   # normal/specular/glow maps, not pictures
MIN_SIDE = 128
MIN_STD = 6.0          # grey-level spread below which a tile is flat (or black: colour only in alpha)
MIN_PER_LABEL = 10


def _material(name: str) -> str | None:
    match = re.match(r"[a-z]+", Path(name).name.lower().lstrip("0123456789_"))
    return MATERIALS.get(match.group(0)) if match else None


def build_texture_devset(out_dir: str | Path = DEFAULT_OUT, *, cache: str | Path = DEFAULT_CACHE) -> Path:
    """Write the dev set into ``out_dir``; returns its manifest's path."""
    out = Path(out_dir)
    package = _debian(PACKAGE, Path(cache), [ARCHIVE])
    chosen: dict[str, list[tuple[str, Image.Image, str]]] = defaultdict(list)
    seen: set[bytes] = set()
    with zipfile.ZipFile(package.root / ARCHIVE) as archive:
        for inside in sorted(archive.namelist()):
            material = _material(inside)
            if material is None or MAPS.search(inside) or not re.search(r"\.(png|jpe?g|tga)$", inside, re.I):
                continue
            data = archive.read(inside)
            image = Image.open(io.BytesIO(data))
            image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA") else image.convert("RGB")
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
            digest = hashlib.sha256(np.asarray(image).tobytes()).digest()
            if min(image.size) < MIN_SIDE or pixels.std() < MIN_STD or digest in seen:
                continue
            seen.add(digest)
            chosen[material].append((inside, image, hashlib.sha256(data).hexdigest()))
    out.mkdir(parents=True, exist_ok=True)
    manifest, sources = [], []
    for material in sorted(chosen):
        if len(chosen[material]) < MIN_PER_LABEL:
            continue
        (out / material).mkdir(exist_ok=True)
        for inside, image, sha in chosen[material]:
            folder, stem = Path(inside).parent.name, Path(inside).stem
            relative = f"{material}/{folder}_{stem}.jpg"
            image.save(out / relative, "JPEG", quality=92)
            manifest.append((material, relative))
            sources.append((relative, PACKAGE, package.version, inside, sha))
    with open(out / "manifest.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(manifest)
    with open(out / "sources.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("image", "package", "version", "path", "sha256"))
        writer.writerows(sources)
    return out / "manifest.tsv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args()
    try:
        manifest = build_texture_devset(args.out, cache=args.cache)
    except DevsetError as err:
        print(err, file=sys.stderr)
        return 2
    rows = manifest.read_text().splitlines()
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row.split("\t")[0]] += 1
    print(f"{len(rows)} images in {len(counts)} materials → {manifest}")
    print("  " + ", ".join(f"{label} {n}" for label, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
