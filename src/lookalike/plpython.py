"""The pipeline as PL/Python stored procedures, for a DBA working in psql.

Two halves:

- **Install** (runs in our Python, on the database host): :func:`install` copies
  lookalike and every distribution it needs into a folder the server can read
  (hard links where possible), then creates the routines of
  ``sql/postgres/procedures.sql`` in schema ``lookalike``; :func:`uninstall`
  takes them away again. PL/Python runs the server's own Python, so its
  major.minor must be ours (the copied wheels are built for it).
- **Server** (runs inside a PostgreSQL backend, called from the routine bodies
  through :mod:`lookalike.backend`, which answers a query by id from a current
  index folder itself, without importing this module or a database driver):
  :func:`call` runs one procedure, :func:`similar` answers ``similar_images``.
  Each is a thin call of the step function the CLI calls, on a :class:`Database`
  that connects back to the same server over its unix socket as the current
  role, so the steps commit exactly as they do from the CLI. Progress and the
  step's summary reach psql as NOTICEs.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .config import ConfigError, mask_secrets, parse_db_url, resolve_db_url
from .db import PG_SCHEMA, Database, settings
from .errors import BadInput, LookalikeError, describe
from .quick import HOLDS_MORE_THAN_READS
from .steps import PREPARED_DEFAULTS, ROUTINES, STEPS, procedures_sql as routines_sql, \
    routine as registry_routine

DEFAULT_TARGET = Path(f"/var/lib/lookalike/python{sys.version_info.major}.{sys.version_info.minor}")
PATH_SETTING = "plpython_path"         # lookalike.settings key, for people: the routine bodies are what counts
PREPARED_SETTING = "prepared_data"     # lookalike.settings key: what prepare_data was given
TARGET_MARKER = ".lookalike-target"    # in every folder install made; nothing else is ever deleted
PROGRESS_SECONDS = 5.0                 # at most one progress NOTICE this often
TEXT_LIMIT = 4096                      # characters in a text parameter (a path, a URL, a name)
WATCH_SECONDS = 0.1                    # how often a running step is checked for a cancel or terminate
STOP_GRACE_SECONDS = 3.0               # how long it may take to stop at its own next progress line (a batch's end)
CANCEL_GRACE_SECONDS = 1.0             # then after KeyboardInterrupt, before its database waits are cancelled
HEADER_SUFFIXES = {".h", ".hpp", ".cuh"}  # a third of the files (torch's include/): nothing the server runs
# Imported by the install check inside the server: every step's module, so a missing dependency shows at once.
STEP_MODULES = ("ingest", "hashing", "dedupe", "features", "split", "classify", "evaluate", "search", "pipeline")


# ====================================================================== install side

@dataclass
class InstallSummary:
    database: str                     # masked URL
    target: Path
    server_python: str
    our_python: str
    distributions: int
    reused: bool                      # the target already held these very packages
    linked: int                       # files hard-linked
    copied: int                       # files copied (other filesystem, not world-readable, or lookalike itself)
    megabytes: float
    seconds: float
    routines: list[str]
    store: Path
    server_user: str
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        copied = ("already in place" if self.reused else
                  f"{self.megabytes:.0f} MB: {self.linked} files hard-linked, {self.copied} copied")
        out = [f"installed the PL/Python procedures in {self.database} (schema {PG_SCHEMA}) in {self.seconds:.1f} s",
               f"  packages: {self.distributions} distributions + lookalike, {copied}",
               f"  into {self.target} (settings key {PATH_SETTING}); server Python {self.server_python}, "
               f"ours {self.our_python}",
               f"  routines: {', '.join(self.routines)}",
               f"  EXECUTE is revoked from PUBLIC: GRANT EXECUTE ON ALL ROUTINES IN SCHEMA {PG_SCHEMA} TO <role> "
               f"for roles that may run them",
               f"  image store: {self.store} (the server runs as OS user {self.server_user})"]
        out += [f"warning: {w}" for w in self.warnings]
        return out


@dataclass
class UninstallSummary:
    database: str
    routines: int
    removed_target: Path | None
    dropped_schema: bool
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"dropped {self.routines} PL/Python routines from {self.database}"]
        out.append(f"  removed {self.removed_target}" if self.removed_target else "  no package folder removed")
        out.append(f"  dropped schema {PG_SCHEMA} and all its data" if self.dropped_schema
                   else f"  schema {PG_SCHEMA} and its data are kept (--drop-data drops them)")
        out += [f"warning: {w}" for w in self.warnings]
        return out


# The routines install makes: every plpython3u routine in the schema.
_ROUTINES = sa.text("SELECT p.oid::regprocedure::text AS signature, p.proname AS name FROM pg_proc p "
                    "JOIN pg_language l ON l.oid = p.prolang "
                    "WHERE p.pronamespace = to_regnamespace(:schema) AND l.lanname = 'plpython3u'")


# On an SQL_ASCII (C-locale) server psycopg hands back bytes unless the client asks for UTF-8.
UTF8 = {"client_encoding": "utf8"}

def install(db_url: str | None, target: str | Path | None = None, *,
            store_dir: str | Path | None = None) -> InstallSummary:
    """Make lookalike importable to the server's PL/Python and create the procedures.

    Must run on the database host, as a database superuser (plpython3u is an
    untrusted language). Refuses, before changing anything, when the server has
    no PL/Python or runs another Python major.minor than this one.
    """
    started = time.monotonic()
    target = _check_target_path(Path(target) if target else DEFAULT_TARGET)
    if store_dir is not None:
        _body_path(Path(store_dir), "--store")
    url = _postgres_url(db_url)
    engine = sa.create_engine(url, connect_args=UTF8)
    try:
        with _connect(engine) as conn:
            _check_server(conn)
            probe = _probe(conn, {})
    finally:
        engine.dispose()
    check_python_version(tuple(probe["python"][:2]), sys.version_info[:2])

    dists, missing = required_distributions()
    wanted = _packages_manifest(dists)
    previous_umask = os.umask(0o022)  # new folders 755, new files 644
    try:
        with Database(db_url, store_dir) as db:
            linked = copied = size = 0
            reused = _read_marker(target) == wanted
            if reused:
                _check_server_sees(db, target, wanted)
            else:
                stage = target.with_name(target.name + ".new")
                _remove_our_folder(stage)
                stage.mkdir(parents=True)
                try:
                    (stage / TARGET_MARKER).write_text(wanted)
                    _check_server_sees(db, stage, wanted)
                    linked, copied, size = _copy_packages(dists, stage, target)
                except BaseException:
                    _remove_our_folder(stage)
                    raise
                _swap_in(stage, target)
            with db.engine.connect() as conn:
                checked = _probe(conn, {"path": str(target), "store": str(db.store.root)})
            if checked["import_error"]:
                raise ConfigError(f"the server cannot import lookalike from {target}: {checked['import_error']}")
            routines = _create_routines(db, target)
            warnings = [f"{name} is required but not installed here; it was not copied" for name in missing]
            if not checked["store_ok"]:
                warnings.append(f"the image store {db.store.root} is not readable and writable by the server's "
                                f"OS user {checked['user']}: procedures that read or load images will fail "
                                f"(chown {checked['user']} it, or install again with another --store)")
            return InstallSummary(db.masked_url, target, ".".join(map(str, probe["python"])),
                                  ".".join(map(str, sys.version_info[:3])), len(dists), reused, linked, copied,
                                  size / 1e6, time.monotonic() - started, routines, db.store.root,
                                  checked["user"], warnings)
    finally:
        os.umask(previous_umask)


def uninstall(db_url: str | None, drop_data: bool = False) -> UninstallSummary:
    """Drop the PL/Python routines, remove the package folder install made, and with ``drop_data`` the schema."""
    url = _postgres_url(db_url)
    engine = sa.create_engine(url, connect_args=UTF8)
    warnings: list[str] = []
    try:
        with _connect(engine) as conn, conn.begin():
            has_schema = conn.execute(sa.text("SELECT to_regnamespace(:s)"), {"s": PG_SCHEMA}).scalar() is not None
            has_settings = has_schema and conn.execute(sa.text("SELECT to_regclass(:t)"),
                                                       {"t": f"{PG_SCHEMA}.settings"}).scalar() is not None
            path = _installed_target(conn) if has_schema else None
            routines = [row.signature for row in conn.execute(_ROUTINES, {"schema": PG_SCHEMA})]
            for routine in routines:
                conn.exec_driver_sql(f"DROP ROUTINE {routine}")  # regprocedure text: quoted as needed
            if drop_data and has_schema:
                conn.exec_driver_sql(f'DROP SCHEMA "{PG_SCHEMA}" CASCADE')
            elif has_settings:
                conn.execute(sa.text(f"DELETE FROM {PG_SCHEMA}.settings WHERE key = :k"), {"k": PATH_SETTING})
    finally:
        engine.dispose()
    removed = None
    if path:
        users = _databases_using(url, path)
        if users:
            warnings.append(f"{path} is kept: the procedures of database(s) {', '.join(users)} use it")
        elif (Path(path) / TARGET_MARKER).is_file():
            _remove_our_folder(Path(path))
            removed = Path(path)
        elif Path(path).exists():
            warnings.append(f"{path} has no {TARGET_MARKER} marker: left in place")
    return UninstallSummary(url.render_as_string(hide_password=True), len(routines), removed,
                            drop_data and has_schema, warnings)


def _databases_using(url, path: str) -> list[str]:
    """The other databases of this server whose procedures load packages from ``path`` (or can't be checked)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=UTF8)
    with engine.connect() as conn:
        names = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                                     "AND datname <> current_database() ORDER BY 1")).scalars().all()
    users = []
    for name in names:
        other = sa.create_engine(url.set(database=name), poolclass=sa.pool.NullPool, connect_args=UTF8)
        try:
            with other.connect() as conn:
                used = _installed_target(conn)
        except sa.exc.DBAPIError:
            used = path  # cannot tell: keep the folder
        if used == path:
            users.append(name)
    return users


