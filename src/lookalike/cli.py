"""The `lookalike` command: one sub-command per pipeline step, each a thin call of the step's function."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import sys
import traceback
from collections import Counter
from pathlib import Path

from . import __version__
from .config import STORE_ENV, mask_secrets, resolve_db_url
from .errors import EXIT_BROKEN_PIPE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER_ERROR, describe
from .store import DEFAULT_GRACE_S, StoreError
from .steps import (IMPORT, INDEX_ACTIONS, REQUIRED, REVIEW_ACTIONS, RUN_STEPS, SPARK_JOBS, STEPS, Param, Step,
                    procedures_sql, run_params)

log = logging.getLogger("lookalike")


def _open_db(args):
    from .db import Database  # lazy: a cold --help loads no step
    return Database(args.db, args.store)


def _refuse_missing_sqlite(url: str | None) -> None:
    """A mistyped --db must not create a new, empty database (and its folder): only load, run and
    db init create one (main checks before a command loads anything heavy)."""
    from .config import ConfigError, parse_db_url, resolve_db_url
    parsed = parse_db_url(resolve_db_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).expanduser().exists():
        raise ConfigError(f"no database at {Path(parsed.database).expanduser().absolute()}: check --db "
                          "(or $LOOKALIKE_DB); `lookalike load`, `lookalike run` or `lookalike db init` create one")


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
    from sqlalchemy.exc import DBAPIError  # lazy: a quick `similar` imports no SQLAlchemy
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
        if args.html:  # the report file first: a reader that leaves early (`| head`) must not cost it
            from .reports import duplicate_groups_report, write_html  # lazy: a cold --help loads no step
            write_html(duplicate_groups_report(db), args.html, db)
    print("\n".join(summary.lines() + ([f"report: {args.html}"] if args.html else [])))
    return 0


def cmd_duplicates(args) -> int:
    from .reports import (duplicate_groups_report, groups_csv, groups_json,  # lazy: a cold --help loads no step
                          run_groups_total, write_html)
    with _open_db(args) as db:
        groups = duplicate_groups_report(db, **_kwargs(args, "duplicates"))
        # The report file first: a reader that leaves early (`| head`) must not cost it.
        if args.html:
            write_html(groups, args.html, db)
        if args.json:
            out = [json.dumps(groups_json(db, groups, sort=args.sort, offset=args.offset,
                                          total=run_groups_total(db, args.run_id)), indent=2)]
        elif args.csv:
            out = [groups_csv(db, groups).rstrip("\n")]
        else:
            out = [] if groups else ["no duplicate groups (run `lookalike dedupe` first)"]
            for group in groups:
                out.append(f"group {group.group_id} ({len(group.members)} images)")
                for m in group.members:
                    mark = "keep" if m.is_keeper else f"d={m.distance}"
                    decided = "" if m.is_keeper and m.verified_by is None else \
                        f"{'' if m.score is None else f'{m.score:.3f} '}{m.verified_by or ''}"
                    out.append(f"  {mark:>6}  {m.image_id:>7}  {m.label or '':<12} {m.width}x{m.height} "
                               f"{m.byte_size:>9} B  {m.format or '':<5} {decided:<16} {m.source}")
    if args.html:  # on stderr when stdout is data
        print(f"report: {args.html}", file=sys.stderr if args.json or args.csv else sys.stdout, flush=True)
    print("\n".join(out))
    return 0


def cmd_review(args) -> int:
    from .review import review_group  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        outcome = review_group(db, **REVIEW_ACTIONS["review"].kwargs(vars(args)))
    print(json.dumps(outcome.as_dict(), indent=2) if args.json else "\n".join(outcome.lines()))
    return 0


def cmd_removable(args) -> int:
    from .review import removable_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        found = removable_images(db)
    # One line each: store path, tab, first source.
    _print_records(args, found, lambda: [f"{r.path}\t{r.source}" for r in found])
    print(f"{len(found)} removable images (non-keepers of the latest dedupe run); lookalike deletes nothing",
          file=sys.stderr)
    return 0


def cmd_decisions(args) -> int:
    from .review import list_decisions  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        found = list_decisions(db)
    _print_records(args, found, lambda: [
        "no review decisions yet" if not found else
        f"{'id':>5}  {'when':<25} {'by':<16} {'decision':<13} {'image':>7} {'other':>7} {'group':>7}  note"] + [
        f"{d.id:>5}  {d.decided_at:<25} {d.decided_by:<16} {d.decision:<13} {d.image_id:>7} "
        f"{d.other_id or '':>7} {d.group_id or '':>7}  {d.note or ''}" for d in found])
    return 0


def _print_records(args, records: list, lines) -> None:
    """``records`` as a JSON list with ``--json``, else the ``lines()`` a person reads."""
    print(json.dumps([r.as_dict() for r in records], indent=2) if args.json else "\n".join(lines()))


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


def cmd_inspect(args) -> int:
    import csv  # lazy, like the step imports
    import io
    from .quality import inspect_images  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = inspect_images(db, **_kwargs(args, "inspect"), progress=_progress(args))
    rows = summary.listed.rows
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif args.csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        names = list(rows[0].scores) if rows else []
        writer.writerow(["image_id", "label", "source", "width", "height", "flags", *names])
        for r in rows:
            writer.writerow([r.image_id, r.label or "", r.source, r.width, r.height, " ".join(r.flags),
                             *(r.scores[n] for n in names)])
        print(out.getvalue(), end="")
    else:
        if rows:
            print(f"{'image':>7}  {'flags':<24} {'sharp':>6} {'p99':>5} {'p01':>5} {'bits':>5} {'aspect':>6} "
                  f"{'size':>11}  source")
        for r in rows:
            s = r.scores
            print(f"{r.image_id:>7}  {','.join(r.flags):<24} {s['sharpness']:>6.3f} {s['luminance_p99']:>5.2f} "
                  f"{s['luminance_p01']:>5.2f} {s['entropy']:>5.2f} {s['aspect']:>6.2f} "
                  f"{f'{r.width}x{r.height}':>11}  {r.source}")
    # The summary on stderr when stdout is data, so that a script reads clean JSON or CSV.
    print("\n".join(summary.lines()), file=sys.stderr if args.json or args.csv else sys.stdout)
    return 130 if summary.interrupted else 0


def cmd_serve(args) -> int:
    import socket
    from .web.app import serve  # lazy: a cold --help loads no step
    # Bound and let go here, as uvicorn binds it: a busy port fails before "serving on ..." is printed.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            from .errors import Busy
            raise Busy(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
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


def cmd_db_init(args) -> int:
    with _open_db(args) as db:
        print(f"database ready: {db.masked_url} (image store {db.store.root})")
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


def cmd_fit(args) -> int:
    from .spaces import fit_spaces  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(fit_spaces(db, **_kwargs(args, "fit"), progress=_progress(args)).lines()))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        summary = evaluate_model(db, **_kwargs(args, "evaluate"))
    print(json.dumps(summary.as_json(), indent=2) if args.json else "\n".join(summary.lines()))
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


def cmd_index(args) -> int:
    from . import index  # lazy: a cold --help loads no step
    step = INDEX_ACTIONS[args.action]
    with _open_db(args) as db:
        status = getattr(index, step.function.split(".")[1])(db, **step.kwargs(vars(args)))
    print("\n".join(status.lines()))
    return 0


def cmd_spark(args) -> int:
    from importlib import import_module   # lazy: a cold --help loads neither pyspark nor a step
    step = SPARK_JOBS[args.job]
    module, function = step.function.rsplit(".", 1)
    with _open_db(args) as db:
        summary = getattr(import_module(f"lookalike.{module}"), function)(db, **step.kwargs(vars(args)))
    print("\n".join(summary.lines()))
    return 0


def cmd_import(args) -> int:
    from .importing import import_output  # lazy: a cold --help loads no step
    with _open_db(args) as db:
        print("\n".join(import_output(db, **IMPORT.kwargs(vars(args))).lines()))
    return 0


def cmd_similar(args) -> int:
    from .search import query_bytes, similar_images  # lazy: a cold --help loads no step
    # A path or URL is read once: the search and the contact sheet use the same bytes.
    given = args.query
    args.query = given if given.isdigit() else query_bytes(given)
    with _open_db(args) as db:
        if given.isdigit():
            _must_exist(db, int(given))
        matches = similar_images(db, **_kwargs(args, "similar"))
        if args.sheet:
            _similar_sheet(db, given, args.query, matches, args.sheet)
    _print_similar(args, matches)
    if args.sheet:
        print(f"contact sheet: {args.sheet}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _quick_similar(args) -> int | None:
    """``similar ID`` on a SQLite file from its current index folder, importing no SQLAlchemy
    (:func:`lookalike.quick.similar_on_sqlite`); None where it takes the long way (:func:`cmd_similar`)."""
    from .errors import BadInput
    from .steps import check
    try:
        check("similar", k=args.k)
    except BadInput:
        return None   # the long way says why
    url = resolve_db_url(args.db)
    # An explicit store is recorded by the long way; a URL with options is SQLAlchemy's to read.
    if not args.query.isdigit() or args.sheet or args.label is not None or args.exclude_duplicates \
            or args.store or os.environ.get(STORE_ENV) or not url.startswith("sqlite:///") or "?" in url:
        return None
    path = Path(url[len("sqlite:///"):]).expanduser()
    if not path.is_file():
        return None
    from .quick import similar_on_sqlite
    matches = similar_on_sqlite(path, int(args.query), args.k, space=args.space, kind=args.index,
                                backbone=args.backbone)
    if matches is None:
        return None
    _print_similar(args, matches)
    return 0


def _print_similar(args, matches) -> None:
    if args.json:
        print(json.dumps([m.as_dict() for m in matches], indent=2))
    else:
        print(f"{'rank':>4}  {'image':>7}  {'label':<12} {'distance':>8} {'similarity':>10}  source")
        for m in matches:
            print(f"{m.rank:>4}  {m.image_id:>7}  {m.label or '':<12} {m.distance:>8.4f} {m.similarity:>10.4f}  "
                  f"{m.source}")
    if matches and not args.json:
        print(f"space: {matches[0].space}" + (" (auto)" if args.space == "auto" else ""))
    shared = Counter(_tie_key(m) for m in matches)
    tied = sum(n for n in shared.values() if n > 1)
    if tied and matches[0].space == "scores":
        print(f"note: {tied} of {len(matches)} results tie: in the scores space an image is its class "
              "probabilities, so images the classifier is equally sure of are equally similar; ties are "
              "listed by image id (--space learned or embeddings tells them apart)",
              file=sys.stderr if args.json else sys.stdout)


def _tie_key(match) -> float:
    return -float(f"{match.similarity:.4f}")   # as printed: results that print the same similarity tie


def _must_exist(db, image_id: int) -> None:
    import sqlalchemy as sa  # lazy: a cold --help loads no step
    from .db import images
    from .errors import NotFound
    with db.engine.connect() as conn:
        if conn.execute(sa.select(images.c.id).where(images.c.id == image_id)).first() is None:
            raise NotFound(f"no such image {image_id}")


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


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none, or says it itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if not action.option_strings or default in (None, False, argparse.SUPPRESS) or "default" in help:
            return help
        shown = default[0] if isinstance(default, (tuple, list)) and len(default) == 1 else default
        return f"{help} (default: {str(shown).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse with shown defaults and a "did you mean" for a mistyped command or choice."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if found:
            message += _did_you_mean(found[1], re.findall(r"'([^']*)'", found[2]))
        super().error(message)


def _value_type(param: Param):
    """argparse ``type`` for ``param``: parse, then the registry's bounds, as one clear line."""
    shown = param.name if param.positional else param.cli_flag   # the user's spelling, not Python's

    def convert(text: str):
        try:
            value = param.type(text)
        except ValueError:
            raise argparse.ArgumentError(None, f"{shown} must be a number, not {text!r}") from None
        try:
            return param.check(value, shown)
        except ValueError as exc:  # the registry's BadInput: out of bounds or choices
            hint = _did_you_mean(text, param.choices) if param.choices else ""
            raise argparse.ArgumentError(None, f"{exc}{hint}") from None   # None: the message names the flag
    return convert


