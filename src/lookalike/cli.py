"""The `lookalike` command: one sub-command per pipeline step, each a thin call of the step's function."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from . import __version__
from .config import mask_secrets
from .errors import EXIT_BROKEN_PIPE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER_ERROR, describe
from .store import DEFAULT_GRACE_S, StoreError
from .steps import REQUIRED, RUN_STEPS, STEPS, Param, procedures_sql, run_params

log = logging.getLogger("lookalike")


def _open_db(args):
    from .db import Database  # lazy: a cold --help loads no step
    return Database(args.db, args.store)


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def cmd_samples(args) -> int:
    from .samples import render_samples, samples_contact_sheet  # lazy: a cold --help loads no step
    result = render_samples(**_kwargs(args, "samples"), progress=_progress(args))
    print(f"rendered {result.images} images ({result.copies} near-copies) into {result.root}")
    print("  " + ", ".join(f"{label}: {n}" for label, n in result.per_label.items()))
    print(f"  manifest: {result.manifest}\n  ground truth: {result.ground_truth}")
    if args.sheet:
        samples_contact_sheet(result.root, args.sheet)
        print(f"  contact sheet: {args.sheet}")
    return 0


def cmd_load(args) -> int:
    from .db import committed_since, describe_db_error, now  # lazy: a cold --help loads no step
    from .ingest import load_images  # lazy: a cold --help loads no step
    from .net import FetchLimits  # lazy: a cold --help loads no step
    limits = FetchLimits(max_bytes=args.max_bytes, timeout=args.timeout, deadline=args.deadline,
                         retries=args.retries)
    with _open_db(args) as db:
        started = now()
        try:
            summary = load_images(db, **_kwargs(args, "load"), limits=limits, progress=_progress(args))
        except (StoreError, DBAPIError) as exc:   # disk full, read-only: say what the load kept
            reason = str(exc) if isinstance(exc, StoreError) else describe_db_error(exc)
            print(f"error: {mask_secrets(reason)}; kept {committed_since(db, started)}; "
                  "fix that and run the same command to finish", file=sys.stderr)
            return 2
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_status(args) -> int:
    from .status import collection_status  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(collection_status(db).lines()))
    return 0


def cmd_hash(args) -> int:
    from .hashing import hash_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = hash_images(db, **_kwargs(args, "hash"), progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_dedupe(args) -> int:
    from .dedupe import dedupe_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = dedupe_images(db, **_kwargs(args, "dedupe"), progress=_progress(args))
        print("\n".join(summary.lines()))
        if args.html:
            _duplicates_html(db, args.html)
    return 0


def _duplicates_html(db, path: Path) -> None:
    from .reports import duplicate_groups_report, write_html  # lazy: a cold --help loads no step
    write_html(duplicate_groups_report(db), path, db)
    print(f"report: {path}")


def cmd_duplicates(args) -> int:
    from .reports import duplicate_groups_report  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        groups = duplicate_groups_report(db, args.run)
        if not groups:
            print("no duplicate groups (run `lookalike dedupe` first)")
        for group in groups:
            print(f"group {group.group_id} ({len(group.members)} images)")
            for m in group.members:
                mark = "keep" if m.is_keeper else f"d={m.distance}"
                print(f"  {mark:>6}  {m.image_id:>7}  {m.label or '':<12} {m.width}x{m.height} "
                      f"{m.byte_size:>9} B  {m.format or '':<5} {m.source}")
        if args.html:
            _duplicates_html(db, args.html)
    return 0


def cmd_uniques(args) -> int:
    from .dedupe import unique_counts  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        table = unique_counts(db, **_kwargs(args, "uniques"))
    print("\n".join(table.lines()))
    if args.plot:
        from .reports import plot_unique_counts  # lazy: a cold --help loads no step
        plot_unique_counts(table, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_is_duplicate(args) -> int:
    from .dedupe import is_duplicate  # lazy: a cold --help loads no step
    from .net import FetchLimits  # lazy: a cold --help loads no step
    from .search import query_bytes  # lazy: a cold --help loads no step
    data = query_bytes(args.image, FetchLimits())
    with _open_db(args) as db:
        matches = is_duplicate(db, data, **_kwargs(args, "is-duplicate"))
    if not matches:
        print(f"not a duplicate: no stored image matches by the {args.rule} rule")
        return 1
    print(f"{'image':>7}  {'label':<12} {'distance':>8} {'similarity':>10}  {'decided by':<10} source")
    for m in matches:
        similarity = "" if m.similarity is None else f"{m.similarity:.3f}"
        print(f"{m.image_id:>7}  {m.label or '':<12} {m.distance:>8} {similarity:>10}  {m.verified_by:<10} {m.source}")
    print(f"duplicate: a copy of {len(matches)} stored image(s) by the {args.rule} rule")
    return 0


def cmd_export(args) -> int:
    from .export import export_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = export_images(db, **_kwargs(args, "export"), progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 1 if summary.failed else 0  # 1: some objects failed, re-run


def cmd_serve(args) -> int:
    from .web.app import serve  # lazy: a cold --help loads no step
    serve(args.db, args.store, host=args.host, port=args.port, allow_private_urls=args.allow_private_urls)
    return 0


def cmd_store_check(args) -> int:
    from .store_check import check_store  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        check = check_store(db, fix=args.fix, grace=args.grace)
    print("\n".join(check.lines()))
    return 0 if check.clean else 1


def cmd_db_install(args) -> int:
    from .plpython import install  # lazy: a cold --help loads no step
    print("\n".join(install(args.db, args.target, store_dir=args.store).lines()))
    return 0


def cmd_db_sql(args) -> int:
    print(procedures_sql(), end="")
    return 0


def cmd_db_uninstall(args) -> int:
    from .plpython import uninstall  # lazy: a cold --help loads no step
    print("\n".join(uninstall(args.db, drop_data=args.drop_data).lines()))
    return 0


def cmd_featurize(args) -> int:
    from .features import featurize_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = featurize_images(db, **_kwargs(args, "featurize"), progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_split(args) -> int:
    from .split import split_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(split_images(db, **_kwargs(args, "split")).lines()))
    return 0


def cmd_train(args) -> int:
    from .classify import train_classifier  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(train_classifier(db, **_kwargs(args, "train")).lines()))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = evaluate_model(db, **_kwargs(args, "evaluate"))
    print("\n".join(summary.lines()))
    return 0


def cmd_query(args) -> int:
    from .search import add_queries  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        ids = add_queries(db, args.images)
    print(f"{len(ids)} queries in query_images (ids {', '.join(map(str, ids))})")
    return 0


def cmd_rank(args) -> int:
    from .search import rank_queries  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(rank_queries(db, **_kwargs(args, "rank")).lines()))
    return 0


def cmd_similar(args) -> int:
    from .net import FetchLimits  # lazy: a cold --help loads no step
    from .search import query_bytes, similar_images  # lazy: a cold --help loads no step
    # A path or URL is read once: the search and the contact sheet use the same bytes.
    given = args.query
    args.query = given if given.isdigit() else query_bytes(given, FetchLimits())
    with _open_db(args) as db:
        matches = similar_images(db, **_kwargs(args, "similar"))
        if args.sheet:
            _similar_sheet(db, given, args.query, matches, args.sheet)
    if args.json:
        print(json.dumps([m.as_dict() for m in matches], indent=2))
    else:
        print(f"{'rank':>4}  {'image':>7}  {'label':<12} {'distance':>8} {'similarity':>10}  source")
        for m in matches:
            print(f"{m.rank:>4}  {m.image_id:>7}  {m.label or '':<12} {m.distance:>8.4f} {m.similarity:>10.4f}  "
                  f"{m.source}")
    if args.sheet:
        print(f"contact sheet: {args.sheet}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _similar_sheet(db, name: str, query: str | bytes, matches, path: Path) -> None:
    from .images import open_image  # lazy: a cold --help loads no step
    from .search import image_sha256  # lazy: a cold --help loads no step
    from .sheets import contact_sheet  # lazy: a cold --help loads no step
    query_data = query if isinstance(query, bytes) else db.store.get(image_sha256(db, int(query)))
    tiles = [(open_image(query_data), "query")]
    tiles += [(open_image(db.store.get(image_sha256(db, m.image_id))),
               f"{m.rank}. {m.label}\ndistance {m.distance:.3f}") for m in matches]
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(tiles, columns=6, title=f"{len(matches)} most similar to {Path(name).name}").save(path)


def cmd_run(args) -> int:
    from .pipeline import run_pipeline  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = run_pipeline(db, **{p.name: getattr(args, p.name) for p in run_params()},
                               progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def _value_type(param: Param):
    """argparse ``type`` for ``param``: parse, then the registry's bounds, as one clear line."""
    def convert(text: str):
        try:
            value = param.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{param.name} must be a number, not {text!r}") from None
        try:
            return param.check(value)
        except ValueError as exc:  # the registry's BadInput: out of bounds or choices
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _add_param(p: argparse.ArgumentParser, param: Param) -> None:
    """One registry parameter as an argument: positional when it has no default, else its flag."""
    shown = param.default[0] if isinstance(param.default, tuple) and len(param.default) == 1 else param.default
    help = param.help + ("" if shown is None or shown is False or shown is REQUIRED else f" (default: {shown})")
    if param.positional:
        p.add_argument(param.name, type=_value_type(param), help=param.help, metavar=param.metavar,
                       **({} if param.default is REQUIRED else {"nargs": "?", "default": param.default}))
    elif param.type is bool:
        p.add_argument(param.cli_flag, dest=param.name, action="store_true", help=help)
    else:
        metavar = param.metavar or (None if param.choices else param.cli_flag[2:].upper().replace("-", "_"))
        p.add_argument(param.cli_flag, dest=param.name, type=_value_type(param), default=param.default,
                       choices=param.choices, nargs=param.nargs, metavar=metavar, help=help)