def check_python_version(server: tuple[int, int], ours: tuple[int, int]) -> None:
    """Refuse when the server's PL/Python Python is another major.minor than ours (other wheels, other ABI)."""
    if tuple(server) != tuple(ours):
        raise ConfigError(f"the server's PL/Python runs Python {server[0]}.{server[1]}, but lookalike is installed "
                          f"for Python {ours[0]}.{ours[1]} here: the copied packages would not load. Run "
                          f"`lookalike db install` from a Python {server[0]}.{server[1]} environment")


def required_distributions(name: str = "lookalike") -> tuple[list[importlib.metadata.Distribution], list[str]]:
    """The installed distributions ``name`` needs, recursively, honouring markers and extras (not ``name`` itself).

    Returns them and the names of required distributions that are not installed.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    missing: list[str] = []
    done: set[tuple[str, str]] = set()
    wanted = [(name, "")]
    while wanted:
        wanted_name, extra = wanted.pop()
        key = canonicalize_name(wanted_name)
        if (key, extra) in done:
            continue
        done.add((key, extra))
        try:
            dist = found.get(key) or importlib.metadata.distribution(wanted_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(wanted_name)
            continue
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                wanted += [(requirement.name, e) for e in ("", *sorted(requirement.extras))]
    found.pop(canonicalize_name(name), None)
    return sorted(found.values(), key=lambda d: d.metadata["Name"].lower()), sorted(set(missing))


def _postgres_url(db_url: str | None):
    url = parse_db_url(resolve_db_url(db_url))
    if url.get_backend_name() != "postgresql":
        raise ConfigError("`db install` is for PostgreSQL; on SQLite every step already runs in-process")
    return url


def _connect(engine: sa.Engine) -> sa.Connection:
    try:
        return engine.connect()
    except sa.exc.OperationalError as exc:
        raise ConfigError(f"cannot connect to {engine.url.render_as_string(hide_password=True)}: "
                          f"{_first_line(exc)}") from None


def _check_target_path(target: Path) -> Path:
    target = _body_path(target, "--target")
    if target.exists() and any(target.iterdir()) and not (target / TARGET_MARKER).is_file():
        raise ConfigError(f"{target} exists and was not made by `lookalike db install`: choose another --target")
    return target


def _body_path(path: Path, option: str) -> Path:
    """``path``, absolute, once it is safe to write into the routine bodies as a Python string literal."""
    path = path.expanduser().absolute()
    if not path.name or any(c in str(path) for c in "$'\"\\") or not str(path).isprintable():
        raise ConfigError(f"{option} must be a plain folder path (no quotes, $ or backslashes): {path}")
    return path


def _check_server(conn) -> None:
    available = conn.execute(sa.text("SELECT count(*) FROM pg_available_extensions WHERE name = 'plpython3u'"))
    if not available.scalar():
        raise ConfigError("PL/Python is not available on this server (no plpython3u in pg_available_extensions): "
                          "install it on the database host, e.g. apt-get install postgresql-plpython3-15")
    if not conn.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
        role = conn.execute(sa.text("SELECT current_user")).scalar()
        raise ConfigError(f"role {role} is not a superuser: plpython3u is an untrusted language, so only a "
                          f"superuser can install the procedures (connect as postgres); other roles can then be "
                          f"given EXECUTE on them")


# Runs inside the server, in a transaction that is rolled back: it leaves nothing behind.
_PROBE = """
CREATE FUNCTION pg_temp.lookalike_probe(request text) RETURNS text LANGUAGE plpython3u AS $probe$
import json, os, pwd, sys
asked = json.loads(request)
answer = {"python": list(sys.version_info[:3]), "user": pwd.getpwuid(os.geteuid()).pw_name}
if "marker" in asked:
    try:
        with open(asked["marker"]) as f:
            answer["marker"] = f.read()
    except OSError as exc:
        answer["marker"] = exc.strerror
