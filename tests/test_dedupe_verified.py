"""The verified (default) dedupe rule on real photographs, on SQLite and PostgreSQL.

The photographs are the ones matplotlib and scikit-learn ship (Grace Hopper,
a Chinese temple, a flower). Copies are made with the sample renderer's copy
transforms; a recoloured photograph is a hard negative.
"""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import sklearn
import sqlalchemy as sa
from PIL import Image, ImageOps

from lookalike.cli import build_parser
from lookalike.db import dedupe_runs, duplicate_groups, images, runs
from lookalike.dedupe import DEFAULT_RULE, dedupe_images, is_duplicate, keeper_groups
from lookalike.features import featurize_images
from lookalike.hashing import hash_images
from lookalike.ingest import load_images
from lookalike.pipeline import run_pipeline
from lookalike.samples import copy_image

PHOTOS = {
    "hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    "china": Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
    "flower": Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
}
# One copy per transform the issue names; each photograph gets every one of them.
TRANSFORMS = [("mirror",), ("crop",), ("rotate",), ("jpeg",), ("grey",), ("squash",), ("border",),
              ("mirror", "crop"), ("resize", "jpeg")]


def photo(name: str) -> Image.Image:
    return Image.open(PHOTOS[name]).convert("RGB")


def recoloured(image: Image.Image) -> Image.Image:
    """The same picture in other colours: hue turned by 150 degrees (a hard negative)."""
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 106) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


@pytest.fixture
def photo_set(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder of originals, their copies and one recolouring; file -> original it copies (or itself)."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(3)
    family = {}
    for name in PHOTOS:
        folder = root / name
        folder.mkdir(parents=True)
        original = photo(name)
        original.save(folder / f"{name}.png")
        family[f"{name}.png"] = name
        # A grey copy matches a photo and its recolouring equally well (the grey is the same), so the
        # recoloured photo gets no grey copy: which group that copy joins would be a coin toss.
        for k, ops in enumerate(t for t in TRANSFORMS if not (name == "china" and t == ("grey",))):
            data, ext, _ = copy_image(original, ops, rng)
            (folder / f"{name}_{'+'.join(ops)}.{ext}").write_bytes(data)
            family[f"{name}_{'+'.join(ops)}.{ext}"] = name
    recoloured(photo("china")).save(root / "china" / "china_recoloured.png")
    family["china_recoloured.png"] = "china_recoloured"
    return root, family


def prepared(db, root: Path) -> None:
    load_images(db, root, progress=False)
    hash_images(db, progress=False)
    featurize_images(db, progress=False)


def groups_by_file(db, run_id: int) -> dict[str, int | None]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.source, duplicate_groups.c.group_id)
                            .select_from(images.outerjoin(duplicate_groups, sa.and_(
                                duplicate_groups.c.image_id == images.c.id, duplicate_groups.c.run_id == run_id)))
                            ).all()
    return {Path(source).name: group for source, group in rows}


def test_verified_rule_groups_every_copy_with_its_original_and_nothing_else(db, photo_set):
    root, family = photo_set
    prepared(db, root)
    summary = dedupe_images(db)
    assert summary.rule == "verified" and summary.images == len(family)
    group = groups_by_file(db, summary.run_id)
    for name in PHOTOS:  # the PNG original is the largest file of its family, so it is the keeper
        members = {f for f, fam in family.items() if fam == name}
        assert {group[f] for f in members} == {group[f"{name}.png"]}, (name, {f: group[f] for f in members})
        assert group[f"{name}.png"] is not None
    assert group["china_recoloured.png"] != group["china.png"]
    assert summary.groups == 3 and summary.duplicates == 3 * len(TRANSFORMS) - 1

    with db.engine.connect() as conn:
        members = conn.execute(sa.select(duplicate_groups).where(duplicate_groups.c.run_id == summary.run_id,
                                                                 duplicate_groups.c.is_keeper.is_(False))).all()
        params = json.loads(conn.execute(sa.select(dedupe_runs.c.params)
                                         .where(dedupe_runs.c.id == summary.run_id)).scalar_one())
    assert all(m.verified_by in ("embedding", "geometry") and m.score is not None for m in members)
    assert any(m.verified_by == "geometry" for m in members)   # mirrored, cropped and rotated copies need it
    assert params["accept_from"] > params["reject_below"] and params["candidates"] == summary.candidates
    lines = "\n".join(summary.lines())
    assert "checked by geometry" in lines and f"{summary.candidates} candidate pairs" in lines


