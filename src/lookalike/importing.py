"""Import step: a Spark job's Parquet output merged into the database (``lookalike import FOLDER``).

The Spark jobs (:mod:`lookalike.spark`) write one Parquet row per image, with
the image's id and sha256, its hashes or embedding, or the reason it failed,
and a ``_lookalike.json`` beside the part files naming the job. Each batch of
rows goes in through the write function the single-machine step uses
(:func:`~lookalike.hashing.write_hashes`, :func:`~lookalike.features.write_embeddings`):
ON CONFLICT DO NOTHING, one transaction per batch, so importing a folder twice,
a part file twice, or after an import that was killed, neither doubles nor
loses rows. On PostgreSQL the jobs call :func:`write_batch` from the executors,
per partition; on SQLite they call :func:`import_output` at the driver.

Needs ``pyarrow`` (the ``spark`` extra), not pyspark.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from .db import Database, feature_models, images, now, recorded_run
from .errors import BadInput, Precondition

MANIFEST = "_lookalike.json"   # Spark's and pyarrow's readers skip names starting with '_'
FORMAT = "lookalike-spark"
WRITE_ROWS = 1000              # images per transaction (and per id check)
# The Parquet columns each job writes (and an import needs).
COLUMNS = {"hash": ("image_id", "sha256", "reason", "hasher", "low_detail", "hashes"),
           "featurize": ("image_id", "sha256", "reason", "vector")}


@dataclass
class ImportCounts:
    written: int = 0                                     # images whose rows were written (or already there)
    low_detail: int = 0
    rejected: int = 0          # rows whose id is not this database's image with that sha256, or malformed
    failed: Counter = field(default_factory=Counter)     # reason -> images

    def add(self, other: "ImportCounts") -> None:
        self.written += other.written
        self.low_detail += other.low_detail
        self.rejected += other.rejected
        self.failed.update(other.failed)

    def as_json(self) -> str:
        return json.dumps({"written": self.written, "low_detail": self.low_detail, "rejected": self.rejected,
                           "failed": dict(self.failed)})

    @classmethod
    def from_json(cls, text: str) -> "ImportCounts":
        data = json.loads(text)
        return cls(data["written"], data["low_detail"], data["rejected"], Counter(data["failed"]))


@dataclass
class ImportSummary:
    job: str
    folder: Path
    counts: ImportCounts = field(default_factory=ImportCounts)
    bad_files: list[str] = field(default_factory=list)   # "name: why", part files that could not be read
    seconds: float = 0.0

    def lines(self) -> list[str]:
        c = self.counts
        out = [f"import ({self.job}) from {self.folder}: {c.written} images written (rows already there kept), "
               f"{c.low_detail} low-detail, {sum(c.failed.values())} failed, {c.rejected} rejected (not this database's image, or malformed)"]
        out += [f"  failed: {n:>5}  {reason}" for reason, n in c.failed.most_common()]
        out += [f"  unreadable part file {bad}" for bad in self.bad_files]
        return out


def read_manifest(folder: Path) -> dict:
    """The ``_lookalike.json`` of a job's output folder; :class:`BadInput` when it is not one."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise BadInput(f"no such folder: {folder}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{folder} is not a lookalike Spark output: it has no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("job") not in COLUMNS:
        raise BadInput(f"{path} does not describe a lookalike Spark hash or featurize output")
    return manifest


def model_of(db: Database, manifest: dict) -> tuple[int, int] | None:
    """(id, dimension) of the feature model a featurize output's vectors belong to, in ``db``; None for a
    hash output."""
    if manifest["job"] != "featurize":
        return None
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(feature_models.c.id, feature_models.c.dim).where(
            feature_models.c.name == str(model.get("name")),
            feature_models.c.weights_sha256 == str(model.get("weights_sha256")))).first()
    if found is None:
        raise Precondition(f"this database has no feature model {model.get('name')!r} with the output's weights: "
                           "import into the database the job read")
    return found.id, found.dim


def _well_formed(row: dict, model: tuple[int, int] | None) -> bool:
    if model is None:   # what the columns hold (lengths, kinds), so one bad row cannot fail its batch's insert
        from .hashing import KINDS
        return isinstance(row["hasher"], str) and len(row["hasher"]) <= 64 and bool(row["hashes"]) and all(
            isinstance(h, dict) and h["kind"] in KINDS and isinstance(h["hex"], str) and len(h["hex"]) <= 128
            for h in row["hashes"])
    return isinstance(row["vector"], bytes) and len(row["vector"]) == 4 * model[1]


