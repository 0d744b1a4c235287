"""The rendered sample set and contact sheets: real files, decoded and compared."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.images import open_image, probe
from lookalike.samples import COPY_OPS, LABELS, render_samples, rotated_inner_box, samples_contact_sheet
from lookalike.sheets import contact_sheet

PER_LABEL = 12
COPY_SHARE = 0.25


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return render_samples(tmp_path_factory.mktemp("samples"), per_label=PER_LABEL, seed=7, copy_share=COPY_SHARE)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pattern(image: Image.Image) -> np.ndarray:
    """32x32 grey, normalised to mean 0 and spread 1, so brightening does not count as a difference."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    return (grey - grey.mean()) / (grey.std() + 1e-6)


def _steps(transform: str) -> dict[str, str]:
    return dict((step.split(":") + [""])[:2] for step in transform.split("+"))


def _framed_back(copy: Path, original: Image.Image, steps: dict[str, str]) -> Image.Image:
    """The copy with its padding or border cut off and its mirroring undone, from the recorded transform."""
    image = open_image(copy)
    if "pad" in steps:  # centred on a square, at the aspect the other steps left
        squash = steps.get("squash", "x1")
        aspect = original.width / original.height * float(squash[1:]) ** (1 if squash[0] == "x" else -1)
        side = image.width
        w, h = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
        left, top = (side - w) // 2, (side - h) // 2
        image = image.crop((left + 2, top + 2, left + w - 2, top + h - 2))
    if "border" in steps:
        n = int(steps["border"])
        image = image.crop((n, n, image.width - n, image.height - n))
    return ImageOps.mirror(image) if "mirror" in steps else image


def _distance_to_original(copy: Path, original: Path, transform: str) -> float:
    """Mean difference of the normalised patterns once the recorded framing, mirroring and rotation are
    undone; for a crop, the best over where the crop may have sat."""
    steps, source = _steps(transform), open_image(original)
    target = _pattern(_framed_back(copy, source, steps))
    share = float(steps.get("crop", 0))
    w, h = source.size
    best = np.inf
    for fx, fy in itertools.product(np.linspace(0, 1, 17 if share else 1), repeat=2):
        left, top = fx * share * w, fy * share * h
        window = source.crop((round(left), round(top), round(left + w * (1 - share)), round(top + h * (1 - share))))
        if "rotate" in steps:
            degrees = float(steps["rotate"]) * (-1 if "mirror" in steps else 1)  # turned after mirroring
            window = window.rotate(degrees, Image.Resampling.BICUBIC).crop(
                rotated_inner_box(*window.size, degrees))
        best = min(best, float(np.abs(target - _pattern(window)).mean()))
    return best


def _ground_truth(sample_set) -> list[dict[str, str]]:
    with sample_set.ground_truth.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, sample_set):
    again = render_samples(tmp_path / "again", per_label=PER_LABEL, seed=7, copy_share=COPY_SHARE)
    assert _files(again.root) == _files(sample_set.root)
    other = render_samples(tmp_path / "other", per_label=2, seed=8, copy_share=COPY_SHARE)
    first, second = _files(sample_set.root), _files(other.root)
    originals = [name for name in first if name.endswith("_0001.jpg")]
    assert len(originals) == len(LABELS)
    assert all(first[name] != second[name] for name in originals)


def test_counts_per_label_and_share_of_copies(sample_set):
    copies_per_label = round(COPY_SHARE * PER_LABEL)
    assert sample_set.copies == copies_per_label * len(LABELS)
    assert sample_set.images == (PER_LABEL + copies_per_label) * len(LABELS)
    assert sample_set.per_label == {label: PER_LABEL + copies_per_label for label in LABELS}
    for label in LABELS:
        files = sorted(p.name for p in (sample_set.root / label).iterdir())
        originals = [name for name in files if "_copy" not in name]
        assert originals == [f"{label}_{n:04d}.jpg" for n in range(1, PER_LABEL + 1)]
        assert len(files) - len(originals) == copies_per_label


def test_every_file_decodes_at_a_product_photo_size(sample_set):
    for label in LABELS:
        for path in (sample_set.root / label).iterdir():
            image = open_image(path)
            assert image.mode == "RGB"
            if "_copy" not in path.name:
                assert probe(path).format == "JPEG"
                assert 300 <= image.width <= 420 and 300 <= image.height <= 420
                assert 8_000 < path.stat().st_size < 80_000
                # A light studio background at the corners, a garment (not background) in the middle.
                pixels = np.asarray(image, dtype=np.float32)
                corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
                assert corners.mean() > 170