if "path" in asked:
    sys.path.insert(0, asked["path"])
    try:
        for name in asked["modules"]:
            __import__(name)
        answer["import_error"] = None
    except Exception as exc:
        answer["import_error"] = "%s: %s" % (type(exc).__name__, exc)
if "store" in asked:
    store = asked["store"]
    while not os.path.exists(store) and os.path.dirname(store) != store:
        store = os.path.dirname(store)
    answer["store_ok"] = os.access(store, os.R_OK | os.W_OK | os.X_OK)
return json.dumps(answer)
$probe$
"""


def _packages_manifest(dists: list[importlib.metadata.Distribution]) -> str:
    """What a package folder holds: each distribution's version and a digest of lookalike's own files."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(package)}\0{path.stat().st_size}\0".encode() + path.read_bytes())
    manifest = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "lookalike": digest.hexdigest(),
                "distributions": {d.metadata["Name"]: d.version for d in dists}}
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def _read_marker(folder: Path) -> str | None:
    try:
        return (folder / TARGET_MARKER).read_text()
    except OSError:
        return None


def _check_server_sees(db: Database, folder: Path, marker: str) -> None:
    """Refuse unless the server reads the same marker file in ``folder`` as we do (same host, readable)."""
    with db.engine.connect() as conn:
        seen = _probe(conn, {"marker": str(folder / TARGET_MARKER)})
    if seen["marker"] != marker:
        raise ConfigError(f"the server cannot read {folder} ({seen['marker'][:80].strip()}): `db install` must run "
                          f"on the database host, and every folder above --target must be readable by the "
                          f"server's OS user {seen['user']}")


