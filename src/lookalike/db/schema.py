"""The schema: every table, so the schema has one version number.

Tables are only ever added or widened; the schema version (the newest in
:mod:`.migrations`) records which additions a database has, and the
migrations bring an older one forward.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..config import PG_SCHEMA

metadata = sa.MetaData()

settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# One row per distinct content (sha256). An image whose bytes could not be
# decoded is kept, with status 'failed' and the reason.
images = sa.Table(
    "images", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("label", sa.Text),
    sa.Column("source", sa.Text, nullable=False),  # the first source it came from
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("format", sa.String(16)),
    sa.Column("byte_size", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(8), nullable=False),  # 'ok' | 'failed'
    sa.Column("reason", sa.Text),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", sa.Text),  # JSON object: extra manifest columns
    sa.CheckConstraint("status IN ('ok', 'failed')", name="images_status"),
)
sa.Index("images_label", images.c.label)

# Every source ever given to `load`: a path or URL, the image it gave (if its
# bytes were fetched) or why it could not be fetched.
image_sources = sa.Table(
    "image_sources", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text, nullable=False, unique=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE")),
    sa.Column("label", sa.Text),
    sa.Column("status", sa.String(8), nullable=False),  # 'ok' (bytes fetched) | 'failed'
    sa.Column("reason", sa.Text),
    sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metadata", sa.Text),
    sa.CheckConstraint("status IN ('ok', 'failed')", name="image_sources_status"),
)
sa.Index("image_sources_image", image_sources.c.image_id)

# ---- hash step: one row per image/kind/size; hex always, signed 64-bit form where it fits.
image_hashes = sa.Table(
    "image_hashes", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),   # dhash_rowcol | ahash | dhash | phash | whash
    sa.Column("size", sa.Integer, primary_key=True),
    sa.Column("hex", sa.String(128), nullable=False),
    sa.Column("value", sa.BigInteger),                    # two's-complement signed form when bits <= 64
    sa.Column("bits", sa.Integer, nullable=False),
    sa.Column("hasher", sa.String(64), nullable=False),   # e.g. pillow-13.0.0: never mix decode paths
)
sa.Index("image_hashes_lookup", image_hashes.c.kind, image_hashes.c.size, image_hashes.c.hex)

# One row per image the hash step has finished (all kinds), with its low-detail flag.
hashed_images = sa.Table(
    "hashed_images", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("low_detail", sa.Boolean, nullable=False),
    sa.Column("hasher", sa.String(64), nullable=False),
    sa.Column("hashed_at", sa.DateTime(timezone=True), nullable=False),
)

# ---- dedupe step: each run's groups; images are never deleted.
dedupe_runs = sa.Table(
    "dedupe_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(8), nullable=False),      # exact | near | verified
    sa.Column("hash_kind", sa.String(16), nullable=False),
    sa.Column("hash_size", sa.Integer, nullable=False),
    sa.Column("max_distance", sa.Integer),
    sa.Column("per_label", sa.Boolean, nullable=False),
    sa.Column("include_low_detail", sa.Boolean, nullable=False),
    sa.Column("groups", sa.Integer, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False),  # images that are not keepers
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("params", sa.Text),                         # JSON: the verified rule's thresholds and counts
)
duplicate_groups = sa.Table(
    "duplicate_groups", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("dedupe_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("group_id", sa.Integer, nullable=False),
    sa.Column("is_keeper", sa.Boolean, nullable=False),
    sa.Column("distance", sa.Integer, nullable=False),    # Hamming distance to the keeper
    sa.Column("score", sa.Float),                         # verified rule: the similarity that decided
    sa.Column("verified_by", sa.String(16)),              # verified rule: embedding | geometry (keeper: NULL)
)
sa.Index("duplicate_groups_group", duplicate_groups.c.run_id, duplicate_groups.c.group_id)

# People's review of duplicate groups, which every later dedupe run honours: a pair that is not a
# duplicate (never in one group), a pair confirmed (kept in one group), an image to keep (its group's
# keeper). The latest decision on a pair, or on an image to keep, is the one in force.
duplicate_decisions = sa.Table(
    "duplicate_decisions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision", sa.String(16), nullable=False),  # not_duplicate | keep_this | confirmed
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("other_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE")),  # the pair's other; keep_this: NULL
    sa.Column("run_id", sa.Integer, sa.ForeignKey("dedupe_runs.id", ondelete="SET NULL")),  # the run reviewed
    sa.Column("group_id", sa.Integer),                    # the group reviewed, in that run
    sa.Column("decided_by", sa.Text, nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("note", sa.Text),
    sa.CheckConstraint("decision IN ('not_duplicate', 'keep_this', 'confirmed')", name="duplicate_decisions_decision"),
)
sa.Index("duplicate_decisions_image", duplicate_decisions.c.image_id)

# ---- featurize step: the backbone is a first-class row; embeddings keyed by (image, model).
feature_models = sa.Table(
    "feature_models", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("weights_sha256", sa.String(64), nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("input_size", sa.Integer, nullable=False),
    sa.Column("preprocessing", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("name", "weights_sha256", name="feature_models_identity"),
)
embeddings = sa.Table(
    "embeddings", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("feature_models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32, little-endian, unit length
)
sa.Index("embeddings_by_model", embeddings.c.model_id, embeddings.c.image_id)

# ---- the vector index's freshness (lookalike.index): per feature model, a generation counter and a
# log of the image ids whose embedding changed at each generation. Triggers on embeddings write both in
# the writer's own transaction, so every writer (featurize, a cascade, raw SQL) is seen.
embedding_generations = sa.Table(
    "embedding_generations", metadata,
    sa.Column("model_id", sa.Integer, primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("pruned", sa.BigInteger, nullable=False),   # log rows up to this generation may be deleted
)
embedding_changes = sa.Table(
    "embedding_changes", metadata,
    sa.Column("model_id", sa.Integer, primary_key=True),
    sa.Column("generation", sa.BigInteger, primary_key=True),
    sa.Column("image_id", sa.Integer, primary_key=True),
)

# SQLite: row triggers. {row} is NEW or OLD.
_SQLITE_BUMP = """
  INSERT INTO embedding_generations (model_id, generation, pruned) VALUES ({row}.model_id, 1, 0)
    ON CONFLICT (model_id) DO UPDATE SET generation = generation + 1;
  INSERT OR IGNORE INTO embedding_changes (model_id, generation, image_id)
    SELECT {row}.model_id, generation, {row}.image_id FROM embedding_generations WHERE model_id = {row}.model_id;"""
_SQLITE_TRIGGERS = {"INSERT": ("NEW",), "DELETE": ("OLD",), "UPDATE": ("OLD", "NEW")}

# PostgreSQL: statement triggers over transition tables (one bump per statement), names qualified so
# that a writer with another search_path is counted too. {rows} is new_rows or old_rows.
_PG_BUMP = f"""
    WITH bumped AS (
      INSERT INTO {PG_SCHEMA}.embedding_generations AS g (model_id, generation, pruned)
      SELECT DISTINCT model_id, 1, 0 FROM {{rows}}
      ON CONFLICT (model_id) DO UPDATE SET generation = g.generation + 1
      RETURNING g.model_id, g.generation)
    INSERT INTO {PG_SCHEMA}.embedding_changes (model_id, generation, image_id)
    SELECT r.model_id, b.generation, r.image_id FROM {{rows}} r JOIN bumped b ON b.model_id = r.model_id
    ON CONFLICT DO NOTHING;"""
_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION {PG_SCHEMA}.embeddings_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN{_PG_BUMP.format(rows="old_rows")}
  END IF;
  IF TG_OP <> 'DELETE' THEN{_PG_BUMP.format(rows="new_rows")}
  END IF;
  RETURN NULL;
END $$"""
_PG_TRIGGERS = {"INSERT": "NEW TABLE AS new_rows", "DELETE": "OLD TABLE AS old_rows",
                "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows"}


