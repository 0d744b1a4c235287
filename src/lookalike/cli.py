"""The `lookalike` command: one sub-command per pipeline step, each a thin call of the step's function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from sqlalchemy.exc import DBAPIError

from .config import ConfigError, mask_secrets
from .images import ImageError
from .store import DEFAULT_GRACE_S, StoreError

log = logging.getLogger("lookalike")


def _open_db(args):
    from .db import Database
    return Database(args.db, args.store)


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def cmd_samples(args) -> int:
    from .samples import render_samples, samples_contact_sheet
    result = render_samples(args.dir, per_label=args.per_label, seed=args.seed, copy_share=args.copy_share,
                            progress=_progress(args))
    print(f"rendered {result.images} images ({result.copies} near-copies) into {result.root}")
    print("  " + ", ".join(f"{label}: {n}" for label, n in result.per_label.items()))
    print(f"  manifest: {result.manifest}\n  ground truth: {result.ground_truth}")
    if args.sheet:
        samples_contact_sheet(result.root, args.sheet)
        print(f"  contact sheet: {args.sheet}")
    return 0


def cmd_load(args) -> int:
    from .db import committed_since, describe_db_error, now
    from .ingest import FetchLimits, load_images
    limits = FetchLimits(max_bytes=args.max_bytes, timeout=args.timeout, deadline=args.deadline,
                         retries=args.retries)
    with _open_db(args) as db:
        started = now()
        try:
            summary = load_images(db, args.source, label_column=args.label_column, concurrency=args.concurrency,
                                  limits=limits, progress=_progress(args))
        except (StoreError, DBAPIError) as exc:   # disk full, read-only: say what the load kept
            reason = str(exc) if isinstance(exc, StoreError) else describe_db_error(exc)
            print(f"error: {mask_secrets(reason)}; kept {committed_since(db, started)}; "
                  "fix that and run the same command to finish", file=sys.stderr)
            return 2
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_status(args) -> int:
    from .status import collection_status
    with _open_db(args) as db:
        print("\n".join(collection_status(db).lines()))
    return 0


def cmd_hash(args) -> int:
    from .hashing import hash_images
    with _open_db(args) as db:
        summary = hash_images(db, imagehash_sizes=args.imagehash_sizes, draft=args.draft, progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_dedupe(args) -> int:
    from .dedupe import dedupe_images
    with _open_db(args) as db:
        summary = dedupe_images(db, rule=args.rule, hash_kind=args.hash, size=args.size,
                                max_distance=args.max_distance, per_label=args.per_label,
                                include_low_detail=args.include_low_detail, backbone=args.dedupe_backbone,
                                progress=_progress(args))
        print("\n".join(summary.lines()))
        if args.html:
            _duplicates_html(db, args.html)
    return 0


def _duplicates_html(db, path: Path) -> None:
    from .reports import duplicate_groups_report, write_html
    write_html(duplicate_groups_report(db), path, db)
    print(f"report: {path}")


def cmd_duplicates(args) -> int:
    from .reports import duplicate_groups_report
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
    from .dedupe import unique_counts
    with _open_db(args) as db:
        table = unique_counts(db, include_low_detail=args.include_low_detail)
    print("\n".join(table.lines()))
    if args.plot:
        from .reports import plot_unique_counts
        plot_unique_counts(table, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_is_duplicate(args) -> int:
    from .dedupe import is_duplicate
    from .ingest import FetchLimits
    from .search import query_bytes
    data = query_bytes(args.image, FetchLimits())
    with _open_db(args) as db:
        matches = is_duplicate(db, data, rule=args.rule, hash_kind=args.hash, size=args.size,
                               max_distance=args.max_distance, limit=args.top,
                               include_low_detail=args.include_low_detail, backbone=args.dedupe_backbone)
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
    from .export import export_images
    with _open_db(args) as db:
        summary = export_images(db, args.dest, name_by=args.name_by, dry_run=args.dry_run,
                                concurrency=args.concurrency, progress=_progress(args),
                                create_container=args.create_container,
                                connection_string_env=args.connection_string_env, force=args.force)
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 1 if summary.failed else 0  # 1: some objects failed, re-run


def cmd_serve(args) -> int:
    from .web.app import serve
    serve(args.db, args.store, host=args.host, port=args.port, allow_private_urls=args.allow_private_urls)
    return 0


def cmd_store_check(args) -> int:
    from .store_check import check_store
    with _open_db(args) as db:
        check = check_store(db, fix=args.fix, grace=args.grace)
    print("\n".join(check.lines()))
    return 0 if check.clean else 1


def cmd_db_install(args) -> int:
    from .plpython import install
    print("\n".join(install(args.db, args.target, store_dir=args.store).lines()))
    return 0


def cmd_db_uninstall(args) -> int:
    from .plpython import uninstall
    print("\n".join(uninstall(args.db, drop_data=args.drop_data).lines()))
    return 0


def cmd_featurize(args) -> int:
    from .features import featurize_images
    with _open_db(args) as db:
        summary = featurize_images(db, backbone=args.backbone, device=args.device, batch_size=args.batch_size,
                                   progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_split(args) -> int:
    from .split import split_images
    with _open_db(args) as db:
        print("\n".join(split_images(db, test_ratio=args.test_ratio, seed=args.seed).lines()))
    return 0


def cmd_train(args) -> int:
    from .classify import train_classifier
    with _open_db(args) as db:
        print("\n".join(train_classifier(db, feature_model=args.backbone, seed=args.seed).lines()))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model
    with _open_db(args) as db:
        summary = evaluate_model(db, queries_per_label=args.queries_per_label,
                                 negatives_per_query=args.negatives, seed=args.seed,
                                 feature_model=args.backbone, plot=args.plot)
    print("\n".join(summary.lines()))
    return 0


def cmd_query(args) -> int:
    from .search import add_queries
    with _open_db(args) as db:
        ids = add_queries(db, args.images)
    print(f"{len(ids)} queries in query_images (ids {', '.join(map(str, ids))})")
    return 0


def cmd_rank(args) -> int:
    from .search import rank_queries
    with _open_db(args) as db:
        print("\n".join(rank_queries(db, top=args.top, space=args.space, backbone=args.backbone).lines()))
    return 0


def cmd_similar(args) -> int:
    import json
    from .ingest import FetchLimits
    from .search import query_bytes, similar_images
    # A path or URL is read once: the search and the contact sheet use the same bytes.
    query = args.image if args.image.isdigit() else query_bytes(args.image, FetchLimits())
    with _open_db(args) as db:
        matches = similar_images(db, query, k=args.top, space=args.space, backbone=args.backbone,
                                 index=args.index, label=args.label)
        if args.sheet:
            _similar_sheet(db, args.image, query, matches, args.sheet)
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
    from .images import open_image
    from .search import image_sha256
    from .sheets import contact_sheet
    query_data = query if isinstance(query, bytes) else db.store.get(image_sha256(db, int(query)))
    tiles = [(open_image(query_data), "query")]
    tiles += [(open_image(db.store.get(image_sha256(db, m.image_id))),
               f"{m.rank}. {m.label}\ndistance {m.distance:.3f}") for m in matches]
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(tiles, columns=6, title=f"{len(matches)} most similar to {Path(name).name}").save(path)


def cmd_run(args) -> int:
    from .pipeline import run_pipeline
    with _open_db(args) as db:
        summary = run_pipeline(db, args.source, seed=args.seed, test_ratio=args.test_ratio, top=args.top,
                               plot=args.plot, progress=_progress(args), device=args.device,
                               backbone=args.backbone, dedupe_rule=args.rule, dedupe_hash=args.hash,
                               dedupe_size=args.size, max_distance=args.max_distance,
                               dedupe_backbone=args.dedupe_backbone)
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def _dedupe_arguments(p: argparse.ArgumentParser, rules: tuple[str, ...] | None = None) -> None:
    """The dedupe rule's options, shared by dedupe, is-duplicate and run; defaults are the step's own."""
    from .dedupe import DEFAULT_BACKBONE, DEFAULT_RULE, RULES, VERIFIED_MAX_DISTANCE
    from .hashing import KINDS
    p.add_argument("--rule", choices=rules or RULES, default=DEFAULT_RULE,
                   help=f"verified: hash and embedding candidates, each checked (default); exact: equal hashes, "
                        f"in SQL; near: within --max-distance bits (default: {DEFAULT_RULE})")
    p.add_argument("--hash", choices=KINDS, help="hash kind (default: dhash_rowcol; size 3 for exact, 8 otherwise)")
    p.add_argument("--size", type=int, help="hash size")
    p.add_argument("--max-distance", type=int,
                   help=f"near rule: radius in bits (default: 10 of 128); verified rule: candidate radius "
                        f"(default: {VERIFIED_MAX_DISTANCE})")
    p.add_argument("--dedupe-backbone", default=DEFAULT_BACKBONE,
                   help=f"verified rule: whose embeddings to compare (default: {DEFAULT_BACKBONE})")


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

    p = sub.add_parser("samples", parents=[common], help="render the sample texture set into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--per-label", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-share", type=float, default=0.10, help="share of planted near-copies")
    p.add_argument("--sheet", type=Path, help="also save a contact sheet PNG")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("load", parents=[common], help="load images from a folder tree or a manifest")
    p.add_argument("source", help="folder (one sub-folder per label) or manifest (.tsv/.csv/.txt)")
    p.add_argument("--label-column", help="manifest column holding the label (default: label)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=50 * 1024 * 1024, help="size cap per image")
    p.add_argument("--timeout", type=float, default=10.0, help="connect/read timeout, seconds")
    p.add_argument("--deadline", type=float, default=120.0,
                   help="limit per URL, seconds: connect, headers, redirects, body and retries together")
    p.add_argument("--retries", type=int, default=3, help="retries on timeouts and 5xx")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("status", parents=[common], help="counts per label and status")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("hash", parents=[common], help="perceptual hashes (dHash 1..8, a/d/p/wHash) for new images")
    p.add_argument("--imagehash-sizes", type=int, nargs="+", default=[8], metavar="N",
                   help="sizes for aHash/dHash/pHash/wHash (powers of two; default 8)")
    p.add_argument("--draft", action="store_true",
                   help="decode JPEGs at reduced scale: faster, hashes differ from the reference packages")
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("dedupe", parents=[common], help="group duplicate images (never deletes)")
    _dedupe_arguments(p)
    p.add_argument("--per-label", action="store_true", help="group only images with the same label")
    p.add_argument("--include-low-detail", action="store_true",
                   help="exact and near rules: let flat images join groups (the verified rule always checks them)")
    p.add_argument("--html", type=Path, help="also write an HTML report of the groups")
    p.set_defaults(func=cmd_dedupe)

    p = sub.add_parser("duplicates", parents=[common], help="list the groups of the latest dedupe run")
    p.add_argument("--run", type=int, help="dedupe run id (default: the latest)")
    p.add_argument("--html", type=Path, help="write an HTML page with thumbnails, keeper marked")
    p.set_defaults(func=cmd_duplicates)

    p = sub.add_parser("uniques", parents=[common], help="unique images per label at each dHash size 8..1")
    p.add_argument("--plot", type=Path, help="save the table as a PNG plot")
    p.add_argument("--include-low-detail", action="store_true")
    p.set_defaults(func=cmd_uniques)

    p = sub.add_parser("is-duplicate", parents=[common], help="is a new image a copy of a stored one?")
    p.add_argument("image", help="a path or URL")
    _dedupe_arguments(p, rules=("verified", "near"))
    p.add_argument("--top", type=int, default=10, help="most matches to list (default: 10)")
    p.add_argument("--include-low-detail", action="store_true", help="near rule: match flat images too")
    p.set_defaults(func=cmd_is_duplicate)

    p = sub.add_parser("featurize", parents=[common], help="CNN embeddings for images that have none")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("split", parents=[common], help="stratified train/test split of the unique images")
    p.add_argument("--test-ratio", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", parents=[common], help="train the classifier on the training embeddings")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="the ranking protocol: top-k accuracy, mAP, recall")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--queries-per-label", type=int, default=20)
    p.add_argument("--negatives", type=int, default=100, help="negatives per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, help="save top-k accuracy curves as a PNG")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("query", parents=[common], help="manage query_images")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser("add", parents=[common], help="add images (ids, paths or URLs) to query_images")
    q.add_argument("images", nargs="+")
    q.set_defaults(func=cmd_query)

    p = sub.add_parser("rank", parents=[common], help="top-K for every query image into ranking_results")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--space", choices=["embeddings", "scores"], default="embeddings")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("similar", parents=[common], help="the most similar stored images to an image")
    p.add_argument("image", help="a stored image id, a path or a URL")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--space", choices=["embeddings", "scores"], default="embeddings")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--label", help="only images with this label (still --top of them)")
    p.add_argument("--index", choices=["auto", "exact", "ivf"], default="auto",
                   help="vector search: exact (NumPy), ivf (FAISS, approximate), auto: ivf from 200,000 vectors")
    p.add_argument("--sheet", type=Path, help="save a contact sheet PNG of the results")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("run", parents=[common], help="the whole pipeline: load, hash, dedupe, featurize, "
                                                     "split, train, evaluate, rank")
    p.add_argument("source", nargs="?", help="folder or manifest to load first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-ratio", type=float, default=0.25)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="efficientnet-lite0 (whole image) or efficientnet-lite0-texture (centre, no colour)")
    p.add_argument("--plot", type=Path, help="save the evaluation plot")
    _dedupe_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", parents=[common],
                       help="write the unique images as Train/<label>/, Test/<label>/ with a manifest")
    p.add_argument("dest", help="a folder, or az://container/prefix (Azure Blob Storage)")
    p.add_argument("--name-by", choices=["sha256", "dhash"], default="sha256", help="file names")
    p.add_argument("--dry-run", action="store_true", help="list what would be written, write nothing")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--create-container", action="store_true", help="create the blob container if missing")
    p.add_argument("--force", action="store_true",
                   help="overwrite a manifest.csv or transferimages.txt that lookalike did not write")
    p.add_argument("--connection-string-env", default="AZURE_STORAGE_CONNECTION_STRING",
                   help="environment variable holding the storage connection string")
    p.set_defaults(func=cmd_export)

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
        return 130
    except (ConfigError, ValueError, LookupError, FileNotFoundError, ImageError, StoreError) as exc:
        print(f"error: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2
    except DBAPIError as exc:
        from .db import describe_db_error
        print(f"error: {mask_secrets(describe_db_error(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