def _probe(conn, request: dict[str, Any]) -> dict[str, Any]:
    """Ask the server's PL/Python about itself (version, OS user, what it can read and import)."""
    if "path" in request:
        request["modules"] = ["lookalike.plpython", *(f"lookalike.{m}" for m in STEP_MODULES)]
    try:
        _run_script(conn, "CREATE EXTENSION IF NOT EXISTS plpython3u;" + _PROBE)
        answer = conn.execute(sa.text("SELECT pg_temp.lookalike_probe(:r)"), {"r": json.dumps(request)}).scalar()
    finally:
        conn.rollback()
    return json.loads(answer)


def _place(source: Path, destination: Path) -> bool:
    """Hard-link ``source`` when the server may read it as it is, else copy it (mode 644); True if linked."""
    if destination.exists() or destination.is_symlink():
        destination.unlink()  # a file two distributions both ship
    if source.stat().st_mode & 0o444 == 0o444:
        try:
            os.link(source, destination)
            return True
        except OSError:
            pass  # another filesystem, or links not allowed
    shutil.copy2(source, destination)
    destination.chmod(0o644)
    return False


def _copy_packages(dists: list[importlib.metadata.Distribution], stage: Path, target: Path) -> tuple[int, int, int]:
    """Put every file of ``dists`` (relative to its site-packages) and the lookalike package into ``stage``.

    The wheels' own ``.pyc`` files come along (they are in their RECORD); lookalike's
    copy is compiled here, for ``target``, since the server cannot write there.
    """
    linked = copied = size = 0
    for dist in dists:
        for relative in dist.files or []:
            if relative.parts[:1] == ("..",) or relative.suffix in HEADER_SUFFIXES:
                continue  # console scripts outside site-packages; C headers, for building extensions
            source = Path(dist.locate_file(relative))
            if not source.is_file():
                continue
            destination = stage / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if _place(source, destination):
                linked += 1
            else:
                copied += 1
            size += source.stat().st_size
    # lookalike itself is usually an editable install: copy its package folder, a snapshot of now.
    package = Path(__file__).resolve().parent
    shutil.copytree(package, stage / package.name, ignore=shutil.ignore_patterns("__pycache__"),
                    copy_function=shutil.copy2)
    import compileall   # install only: not among a backend's first imports
    compileall.compile_dir(stage / package.name, ddir=str(target / package.name), quiet=2, workers=1)
    for path in (stage / package.name).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():
            copied += 1
            size += path.stat().st_size
    return linked, copied, size


def _swap_in(stage: Path, target: Path) -> None:
    """Replace ``target`` with ``stage``; sessions that already imported keep what they loaded."""
    old = target.with_name(target.name + ".old")
    _remove_our_folder(old)
    if target.exists():
        target.rename(old)
    stage.rename(target)
    _remove_our_folder(old)


def _remove_our_folder(path: Path) -> None:
    if not path.exists():
        return
    if not (path / TARGET_MARKER).is_file():
        raise ConfigError(f"{path} exists and was not made by `lookalike db install`: not removing it")
    shutil.rmtree(path)


def procedures_sql(target: Path, store: Path) -> str:
    """The routines' SQL, generated from the step registry, with the package folder and the image store filled in."""
    return routines_sql(target, _body_path(store, "--store"))


def _installed_target(conn) -> str | None:
    """The package folder written into the installed routines' bodies (not the settings row anyone may edit)."""
    body = conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE pronamespace = to_regnamespace(:s) "
                                "AND proname = 'hash_images'"), {"s": PG_SCHEMA}).scalar()
    found = re.search(r'sys\.path\.insert\(0, ("[^"]*")\)', body or "")
    return json.loads(found.group(1)) if found else None


