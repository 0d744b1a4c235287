#!/usr/bin/env bash
# Set up lookalike's PL/Python procedures on a Debian machine, then run the whole pipeline
# on the rendered sample set from psql. Run it on the database host, from the project's
# folder (or with `lookalike` on PATH).
#
#   scripts/setup-debian.sh                  # fresh machine: PostgreSQL 15 + PL/Python from apt,
#                                            # role and database "lookalike" on the system cluster
#   scripts/setup-debian.sh --db URL         # an existing server and database (superuser role);
#                                            # no apt, no cluster set-up
#
# Options: --db URL, --target DIR (packages for the server; default /var/lib/lookalike/python3.11),
# --store DIR (image store; default /var/lib/lookalike/store), --samples DIR (default
# /var/lib/lookalike/samples), --per-label N (sample images per label; default 100).
# $LOOKALIKE names the lookalike command to use (default: the checkout's .venv/bin/lookalike).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
db_url=""
base=/var/lib/lookalike
target="" store="" samples="" per_label=100
while [ $# -gt 0 ]; do
  case "$1" in
    --db) db_url="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --store) store="$2"; shift 2 ;;
    --samples) samples="$2"; shift 2 ;;
    --per-label) per_label="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
store="${store:-$base/store}"
samples="${samples:-$base/samples}"

# $LOOKALIKE, else the project's venv when run from the checkout, else `lookalike` on PATH.
if [ -n "${LOOKALIKE:-}" ]; then
  lookalike="$LOOKALIKE"
elif [ -x "$here/../.venv/bin/lookalike" ]; then
  lookalike="$here/../.venv/bin/lookalike"
else
  lookalike="$(command -v lookalike || true)"
fi
[ -n "$lookalike" ] || { echo "lookalike is not installed: run 'make' in the project folder first" >&2; exit 1; }

if [ -z "$db_url" ]; then
  # A fresh machine: packages, the system cluster, and a superuser role for the OS user running this.
  if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: without --db the script installs packages and sets up the system cluster" >&2
    exit 1
  fi
  bash "$here/install-system-deps.sh"
  pg_lsclusters -h 15 main >/dev/null 2>&1 || pg_createcluster 15 main
  pg_ctlcluster 15 main start 2>/dev/null || true  # already running is fine
  role="$(id -un)"
  as_postgres=(runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres)
  "${as_postgres[@]}" -v role="$role" <<'SQL'
SELECT format('CREATE ROLE %I SUPERUSER LOGIN', :'role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('CREATE DATABASE lookalike OWNER %I', :'role') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'lookalike')
\gexec
SQL
  # The procedures connect back over the unix socket as the calling role, from the server's OS
  # user: let OS user postgres (and this one) log in to database lookalike as this role (peer map).
  conf_dir="$(runuser -u postgres -- psql -X -A -t -d postgres -c 'SHOW config_file' | xargs dirname)"
  if ! grep -q '^local[[:space:]]\+lookalike[[:space:]].*map=lookalike' "$conf_dir/pg_hba.conf"; then
    sed -i '0,/^local/s//local   lookalike       all                                     peer map=lookalike\n&/' \
      "$conf_dir/pg_hba.conf"
  fi
  for os_user in postgres "$role"; do
    grep -q "^lookalike[[:space:]]\+$os_user[[:space:]]\+$role\$" "$conf_dir/pg_ident.conf" ||
      echo "lookalike       $os_user        $role" >>"$conf_dir/pg_ident.conf"
  done
  pg_ctlcluster 15 main reload
  db_url="postgresql:///lookalike"
fi
psql_url="${db_url/+psycopg/}"  # psql takes libpq URLs, without SQLAlchemy's driver name

# The image store: the server's OS user writes it (every folder above it must let that user in;
# `db install` warns when it cannot).
mkdir -p "$store" "$samples"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$store"; fi

echo "== lookalike db install"
"$lookalike" db install --db "$db_url" --store "$store" ${target:+--target "$target"}

echo "== rendering $per_label sample images per label into $samples"
"$lookalike" samples "$samples" --per-label "$per_label" --seed 3 -q
chmod -R a+rX "$samples"

echo "== the pipeline, from psql"
psql "$psql_url" -X -v ON_ERROR_STOP=1 -v samples="$samples" <<'SQL'
CALL lookalike.load_images(:'samples');
CALL lookalike.run_once();
SELECT * FROM lookalike.similar_images((SELECT min(image_id) FROM lookalike.embeddings), 5);
SQL
