"""The database: schema, views and SQL functions, migrations, shared read queries, opening it.

- :mod:`.schema` — every table (one schema version for all of them);
- :mod:`.views` — the ``unique_images`` and ``image_dhash`` views and the ``hamming`` SQL function;
- :mod:`.migrations` — the registry that brings an older database forward;
- :mod:`.queries` — read queries shared by steps and front ends;
- :mod:`.connection` — :class:`Database`: engine, checks, schema, image store;
- :mod:`.records` — the run record and values as stored (timestamps, JSON, vectors).

Everything is importable from ``lookalike.db`` itself.
"""

from .connection import SQLITE_HEADER, Database, describe_db_error, validate_identifier
from .migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from .queries import (dedupe_run_rows, duplicates_by_label, embedding_counts, group_member_rows, is_unique_image,
                      latest_classifier_scores, latest_dedupe_run, latest_evaluation, latest_feature_model, load_embeddings,
                      non_keepers, unique_image_ids)
from .records import committed_since, now, recorded_run, to_json, vector_bytes, vector_from_bytes
from .schema import (PG_SCHEMA, dedupe_runs, duplicate_decisions, duplicate_groups, embeddings, evaluation_pairs,
                     evaluation_results, evaluations, feature_models, hashed_images, image_hashes, image_sources, images, metadata,
                     models, query_images, ranking_results, runs, scores, settings, similarity_spaces,
                     space_vectors, splits)
from .views import VIEWS, ensure_views, hamming_sql, image_dhash, register_sqlite_functions, unique_images

__all__ = [
    "SQLITE_HEADER", "Database", "describe_db_error", "validate_identifier",
    "MIGRATIONS", "SCHEMA_VERSION", "Migration",
    "dedupe_run_rows", "duplicates_by_label", "embedding_counts", "group_member_rows", "is_unique_image",
    "latest_classifier_scores", "latest_dedupe_run", "latest_evaluation", "latest_feature_model", "load_embeddings",
    "non_keepers", "unique_image_ids",
    "committed_since", "now", "recorded_run", "to_json", "vector_bytes", "vector_from_bytes",
    "PG_SCHEMA", "dedupe_runs", "duplicate_decisions", "duplicate_groups", "embeddings", "evaluation_pairs",
    "evaluation_results", "evaluations", "feature_models", "hashed_images", "image_hashes", "image_sources", "images", "metadata",
    "models", "query_images", "ranking_results", "runs", "scores", "settings", "similarity_spaces",
    "space_vectors", "splits",
    "VIEWS", "ensure_views", "hamming_sql", "image_dhash", "register_sqlite_functions", "unique_images",
]