def _create_routines(db: Database, target: Path) -> list[str]:
    with db.begin() as conn:
        _run_script(conn, "CREATE EXTENSION IF NOT EXISTS plpython3u;" + procedures_sql(target, db.store.root))
        conn.execute(postgresql.insert(settings).values(key=PATH_SETTING, value=str(target))
                     .on_conflict_do_update(index_elements=["key"], set_={"value": str(target)}))
        return sorted({row.name for row in conn.execute(_ROUTINES, {"schema": PG_SCHEMA})})


def _run_script(conn, script: str) -> None:
    """Run SQL statements as they are: no parameters, so nothing in them is taken for a placeholder."""
    with conn.connection.cursor() as cursor:
        cursor.execute(script)


def _first_line(exc: Exception) -> str:
    return mask_secrets(str(getattr(exc, "orig", exc)).strip().splitlines()[0])


# ====================================================================== server side

def _step(name: str) -> Callable[..., list[str]]:
    """Routine ``name`` when it is one step's function: the registry maps its SQL parameters to the step's."""
    spec = registry_routine(name)
    module, function = STEPS[spec.step].function.rsplit(".", 1)

    def run(db: Database, **params: Any) -> list[str]:
        step = getattr(importlib.import_module(f"lookalike.{module}"), function)
        kwargs = {p.param: params[p.name] for p in spec.params}  # NULL: the step's own default
        if "progress" in inspect.signature(step).parameters:
            kwargs["progress"] = True  # to NOTICEs; also where a cancel stops the step
        return step(db, **kwargs).lines()
    return run


def _prepare_data(db: Database, test_ratio: float | None, queries_per_label: int | None,
                  negatives_per_query: int | None) -> list[str]:
    from .split import split_images
    prepared = {"test_ratio": test_ratio, "queries_per_label": queries_per_label,
                "negatives_per_query": negatives_per_query}
    lines = split_images(db, test_ratio=test_ratio).lines()
    db.set_setting(PREPARED_SETTING, json.dumps(prepared, sort_keys=True))
    return lines + [f"evaluate_model and run_once will use: {queries_per_label} queries per label, "
                    f"{negatives_per_query} negatives per query, test ratio {test_ratio}"]


def _evaluate_model(db: Database) -> list[str]:
    from .evaluate import evaluate_model
    prepared = _prepared(db)
    return evaluate_model(db, queries_per_label=prepared["queries_per_label"],
                          negatives_per_query=prepared["negatives_per_query"]).lines()


def _rank_candidates(db: Database, top_k: int | None) -> list[str]:
    from .pipeline import default_queries
    from .search import rank_queries
    default_queries(db)  # as `lookalike run`: with no queries given, the test split is ranked
    return rank_queries(db, top=top_k).lines()


def _run_once(db: Database, source: str | None) -> list[str]:
    from .pipeline import run_pipeline
    prepared = _prepared(db)
    return run_pipeline(db, source, test_ratio=prepared["test_ratio"],
                        queries_per_label=prepared["queries_per_label"],
                        negatives_per_query=prepared["negatives_per_query"], progress=True).lines()


PROCEDURES: dict[str, Callable[..., list[str]]] = {
    **{r.name: _step(r.name) for r in ROUTINES if r.step},
    "prepare_data": _prepare_data, "evaluate_model": _evaluate_model, "rank_candidates": _rank_candidates,
    "run_once": _run_once,
}


class ProcedureError(LookalikeError):
    """A refusal of the routine itself, with its SQLSTATE."""

    def __init__(self, message: str, sqlstate: str):
        super().__init__(message)
        self.sqlstate = sqlstate