def _add_param(p: argparse.ArgumentParser, param: Param) -> None:
    """One registry parameter as an argument: positional when it has no default, else its flag."""
    help = param.help
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
    p = _add_step_params(sub.add_parser(name, parents=[common], help=step.help), step)
    p.set_defaults(func=func)
    return p


def _add_step_params(p: argparse.ArgumentParser, step: Step) -> argparse.ArgumentParser:
    for param in step.params:
        _add_param(p, param)
    return p


def _kwargs(args, name: str) -> dict:
    """The step function's keyword arguments from the parsed ``args`` (the registry names them)."""
    return STEPS[name].kwargs(vars(args))


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS,
                        help="database URL (default: $LOOKALIKE_DB or sqlite:///lookalike.db)")
    common.add_argument("--store", default=argparse.SUPPRESS,
                        help="image store folder (default: recorded in the database; beside a SQLite file)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars")

    parser = _Parser(prog="lookalike", parents=[common],
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

    p = _step_parser(sub, common, "duplicates", cmd_duplicates)
    p.add_argument("--html", type=Path, help="write an HTML page, thumbnails in a folder beside it, keeper marked")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON: groups, members, paths and sources")
    output.add_argument("--csv", action="store_true", help="print CSV, one row per member")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, func in (("review", cmd_review), ("removable", cmd_removable), ("decisions", cmd_decisions)):
        step = REVIEW_ACTIONS[name]
        a = actions.add_parser(name, parents=[common], help=step.help)
        for param in step.params:
            _add_param(a, param)
        a.add_argument("--json", action="store_true", help="print JSON")
        a.set_defaults(func=func)

    p = _step_parser(sub, common, "uniques", cmd_uniques)
    p.add_argument("--plot", type=Path, help="save the table as a PNG plot")

    p = _step_parser(sub, common, "is-duplicate", cmd_is_duplicate)
    p.add_argument("image", help="a path or URL")

    _step_parser(sub, common, "featurize", cmd_featurize)
    _step_parser(sub, common, "split", cmd_split)
    _step_parser(sub, common, "train", cmd_train)
    _step_parser(sub, common, "fit", cmd_fit)
    p = _step_parser(sub, common, "evaluate", cmd_evaluate)
    p.add_argument("--json", action="store_true", help="print every space's measures as JSON, the default marked")

    p = sub.add_parser("query", parents=[common], help="manage query_images")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser("add", parents=[common], help="add images (ids, paths or URLs) to query_images")
    q.add_argument("images", nargs="+", help="stored image ids, paths or URLs")
    q.set_defaults(func=cmd_query)

    _step_parser(sub, common, "rank", cmd_rank)

    p = _step_parser(sub, common, "similar", cmd_similar)
    p.add_argument("--sheet", type=Path, help="save a contact sheet PNG of the results")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("index", parents=[common], help="the vector index beside the image store: status, rebuild")
    isub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, step in INDEX_ACTIONS.items():
        _add_step_params(isub.add_parser(name, parents=[common], help=step.help), step).set_defaults(func=cmd_index)

    p = sub.add_parser("spark", parents=[common], help="hash, featurize, near-duplicates and the index on "
                       "Apache Spark (local[*] or a cluster)")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, step in SPARK_JOBS.items():
        _add_step_params(jobs.add_parser(name, parents=[common], help=step.help), step).set_defaults(func=cmd_spark)
    _add_step_params(sub.add_parser("import", parents=[common], help=IMPORT.help), IMPORT).set_defaults(func=cmd_import)

    p = sub.add_parser("run", parents=[common], help="the whole pipeline: " + ", ".join(RUN_STEPS))
    for param in run_params():
        _add_param(p, param)
    p.set_defaults(func=cmd_run)

    _step_parser(sub, common, "export", cmd_export)

    p = _step_parser(sub, common, "inspect", cmd_inspect)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the flagged images as JSON")
    output.add_argument("--csv", action="store_true", help="print the flagged images as CSV")

    p = sub.add_parser("serve", parents=[common], help="the web page and JSON API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let URL queries fetch from loopback and private networks")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("store", parents=[common], help="check the image store against the database")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ssub.add_parser("check", parents=[common], help="report orphan, missing, damaged and temporary files")
    s.add_argument("--fix", action="store_true", help="delete orphans and temporary files older than --grace, "
                                                     "mark rows whose bytes are missing or damaged failed")
    s.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                   help="seconds: younger leftovers may belong to a running load and are kept")
    s.set_defaults(func=cmd_store_check)

    p = sub.add_parser("db", parents=[common], help="create a database; PostgreSQL: install or remove the "
                                                    "PL/Python procedures")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("init", parents=[common], help="create an empty database (other commands than load "
                                                       "and run refuse a SQLite file that does not exist)")
    d.set_defaults(func=cmd_db_init)
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