def test_ground_truth_copies_are_close_to_their_originals_and_originals_are_not(sample_set):
    rows = _ground_truth(sample_set)
    assert len(rows) == sample_set.copies
    for row in rows:
        copy, original = sample_set.root / row["copy"], sample_set.root / row["original"]
        assert copy.is_file() and original.is_file()
        assert copy.parent == original.parent
        assert copy.name.startswith(original.stem + "_copy")
        steps = _steps(row["transform"])
        assert steps and set(steps) <= set(COPY_OPS) - {"light"} | {"brightness", "contrast"}
        assert ("png" in steps) == (copy.suffix == ".png")
    # A watermark covers the middle, and brightening clips light backgrounds: those copies may sit further.
    copy_distances = [_distance_to_original(sample_set.root / r["copy"], sample_set.root / r["original"],
                                            r["transform"]) for r in rows if "watermark" not in r["transform"]]
    originals = sorted(p for p in sample_set.root.rglob("*.jpg") if "_copy" not in p.name)
    patterns = [_pattern(open_image(p)) for p in originals]
    other_distances = [np.abs(a - b).mean() for a, b in itertools.combinations(patterns, 2)]
    assert max(copy_distances) < 0.25 < np.percentile(other_distances, 1)
    assert np.median(copy_distances) < 0.1
    assert np.median(other_distances) > 2 * max(copy_distances)


def test_manifest_lists_every_image_once_with_its_label(sample_set):
    lines = sample_set.manifest.read_text(encoding="utf-8").splitlines()
    entries = [line.split("\t") for line in lines]
    assert all(len(entry) == 2 for entry in entries)
    listed = {path for _, path in entries}
    assert len(listed) == len(lines) == sample_set.images
    for label, path in entries:
        assert label in LABELS and path.startswith(label + "/")
        assert (sample_set.manifest.parent / path).is_file()
    on_disk = {p.relative_to(sample_set.root).as_posix() for p in sample_set.root.glob("*/*") if p.is_file()}
    assert listed == on_disk


def test_rendering_again_into_the_same_folder_replaces_the_old_set(tmp_path):
    render_samples(tmp_path, per_label=4, seed=1, copy_share=0.5)
    smaller = render_samples(tmp_path, per_label=2, seed=1, copy_share=0.0)
    assert smaller.copies == 0
    assert sorted(p.name for p in (tmp_path / "dotted").iterdir()) == ["dotted_0001.jpg", "dotted_0002.jpg"]
    assert _ground_truth(smaller) == []


def test_contact_sheet_fits_each_image_in_its_tile_with_aspect_kept():
    colours = [(200, 30, 30), (30, 160, 40), (30, 40, 200), (240, 200, 0), (120, 0, 140), (0, 150, 150), (90, 60, 20)]
    sizes = [(400, 200), (200, 400), (100, 100), (320, 320), (500, 250), (60, 30), (350, 300)]
    tiles = [(Image.new("RGB", size, colour), f"tile {i}\n0.{i}23") for i, (size, colour) in
             enumerate(zip(sizes, colours))]
    tile_size, columns = 120, 3
    sheet = contact_sheet(tiles, columns=columns, tile_size=tile_size)
    margin = tile_size // 16
    assert sheet.mode == "RGB"
    assert sheet.width == columns * (tile_size + margin) + margin
    assert sheet.height > 3 * tile_size
    pixels = np.asarray(sheet).reshape(-1, 3)
    for (w, h), colour in zip(sizes, colours):
        scale = tile_size / max(w, h)  # up or down, to touch the tile's longer side
        expected = round(w * scale) * round(h * scale)
        found = np.all(np.abs(pixels.astype(int) - colour) <= 2, axis=1).sum()
        assert abs(found - expected) <= 0.04 * expected, (colour, found, expected)


def test_contact_sheet_captions_and_title_are_drawn():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    blank = np.asarray(contact_sheet([(image, "")] * 2, tile_size=100))
    captioned = contact_sheet([(image, "leopard\n0.123")] * 2, tile_size=100, title="Query and results")
    dark = np.asarray(captioned).min(axis=2) < 128
    assert captioned.width == blank.shape[1] and captioned.height > blank.shape[0]
    title_rows = dark[: captioned.height - blank.shape[0] - 20]
    assert title_rows.sum() > 50                  # the title
    assert dark[-40:].sum() > 50                  # the two-line captions under the tiles
    assert (blank.min(axis=2) < 128).sum() == 0   # white images, no captions: nothing dark


def test_samples_contact_sheet_shows_each_label(tmp_path, sample_set):
    out = samples_contact_sheet(sample_set.root, tmp_path / "docs" / "samples.png", per_label=3)
    sheet = open_image(out)
    assert probe(out).format == "PNG"
    assert sheet.width == 3 * (150 + 150 // 16) + 150 // 16
    grey = np.asarray(sheet.convert("L"), dtype=np.float32)
    assert (grey < 200).mean() > 0.15  # garments, not an empty grid
    with pytest.raises(ValueError):
        samples_contact_sheet(tmp_path / "nothing", tmp_path / "x.png")