def call(plpy, routine: str, store: str, **params: Any) -> Exception | None:
    """Run procedure ``routine`` with ``params`` inside the server, on the image store ``store``.

    Returns None when it worked, else the exception for the routine body to
    raise (raised there, the error psql shows carries no traceback from here).
    NOTICEs: the start, progress while it runs, and the step's summary lines.

    A step commits its own work, through its own connection back to the server,
    so it runs only where a procedure may commit: a CALL on its own, not inside
    BEGIN … COMMIT, where it could neither see the transaction's changes nor wait
    for its locks without hanging. A cancel, terminate or statement_timeout that
    comes while it runs stops it as Ctrl-C stops the CLI (:class:`_Watch`).
    """
    try:
        plpy.commit()  # ends the CALL's own, empty transaction; refused inside a transaction block
    except plpy.SPIError as exc:
        if getattr(exc, "sqlstate", None) != "2D000":  # invalid_transaction_termination
            return _failure(plpy, routine, exc)
        return _failure(plpy, routine, ProcedureError(
            "CALL it as a statement of its own, outside BEGIN ... COMMIT: each step commits its own work "
            "as it goes, through its own connection to the server", "25001"))  # active_sql_transaction
    shown = ", ".join(f"{name} => {_sql_literal(value)}" for name, value in params.items())
    try:
        plpy.notice(f"lookalike.{routine}({shown}): started")
    except plpy.Error as exc:  # a timeout or cancel that came while the routine's imports ran
        return _failure(plpy, routine, exc)
    started = time.monotonic()
    interrupts = _Interrupts()
    failure = None
    try:
        _check_params(routine, params)
        with _notices(plpy, interrupts) as stream:
            lines = _watched(interrupts, lambda: PROCEDURES[routine](_server_database(plpy, store), **params),
                             noticed=lambda: stream.stopped)
    except KeyboardInterrupt:
        lines = [f"lookalike.{routine}: interrupted; what it committed is kept"]
    except Exception as exc:
        lines, failure = [], exc
    with interrupts.held():
        for line in lines:
            plpy.notice(line)
        if failure is None and not interrupts.pending():
            plpy.notice(f"lookalike.{routine}: done in {time.monotonic() - started:.1f} s")
    return _outcome(plpy, routine, interrupts, failure)


def similar(plpy, store: str, query: int | str | None, k: int | None) -> tuple[list, Exception | None]:
    """The matches of ``similar_images`` (:class:`lookalike.answers.Match`, which :mod:`lookalike.backend`
    turns into rows), or the error to raise.

    It reads through its own connection back to the server, so it refuses to run
    in a transaction that has changed anything or holds locks beyond reading: it
    could not see those changes, and would wait for those locks forever.
    """
    from .net import private_urls_allowed_here   # lazy, as the search's: a by-id query imports no HTTP client
    from .search import similar_images
    interrupts = _Interrupts()
    matches, failure = [], None
    try:
        if plpy.execute(HOLDS_MORE_THAN_READS)[0]["holds"]:
            raise ProcedureError("this transaction has uncommitted changes or locks, which the search cannot "
                                 "see or would wait for (it reads through its own connection): commit first, "
                                 "or ask in a transaction of its own", "25001")
        _check_params("similar_images", {"query": query, "k": k})
        with _notices(plpy, interrupts):   # e.g. that the vector index cannot be read here, and the fallback
            matches = _watched(interrupts, lambda: similar_images(_server_database(plpy, store), query, k=k,
                                                                  allow_private=private_urls_allowed_here()))
    except KeyboardInterrupt:
        failure = ProcedureError("interrupted", "57014")  # query_canceled, when the server says no more
    except Exception as exc:
        failure = exc
    return matches, _outcome(plpy, "similar_images", interrupts, failure)


def _outcome(plpy, routine: str, interrupts: _Interrupts, failure: Exception | None) -> Exception | None:
    """The error to raise: the server's own when a cancel, terminate or timeout is pending, else ``failure``."""
    try:
        plpy.execute("SELECT 1")  # where the server acts on a cancel or terminate held off so far
    except plpy.SPIError as exc:
        return _failure(plpy, routine, exc)
    if failure is None:
        return None
    with interrupts.held():
        return _failure(plpy, routine, failure)


def _check_params(name: str, params: dict[str, Any]) -> None:
    """Refuse, before anything runs, a text too long, a NULL where the step has no NULL default, or a value
    outside the registry's bounds."""
    for param, value in params.items():
        if isinstance(value, str) and len(value) > TEXT_LIMIT:
            raise BadInput(f"{param} must be at most {TEXT_LIMIT} characters, not {len(value)}")
    registry_routine(name).check(params)


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if not isinstance(value, str):
        return str(value)
    shown = value if len(value) <= 200 else value[:200] + "…"  # a NOTICE, not a copy of any text given
    return "'" + shown.replace("'", "''") + "'"


def _prepared(db: Database) -> dict[str, Any]:
    """The parameters prepare_data remembered, else the defaults; checked again, as any role may edit settings."""
    recorded = db.setting(PREPARED_SETTING)
    try:
        prepared = {**PREPARED_DEFAULTS, **(json.loads(recorded) if recorded else {})}
    except (ValueError, TypeError):
        raise BadInput(f"settings key {PREPARED_SETTING} is not a JSON object: run prepare_data again") from None
    _check_params("prepare_data", {name: prepared[name] for name in PREPARED_DEFAULTS})
    return prepared


_databases: dict[tuple[str, str], Database] = {}  # per backend: one loopback engine per role, database and store
_connections: weakref.WeakSet = weakref.WeakSet()  # every connection back, for cancelling what it waits on


