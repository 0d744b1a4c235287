"""Hostile files under `lookalike inspect`: every awkward or broken file of the corpus (decompression
bombs, truncations, non-images, 16-bit, CMYK, animated) put in the image store in place of a loaded
image, plus a 1x1 and a 1x5000 image. One run, memory capped: every image gets a row, the broken ones
say why, the batch finishes."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lookalike.db import Database, images
from lookalike.db.schema import image_quality
from lookalike.ingest import load_images
from support.corpus import CORPUS

MEMORY_BOUND = 2 * 1024**3   # address space of the inspecting CLI


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.timeout(180)
def test_every_hostile_file_gets_a_row_and_the_batch_finishes(tmp_path: Path, bad_corpus: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = sorted(CORPUS)
    for i, name in enumerate(names):   # distinct placeholders, replaced in the store below
        (folder / f"{i:02d}.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (folder / "dot.png").write_bytes(_png(np.zeros((1, 1, 3), np.uint8)))
    (folder / "line.png").write_bytes(_png(rng.integers(0, 255, (5000, 1, 3), dtype=np.uint8)))
    url = f"sqlite:///{tmp_path}/h.db"
    with Database(url, tmp_path / "store") as db:
        load_images(db, str(folder))
        with db.engine.connect() as conn:
            stored = {Path(r.source).name: (r.id, r.sha256) for r in conn.execute(sa.select(images)).all()}
        for i, name in enumerate(names):
            db.store.path(stored[f"{i:02d}.png"][1]).write_bytes((bad_corpus / name).read_bytes())

    done = subprocess.run([sys.executable, "-m", "lookalike.cli", "--db", url, "inspect", "--json"],
                          capture_output=True, text=True, timeout=150, env=dict(os.environ),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BOUND, MEMORY_BOUND)))
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)   # the listing stays clean JSON; the summary went to stderr
    assert f"inspect: {len(stored)} inspected" in done.stderr

    with Database(url) as db, db.engine.connect() as conn:
        rows = {r.image_id: r for r in conn.execute(sa.select(image_quality)).all()}
    assert len(rows) == len(stored)
    for i, name in enumerate(names):
        row, expectation = rows[stored[f"{i:02d}.png"][0]], CORPUS[name][1]
        if expectation.ok:
            assert row.status == "ok" and row.flags is not None, name
        else:
            assert row.status == "failed" and expectation.reason in row.reason and row.flags is None, \
                (name, row.reason)
    dot, line = rows[stored["dot.png"][0]], rows[stored["line.png"][0]]
    assert {"tiny", "low-information"} <= set(dot.flags.split(",")) and dot.pixels == 1
    assert "odd-aspect" in line.flags.split(",") and line.aspect == pytest.approx(1 / 5000)