# Commands that may create a database, and those that open none (or check their own URL); every
# other command refuses a SQLite file that does not exist.
CREATES_DB = {cmd_load, cmd_run, cmd_db_init}
OPENS_NO_DB = {cmd_samples, cmd_db_sql, cmd_db_install, cmd_db_uninstall}


def _print_notes(exc: BaseException) -> None:
    """What the failed command finished first (`run`'s earlier steps), as its normal output."""
    for note in getattr(exc, "__notes__", ()):
        print(mask_secrets(note))


def _database_error(exc: Exception) -> bool:
    """Whether ``exc`` is the database driver's, as SQLAlchemy wraps it (imported by whatever opened the
    database; a quick ``similar`` imports none)."""
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, errors.DBAPIError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("db", None), ("store", None), ("quiet", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.func is cmd_similar and (answered := _quick_similar(args)) is not None:
            return answered
        if args.func not in CREATES_DB | OPENS_NO_DB:
            _refuse_missing_sqlite(args.db)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader left (`lookalike duplicates | head`): nothing went wrong here
        with contextlib.suppress(OSError, ValueError):  # and Python's exit must not flush into the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if _database_error(exc):
            from .db import describe_db_error  # lazy, like every step's import: keeps NumPy out of a cold --help
            _print_notes(exc)
            print(f"error: {mask_secrets(describe_db_error(exc))}", file=sys.stderr)
            return EXIT_USER_ERROR
        error = describe(exc)
        if error is None:  # a bug: its traceback, never a bare "error:"
            print(f"lookalike {__version__}: internal error, please report it with this traceback:",
                  file=sys.stderr)
            print(mask_secrets("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
            return EXIT_BUG
        _print_notes(exc)
        print(f"error: {mask_secrets(str(error))}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