def _server_database(plpy, store: str) -> Database:
    """The lookalike database this backend serves, reached again over the server's unix socket.

    Same database, same role (``current_user``): libpq authentication applies
    as for any local client, and no credential is ever stored. The image store
    is the one install wrote into the routine bodies, never the settings table,
    which roles with the README's grants may edit.
    """
    socket_dir, port = _server_address()
    row = plpy.execute("SELECT current_database() AS database, current_user AS role")[0]
    url = sa.engine.URL.create("postgresql+psycopg", username=row["role"], database=row["database"],
                               query={"host": socket_dir, "port": port, "application_name": "lookalike procedure"})
    key = (url.render_as_string(hide_password=False), store)
    if key not in _databases:
        if not sa.event.contains(sa.pool.Pool, "connect", _remember_connection):
            sa.event.listen(sa.pool.Pool, "connect", _remember_connection)
        try:
            _databases[key] = Database(key[0], store)
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]  # without the URL
            raise ConfigError(f"the procedure cannot connect back to database {row['database']} as role "
                              f"{row['role']} ({reason}); the server's OS user must be able to log in as it "
                              f"over the unix socket: peer map or trust in pg_hba.conf, or ~/.pgpass") from None
    return _databases[key]


def _remember_connection(dbapi_connection, _record) -> None:
    _connections.add(dbapi_connection)


def _server_address() -> tuple[str, str]:
    """(first unix socket folder, port) of this server, from postmaster.pid.

    A backend's working directory is the data directory, where postmaster.pid
    records both (lines 5 and 4); unlike ``unix_socket_directories``, reading
    it needs no SQL privilege. No socket folder: TCP on localhost.
    """
    lines = Path("postmaster.pid").read_text().splitlines()
    return lines[4].strip() or "localhost", lines[3].strip()


def _failure(plpy, routine: str, exc: Exception) -> Exception:
    """The exception the routine body raises: ``ERROR: lookalike.<routine>: <message>``, with a SQLSTATE."""
    if isinstance(exc, plpy.SPIError) or type(exc) is plpy.Error:
        # From the server itself, e.g. "canceling statement due to user request".
        message, sqlstate = str(exc), getattr(exc, "sqlstate", None) or "XX000"
    elif (error := describe(exc)) is not None:
        message, sqlstate = str(error), error.sqlstate
    elif isinstance(exc, sa.exc.DBAPIError) and getattr(exc.orig, "sqlstate", None):
        # The server's answer on the connection back, e.g. "permission denied for table images".
        message, sqlstate = _first_line(exc), exc.orig.sqlstate
    else:
        # Not a user error: a bug, with its traceback in the server log.
        message, sqlstate = f"{type(exc).__name__}: {exc} (the traceback is in the server log)", "XX000"
        plpy.log(f"lookalike.{routine} failed:\n{''.join(traceback.format_exception(exc))}")
    error_type = type(f"lookalike.{routine}", (plpy.Error,), {"__module__": "builtins"})
    error = error_type(mask_secrets(message))
    error.sqlstate = sqlstate
    return error


class _Interrupts:
    """PostgreSQL's pending-interrupt flags, read from Python without acting on them.

    pg_cancel_backend and pg_terminate_backend only set flags; the server acts
    on them at its next check, and every plpy call checks. Acting on a terminate
    exits the process at once, and exiting while a step's worker threads are
    inside torch crashes it, which makes the server restart every session. So
    while a step runs, plpy calls hold interrupts off (as HOLD_INTERRUPTS does),
    a pending one stops the step with KeyboardInterrupt (its threads finish, it
    keeps what it committed, as on Ctrl-C), and the server acts once it is out.
    """

    def __init__(self):
        server = ctypes.CDLL(None)  # the postgres binary, which exports these for extensions
        self.flags = [ctypes.c_int.in_dll(server, name) for name in ("QueryCancelPending", "ProcDiePending")]
        self.holdoff = ctypes.c_uint32.in_dll(server, "InterruptHoldoffCount")

    def pending(self) -> bool:
        return any(flag.value for flag in self.flags)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holdoff.value += 1
        try:
            yield
        finally:
            self.holdoff.value -= 1