def create_generation_triggers(conn) -> None:
    """The triggers that bump ``embedding_generations`` and log ``embedding_changes`` (idempotent)."""
    if conn.dialect.name == "sqlite":
        for event, rows in _SQLITE_TRIGGERS.items():
            body = "".join(_SQLITE_BUMP.format(row=row) for row in rows)
            conn.exec_driver_sql(f"CREATE TRIGGER IF NOT EXISTS embeddings_generation_{event.lower()} "
                                 f"AFTER {event} ON embeddings BEGIN{body}\nEND")
        return
    conn.exec_driver_sql(_PG_FUNCTION)
    for event, referencing in _PG_TRIGGERS.items():
        name = f"embeddings_generation_{event.lower()}"
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {PG_SCHEMA}.embeddings")
        conn.exec_driver_sql(f"CREATE TRIGGER {name} AFTER {event} ON {PG_SCHEMA}.embeddings "
                             f"REFERENCING {referencing} FOR EACH STATEMENT "
                             f"EXECUTE FUNCTION {PG_SCHEMA}.embeddings_changed()")


# A new database gets them with its embeddings table; an older one through its migration.
sa.event.listen(embeddings, "after_create", lambda _table, conn, **_kw: create_generation_triggers(conn))

# ---- split step: a stored random number per image, so another ratio re-cuts without new randomness.
splits = sa.Table(
    "splits", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("random", sa.Float, nullable=False),        # uniform [0, 1), from (seed, sha256)
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("test_ratio", sa.Float, nullable=False),
    sa.Column("split", sa.String(8), nullable=False),     # train | test
    sa.CheckConstraint("split IN ('train', 'test')", name="splits_split"),
)