def _step_parser(sub, common: argparse.ArgumentParser, name: str, func) -> argparse.ArgumentParser:
    """The sub-command of registry step ``name``, every parameter from the registry; ``func`` runs it."""
    step = STEPS[name]
    p = sub.add_parser(name, parents=[common], help=step.help)
    for param in step.params:
        _add_param(p, param)
    p.set_defaults(func=func)
    return p


def _kwargs(args, name: str) -> dict:
    """The step function's keyword arguments from the parsed ``args`` (the registry names them)."""
    return STEPS[name].kwargs(vars(args))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="database URL (default: $LOOKALIKE_DB or sqlite:///lookalike.db)")
    common.add_argument("--store", default=argparse.SUPPRESS,
                        help="image store folder (default: recorded in the database; beside a SQLite file)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")

    parser = argparse.ArgumentParser(prog="lookalike", parents=[common],
                                     description="Find look-alike and duplicate images in your SQL database.")
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _step_parser(sub, common, "samples", cmd_samples)
    p.add_argument("--sheet", type=Path, help="also save a contact sheet PNG")

    # The fetch limits are the load's FetchLimits, not parameters of the step function.
    p = _step_parser(sub, common, "load", cmd_load)
    p.add_argument("--max-bytes", type=int, default=50 * 1024 * 1024, help="size cap per image")
    p.add_argument("--timeout", type=float, default=10.0, help="connect/read timeout, seconds")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="limit per URL, seconds: connect, headers, redirects, body and retries together")
    p.add_argument("--retries", type=int, default=3, help="retries on timeouts and 5xx")

    p = sub.add_parser("status", parents=[common], help="counts per label and status")
    p.set_defaults(func=cmd_status)

    _step_parser(sub, common, "hash", cmd_hash)

    p = _step_parser(sub, common, "dedupe", cmd_dedupe)
    p.add_argument("--html", type=Path, help="also write an HTML report of the groups")

    p = sub.add_parser("duplicates", parents=[common], help="list the groups of the latest dedupe run")
    p.add_argument("--run", type=int, help="dedupe run id (default: the latest)")
    p.add_argument("--html", type=Path, help="write an HTML page with thumbnails, keeper marked")
    p.set_defaults(func=cmd_duplicates)

    p = _step_parser(sub, common, "uniques", cmd_uniques)
    p.add_argument("--plot", type=Path, help="save the table as a PNG plot")

    p = _step_parser(sub, common, "is-duplicate", cmd_is_duplicate)
    p.add_argument("image", help="a path or URL")

    _step_parser(sub, common, "featurize", cmd_featurize)
    _step_parser(sub, common, "split", cmd_split)
    _step_parser(sub, common, "train", cmd_train)
    _step_parser(sub, common, "evaluate", cmd_evaluate)

    p = sub.add_parser("query", parents=[common], help="manage query_images")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser("add", parents=[common], help="add images (ids, paths or URLs) to query_images")
    q.add_argument("images", nargs="+")
    q.set_defaults(func=cmd_query)

    _step_parser(sub, common, "rank", cmd_rank)

    p = _step_parser(sub, common, "similar", cmd_similar)
    p.add_argument("--sheet", type=Path, help="save a contact sheet PNG of the results")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("run", parents=[common], help="the whole pipeline: " + ", ".join(RUN_STEPS))
    for param in run_params():
        _add_param(p, param)
    p.set_defaults(func=cmd_run)

    _step_parser(sub, common, "export", cmd_export)

    p = sub.add_parser("serve", parents=[common], help="the web page and JSON API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let URL queries fetch from loopback and private networks")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("store", parents=[common], help="check the image store against the database")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ssub.add_parser("check", parents=[common], help="report orphan, missing, damaged and temporary files")
    s.add_argument("--fix", action="store_true", help="delete orphans and temporary files older than --grace, "
                                                     "mark rows whose bytes are missing or damaged failed")
    s.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds: younger leftovers may belong to a running load and are kept "
                        f"(default {DEFAULT_GRACE_S:g})")
    s.set_defaults(func=cmd_store_check)

    p = sub.add_parser("db", parents=[common], help="PostgreSQL: install or remove the PL/Python procedures")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("install", parents=[common], help="schema, plpython3u, packages and procedures")
    d.add_argument("--target", type=Path, help="folder the server's Python imports lookalike from "
                                               "(default /var/lib/lookalike/python3.11)")
    d.set_defaults(func=cmd_db_install)
    d = dsub.add_parser("sql", parents=[common], help="print the routines' SQL that install creates "
                                                       "(generated from the step registry)")
    d.set_defaults(func=cmd_db_sql)
    d = dsub.add_parser("uninstall", parents=[common], help="drop the procedures and remove the packages")
    d.add_argument("--drop-data", action="store_true", help="also drop schema lookalike and all its tables")
    d.set_defaults(func=cmd_db_uninstall)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("db", None), ("store", None), ("quiet", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left (`lookalike duplicates | head`): nothing went wrong here
        with contextlib.suppress(OSError, ValueError):  # and Python's exit must not flush into the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except DBAPIError as exc:
        from .db import describe_db_error  # lazy, like every step's import: keeps NumPy out of a cold --help
        print(f"error: {mask_secrets(describe_db_error(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        error = describe(exc)
        if error is None:  # a bug: its traceback, never a bare "error:"
            print(f"lookalike {__version__}: internal error, please report it with this traceback:",
                  file=sys.stderr)
            print(mask_secrets("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
            return EXIT_BUG
        print(f"error: {mask_secrets(str(error))}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