class _Watch:
    """While a step runs, a thread that makes a pending cancel, terminate or statement_timeout stop it.

    A step sees a pending interrupt when it writes progress (:class:`_NoticeStream`),
    at the end of a batch; one that computes or waits without writing would run
    on. So when the step has not stopped STOP_GRACE_SECONDS after the interrupt
    came, the thread raises KeyboardInterrupt once in the backend's main thread,
    at its next Python line, as Ctrl-C does in the CLI; if the step is still
    running CANCEL_GRACE_SECONDS later, it is waiting on its connections back
    (for a lock, say), and the thread cancels what they run, again every grace period.
    A step that ``noticed()`` the interrupt itself is stopping already: it gets no
    KeyboardInterrupt in the middle of keeping its work.
    """

    def __init__(self, interrupts: _Interrupts, noticed: Callable[[], bool]):
        self.interrupts, self.noticed = interrupts, noticed
        self.main = ctypes.c_ulong(threading.main_thread().ident)
        self.done = threading.Event()
        self.lock = threading.Lock()  # held while raising, so nothing is raised once done is set
        self.thread = threading.Thread(target=self._run, name="lookalike-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        # Raised but not yet delivered: dropped; the server acts on the pending interrupt itself.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(self.main, None)

    def _run(self) -> None:
        came = raised = None  # when the interrupt came; when KeyboardInterrupt was raised (or queries cancelled)
        while not self.done.wait(WATCH_SECONDS):
            if not self.interrupts.pending():
                continue
            now = time.monotonic()
            came = came or now
            if raised is None and now - came >= STOP_GRACE_SECONDS:
                with self.lock:
                    if self.done.is_set():
                        return
                    if not self.noticed():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(self.main, ctypes.py_object(KeyboardInterrupt))
                raised = now
            elif raised is not None and now - raised >= CANCEL_GRACE_SECONDS:
                for connection in list(_connections):
                    try:
                        connection.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
                    except Exception:  # closed meanwhile, or the server is going away
                        pass
                raised = time.monotonic()


def _watched(interrupts: _Interrupts, step: Callable[[], Any], noticed: Callable[[], bool] = lambda: False) -> Any:
    """``step()`` under a :class:`_Watch`; its one KeyboardInterrupt may land anywhere, even in ``stop``."""
    watch = _Watch(interrupts, noticed)
    try:
        watch.start()
        return step()
    except KeyboardInterrupt:
        _forget_databases()  # it may have landed inside a connection's work
        raise
    finally:
        try:
            watch.stop()
        except KeyboardInterrupt:
            watch.stop()
            _forget_databases()
            raise


def _forget_databases() -> None:
    for db in _databases.values():
        db.close()
    _databases.clear()


class _NoticeStream(io.TextIOBase):
    """``sys.stderr`` while a step runs in the server: what it writes reaches psql as NOTICEs.

    Only the backend's main thread may call plpy, so text from other threads
    waits for the main thread's next write. Lines (warnings, log records) go
    out as they are; a progress bar (tqdm's latest ``\\r`` state) at most every
    PROGRESS_SECONDS. Each write from the main thread is also where a pending
    cancel or terminate stops the step (:class:`_Interrupts`).
    """

    def __init__(self, plpy, interrupts: _Interrupts):
        self.plpy, self.interrupts = plpy, interrupts
        self.text = ""
        self.last_text = ""
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.stopped = False  # by a pending interrupt: nothing more is sent

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.text += text
        if threading.current_thread() is threading.main_thread():
            self.flush()
        return len(text)

    def flush(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.stopped:
            return
        if self.interrupts.pending():
            self.stopped = True
            raise KeyboardInterrupt
        self.send()

    def send(self, final: bool = False) -> None:
        """NOTICE the finished lines (all text when ``final``) and, now and then, the bar."""
        with self.lock:
            *lines, self.text = (self.text + "\n" if final else self.text).split("\n")
            bar = self.text.rsplit("\r", 1)[-1].strip()
        with self.interrupts.held():
            for line in lines:
                self._notice(_without_bar(line.rsplit("\r", 1)[-1]))
            if bar and time.monotonic() - self.last_progress >= PROGRESS_SECONDS:
                self._notice(_without_bar(bar))
                self.last_progress = time.monotonic()

    def _notice(self, text: str) -> None:
        if text and text != self.last_text:  # a bar's last state is shown once, not again as it closes
            self.plpy.notice(text)
            self.last_text = text


def _without_bar(text: str) -> str:
    """tqdm's status text without its bar glyphs: ``load: 40% 12/30 [00:03<00:04, 3.1img/s]``."""
    return re.sub(r"\|[^|]*\|", " ", text).strip()


class _NoticeHandler(logging.Handler):
    """lookalike's log records (INFO and up) into the NOTICE stream; its errors are not swallowed."""

    def __init__(self, stream: _NoticeStream):
        super().__init__(logging.INFO)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")


class _notices:
    """While a step runs: stderr and lookalike's log records become NOTICEs (see :class:`_NoticeStream`)."""

    def __init__(self, plpy, interrupts: _Interrupts):
        self.stream = _NoticeStream(plpy, interrupts)
        self.handler = _NoticeHandler(self.stream)
        self.logger = logging.getLogger("lookalike")

    def __enter__(self) -> _NoticeStream:
        self.saved = sys.stderr, self.logger.level
        sys.stderr = self.stream
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self.stream

    def __exit__(self, *exc_info) -> None:
        sys.stderr, level = self.saved
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(level)
        if exc_info[0] is None and not self.stream.stopped:
            self.stream.send(final=True)  # what threads left, and a last unfinished line
