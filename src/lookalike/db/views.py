"""Views and SQL functions, created whenever a database is opened.

``unique_images`` (ok images that are not duplicates in the latest dedupe run)
and ``image_dhash`` (dHash 1..8 per image, one column per size), and the
``hamming(hex_a, hex_b)`` function: registered per connection on SQLite (which
has no XOR or popcount), created once in the schema on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..hamming import hamming
from .schema import PG_SCHEMA, images

# Not tables: create_all never sees this metadata.
_views = sa.MetaData()
unique_images = sa.Table(
    "unique_images", _views,
    *(sa.Column(c.name, c.type) for c in images.columns if c.name not in ("status", "reason")),
)
image_dhash = sa.Table(
    "image_dhash", _views,
    sa.Column("image_id", sa.Integer), sa.Column("label", sa.Text),
    sa.Column("width", sa.Integer), sa.Column("height", sa.Integer),
    *(sa.Column(f"dhash_hex_{size}", sa.String(128)) for size in range(1, 9)),
)

_UNIQUE_IMAGES_SQL = f"""
SELECT {", ".join(f"i.{c.name}" for c in unique_images.columns)}
FROM images i
WHERE i.status = 'ok'
  AND NOT EXISTS (SELECT 1 FROM duplicate_groups dg
                  WHERE dg.image_id = i.id AND NOT dg.is_keeper
                    AND dg.run_id = (SELECT MAX(id) FROM dedupe_runs))
"""
_IMAGE_DHASH_SQL = f"""
SELECT i.id AS image_id, i.label, i.width, i.height,
       {", ".join(f"MAX(CASE WHEN h.size = {s} THEN h.hex END) AS dhash_hex_{s}" for s in range(1, 9))}
FROM images i JOIN image_hashes h ON h.image_id = i.id AND h.kind = 'dhash_rowcol'
WHERE i.status = 'ok'
GROUP BY i.id, i.label, i.width, i.height
"""
VIEWS = {"unique_images": _UNIQUE_IMAGES_SQL, "image_dhash": _IMAGE_DHASH_SQL}

# popcount(int(a, 16) XOR int(b, 16)): the shorter hex is left-padded with zeros,
# so hashes of one kind and size compare bit for bit, and the function never raises.
_PG_HAMMING_SQL = f"""
CREATE FUNCTION {PG_SCHEMA}.hamming(a text, b text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT bit_count(('x' || lpad(a, greatest(length(a), length(b)), '0'))::varbit
                 # ('x' || lpad(b, greatest(length(a), length(b)), '0'))::varbit)::integer
$$"""


def hamming_sql(a: str | None, b: str | None) -> int | None:
    """The SQL ``hamming(hex_a, hex_b)`` function: bits that differ between two hex hashes (NULL in, NULL out)."""
    return None if a is None or b is None else hamming(a, b)


def register_sqlite_functions(dbapi_conn) -> None:
    """Register ``hamming(hex_a, hex_b)`` on a sqlite3 connection (SQLite has no XOR or popcount)."""
    dbapi_conn.create_function("hamming", 2, hamming_sql, deterministic=True)


def ensure_views(conn: Connection, dialect: str) -> None:
    """Create the ``unique_images`` and ``image_dhash`` views (and PostgreSQL's ``hamming``) if missing.

    Existing objects are left as they are, so this is cheap to call on every
    open; a change to a definition belongs in a schema migration that drops it.
    """
    if dialect == "sqlite":
        for name, body in VIEWS.items():
            conn.exec_driver_sql(f"CREATE VIEW IF NOT EXISTS {name} AS {body}")
        return
    for name, body in VIEWS.items():
        if conn.execute(sa.text("SELECT to_regclass(:name)"), {"name": f"{PG_SCHEMA}.{name}"}).scalar() is None:
            conn.exec_driver_sql(f"CREATE VIEW {PG_SCHEMA}.{name} AS {body}")
    if conn.execute(sa.text("SELECT to_regprocedure(:sig)"),
                    {"sig": f"{PG_SCHEMA}.hamming(text,text)"}).scalar() is None:
        conn.exec_driver_sql(_PG_HAMMING_SQL)