def test_is_duplicate_recognises_a_mirrored_copy_and_names_its_path(db, photo_set, tmp_path):
    root, _ = photo_set
    prepared(db, root)
    mirrored = io.BytesIO()
    ImageOps.mirror(photo("flower")).crop((20, 10, 600, 400)).save(mirrored, "JPEG", quality=80)
    matches = is_duplicate(db, mirrored.getvalue())
    assert matches and Path(matches[0].source).name.startswith("flower")
    assert {Path(m.source).parent.name for m in matches} == {"flower"}
    other = io.BytesIO()
    Image.new("RGB", (200, 150), (30, 90, 200)).save(other, "PNG")
    assert is_duplicate(db, other.getvalue()) == []


def test_a_chain_of_matches_never_joins_two_images_that_do_not_match(db, tmp_path):
    """A and C are crops of B that overlap too little to be copies of each other: A~B, B~C, A≁C."""
    full = photo("china")   # 640 x 427
    folder = tmp_path / "chain" / "x"
    folder.mkdir(parents=True)
    full.crop((0, 0, 450, 427)).save(folder / "a.png")          # the left 70 %
    full.crop((190, 0, 640, 427)).save(folder / "c.png")        # the right 70 %: overlaps A by 40 %
    full.resize((320, 214)).save(folder / "b.jpg", quality=90)  # the whole, smaller: a copy of each crop's scene
    prepared(db, folder.parent)
    group = groups_by_file(db, dedupe_images(db).run_id)
    assert group["a.png"] is None or group["a.png"] != group["c.png"]


def test_keeper_groups_take_members_that_match_the_keeper_only():
    rows = [SimpleNamespace(id=k + 1, width=w, height=100, byte_size=1000, format="JPEG")
            for k, w in enumerate([300, 200, 100, 50])]
    first, second = np.array([0, 1, 2]), np.array([1, 2, 3])   # 0~1, 1~2, 2~3: a chain
    assert keeper_groups(rows, first, second).tolist() == [0, 0, 2, 2]
    # A row matching two keepers joins the better-scoring one.
    first, second, score = np.array([0, 1, 0, 1]), np.array([2, 2, 3, 3]), np.array([0.5, 0.9, 0.9, 0.5])
    assert keeper_groups(rows, first, second, score).tolist() == [0, 1, 1, 0]


def test_guardrails_fail_clearly_and_never_become_the_latest_run(db, photo_set):
    root, _ = photo_set
    with pytest.raises(LookupError, match="no loaded images"):
        dedupe_images(db)
    load_images(db, root, progress=False)
    with pytest.raises(LookupError, match="run `lookalike hash`"):
        dedupe_images(db)
    hash_images(db, progress=False)
    with pytest.raises(LookupError, match="featurize"):
        dedupe_images(db)
    with pytest.raises(LookupError, match="phash size 16"):
        dedupe_images(db, rule="near", hash_kind="phash", size=16)
    with pytest.raises(ValueError, match="sizes 1 to 8"):
        dedupe_images(db, rule="exact", size=9)
    with pytest.raises(ValueError, match="between 0 and 127"):
        dedupe_images(db, rule="near", max_distance=2_147_483_647)
    with pytest.raises(ValueError, match="between 0 and 63"):
        dedupe_images(db, rule="near", hash_kind="phash", size=8, max_distance=64)
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(dedupe_runs)).scalar_one() == 0
        outcomes = conn.execute(sa.select(runs.c.outcome).where(runs.c.step == "dedupe")).scalars().all()
    assert set(outcomes) == {"failed"}


def test_defaults_are_the_same_from_python_the_cli_and_the_pipeline():
    parser = build_parser()
    assert inspect.signature(dedupe_images).parameters["rule"].default == DEFAULT_RULE == "verified"
    assert inspect.signature(run_pipeline).parameters["dedupe_rule"].default == DEFAULT_RULE
    assert inspect.signature(is_duplicate).parameters["rule"].default == DEFAULT_RULE
    for command in (["dedupe"], ["is-duplicate", "x.jpg"]):
        assert parser.parse_args(command).rule == DEFAULT_RULE
    assert parser.parse_args(["run"]).dedupe_rule == DEFAULT_RULE  # run's names: run_pipeline's keywords
    args = parser.parse_args(["run", "--rule", "near", "--max-distance", "8", "--size", "6"])
    assert (args.dedupe_rule, args.max_distance, args.dedupe_size) == ("near", 8, 6)
