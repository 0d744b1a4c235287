"""The `lookalike` command: one sub-command per pipeline step, each a thin call of the step's function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, mask_secrets

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
    from .ingest import FetchLimits, load_images
    limits = FetchLimits(max_bytes=args.max_bytes, timeout=args.timeout, deadline=args.deadline,
                         retries=args.retries)
    with _open_db(args) as db:
        summary = load_images(db, args.source, label_column=args.label_column, concurrency=args.concurrency,
                              limits=limits, progress=_progress(args))
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def cmd_status(args) -> int:
    from .status import collection_status
    with _open_db(args) as db:
        print("\n".join(collection_status(db).lines()))
    return 0


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
    p.add_argument("--deadline", type=float, default=120.0, help="whole-download limit, seconds")
    p.add_argument("--retries", type=int, default=3, help="retries on timeouts and 5xx")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("status", parents=[common], help="counts per label and status")
    p.set_defaults(func=cmd_status)
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
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