def write_batch(db: Database, job: str, rows: list[dict], model: tuple[int, int] | None = None) -> ImportCounts:
    """Write a batch of a job's Parquet rows through the step's own write function. ``model``: (id, dimension)
    of a featurize output's model. Rows whose id is not this database's image with the same sha256, or whose
    hashes or vector are malformed, are counted as rejected, not written."""
    from .features import write_embeddings
    from .hashing import write_hashes
    counts = ImportCounts()
    for start in range(0, len(rows), WRITE_ROWS):
        part = rows[start:start + WRITE_ROWS]
        with db.engine.connect() as conn:
            known = dict(conn.execute(sa.select(images.c.id, images.c.sha256)
                                      .where(images.c.id.in_({r["image_id"] for r in part}))).all())
        ok = []
        for r in part:
            if r["image_id"] not in known or known[r["image_id"]] != r["sha256"]:
                counts.rejected += 1
            elif r["reason"] is not None:
                counts.failed[str(r["reason"])[:500]] += 1
            elif not _well_formed(r, model):
                counts.rejected += 1
            else:
                ok.append(r)
        if job == "hash":
            write_hashes(db, [{**h, "image_id": r["image_id"], "hasher": r["hasher"]} for r in ok for h in r["hashes"]],
                         [dict(image_id=r["image_id"], low_detail=r["low_detail"], hasher=r["hasher"],
                               hashed_at=now()) for r in ok])
            counts.low_detail += sum(bool(r["low_detail"]) for r in ok)
        else:
            write_embeddings(db, [{"image_id": r["image_id"], "model_id": model[0], "vector": r["vector"]}
                                  for r in ok])
        counts.written += len(ok)
    return counts


def part_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.parquet") if not p.name.startswith(("_", ".")))


def import_output(db: Database, folder: Path) -> ImportSummary:
    """Merge a ``lookalike spark hash`` or ``spark featurize`` output folder into ``db``, batch by batch, then
    (embeddings) bring the fitted spaces and the vector index up to date.

    A part file that cannot be read is reported and skipped; the others are imported.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    summary = ImportSummary(manifest["job"], folder)
    started = time.monotonic()
    with recorded_run(db, "import", {"folder": str(folder), "job": summary.job}) as counts:
        model = model_of(db, manifest)
        import_parts(db, summary, model)
        after_embeddings(db, model and model[0])
        summary.seconds = time.monotonic() - started
        counts.update(written=summary.counts.written, failed=dict(summary.counts.failed),
                      rejected=summary.counts.rejected, bad_files=len(summary.bad_files))
    return summary


def import_parts(db: Database, summary: ImportSummary, model: tuple[int, int] | None) -> None:
    """Every part file of ``summary.folder`` into ``db``, counted in ``summary``."""
    import pyarrow.parquet as pq   # the spark extra
    columns = list(COLUMNS[summary.job])
    for path in part_files(summary.folder):
        try:
            parquet = pq.ParquetFile(path)
            missing = set(columns) - set(parquet.schema_arrow.names)
            if missing:
                raise BadInput(f"no column {', '.join(sorted(missing))}")
            for batch in parquet.iter_batches(batch_size=WRITE_ROWS, columns=columns):
                summary.counts.add(write_batch(db, summary.job, batch.to_pylist(), model))
        except (OSError, ValueError) as exc:   # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
            summary.bad_files.append(f"{path.name}: {str(exc).splitlines()[0][:200]}")


def after_embeddings(db: Database, model_id: int | None) -> int:
    """What follows new embeddings: the vectors into the fitted spaces, as featurize does (how many were
    projected), then the persistent index, where one exists, caught up with the changes the triggers logged,
    as `lookalike run` does after featurize."""
    if model_id is None:
        return 0
    from .index import model_dir, refresh_index
    from .spaces import project_fitted
    projected = project_fitted(db, model_id)
    if model_dir(db, model_id).exists():
        with db.engine.connect() as conn:
            name = conn.execute(sa.select(feature_models.c.name).where(feature_models.c.id == model_id)).scalar_one()
        refresh_index(db, backbone=name)
    return projected