# ---- train step: classifiers, stored in a safe format (skops), never a pickle.
models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),     # e.g. texture-mlp
    sa.Column("kind", sa.String(32), nullable=False),     # mlp | logreg
    sa.Column("feature_model_id", sa.Integer, sa.ForeignKey("feature_models.id"), nullable=False),
    sa.Column("classes", sa.Text, nullable=False),        # JSON list, the order of score columns
    sa.Column("params", sa.Text, nullable=False),         # JSON
    sa.Column("model", sa.LargeBinary, nullable=False),   # skops bytes
    sa.Column("cv_accuracy", sa.Float),
    sa.Column("train_accuracy", sa.Float),
    sa.Column("test_accuracy", sa.Float),
    sa.Column("confusion", sa.Text),                      # JSON matrix, rows = true class
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
scores = sa.Table(
    "scores", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("predicted", sa.Text, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 class probabilities, in models.classes order
)

# ---- fit step (lookalike.spaces): similarity spaces fitted on the collection, and every image's vector in them.
similarity_spaces = sa.Table(
    "similarity_spaces", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(16), nullable=False),     # pca | learned
    sa.Column("feature_model_id", sa.Integer, sa.ForeignKey("feature_models.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("params", sa.LargeBinary, nullable=False),  # .npz: each part's mean, matrix and weight
    sa.Column("checksum", sa.String(64), nullable=False), # sha256 of params
    sa.Column("fitted_on", sa.Text, nullable=False),      # JSON: images, labels, seed
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
space_vectors = sa.Table(
    "space_vectors", metadata,
    sa.Column("space_id", sa.Integer, sa.ForeignKey("similarity_spaces.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32, unit length
)

# ---- evaluate step: the ranking protocol's pairs and results.
evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="SET NULL")),
    sa.Column("feature_model_id", sa.Integer, sa.ForeignKey("feature_models.id"), nullable=False),
    sa.Column("params", sa.Text, nullable=False),         # JSON: queries per label, negatives, seed
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
evaluation_pairs = sa.Table(
    "evaluation_pairs", metadata,
    sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("query_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("candidate_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("is_positive", sa.Boolean, nullable=False),
)
evaluation_results = sa.Table(
    "evaluation_results", metadata,
    sa.Column("evaluation_id", sa.Integer, sa.ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("space", sa.String(16), primary_key=True),   # embeddings | scores | pca | learned
    sa.Column("metric", sa.String(8), primary_key=True),   # cosine | l2
    sa.Column("measure", sa.String(16), primary_key=True), # top1 … top32, mean_rank, median_rank, map@10, recall@10
    sa.Column("value", sa.Float, nullable=False),
)

# ---- rank step: query images in, top-K out.
query_images = sa.Table(
    "query_images", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text, nullable=False),          # path, URL or "image:<id>"
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),  # bytes kept in the image store
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="SET NULL")),  # when stored too
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
)
ranking_results = sa.Table(
    "ranking_results", metadata,
    sa.Column("query_id", sa.Integer, sa.ForeignKey("query_images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("space", sa.String(16), primary_key=True),
    sa.Column("rank", sa.Integer, primary_key=True),
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    sa.Column("distance", sa.Float, nullable=False),
)

# ---- inspect step (lookalike.quality): one row per image, replaced when it is inspected again.
image_quality = sa.Table(
    "image_quality", metadata,
    sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("status", sa.String(8), nullable=False),    # 'ok' | 'failed' (reason says why)
    sa.Column("reason", sa.Text),
    sa.Column("sharpness", sa.Float),                     # Laplacian variance / grey variance, on the thumbnail
    sa.Column("brightness", sa.Float),                    # mean luminance, 0..1
    sa.Column("dark_share", sa.Float),                    # share of near-black pixels
    sa.Column("bright_share", sa.Float),                  # share of near-white pixels
    sa.Column("luminance_p01", sa.Float),                 # 1st percentile of luminance
    sa.Column("luminance_p99", sa.Float),                 # 99th percentile of luminance
    sa.Column("entropy", sa.Float),                       # bits, grey histogram
    sa.Column("aspect", sa.Float),                        # short side / long side
    sa.Column("pixels", sa.BigInteger),                   # width x height
    sa.Column("flags", sa.Text),                          # e.g. 'blurry,dark'; '' when clean; NULL when failed
    sa.Column("method", sa.String(64), nullable=False),   # how the scores were made (quality.METHOD)
    sa.Column("inspected_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('ok', 'failed')", name="image_quality_status"),
)

# ---- every step records what it did (the DBA's audit trail).
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.String(32), nullable=False),
    sa.Column("params", sa.Text),        # JSON
    sa.Column("counts", sa.Text),        # JSON
    sa.Column("outcome", sa.String(16), nullable=False),  # ok | failed | interrupted
    sa.Column("error", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
)
