"""The CLI's rough edges (issue 14, part 5), each as a user meets it, in process on real databases."""

from __future__ import annotations

import argparse
import json
import socket

import pytest
import sqlalchemy as sa

from lookalike.cli import build_parser
from lookalike.db import runs
from support.cli import lookalike

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A small rendered set, run end to end (near rule), so a classifier's scores exist."""
    root = tmp_path_factory.mktemp("rough_edges")
    assert lookalike("samples", root / "samples", "--per-label", 4, "--seed", 5).code == 0
    db = ["--db", f"sqlite:///{root}/r.db"]
    done = lookalike("run", root / "samples", "--rule", "near", "--queries-per-label", 1, "--negatives", 5,
                     "--cv-folds", 2, *db)
    assert done.code == 0, done.err
    return root, db


def test_a_mistyped_db_is_refused_and_nothing_is_created(tmp_path):
    typo = ["--db", f"sqlite:///{tmp_path}/typo/lookalke.db"]
    for command in (["status"], ["duplicates"], ["similar", "1"], ["export", tmp_path / "out"], ["hash"],
                    ["serve", "--port", 1]):
        refused = lookalike(*command, *typo)
        assert refused.code == 2, (command, refused)
        assert refused.err.startswith(f"error: no database at {tmp_path}/typo/lookalke.db: check --db"), refused.err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    created = lookalike("db", "init", *typo)
    assert created.code == 0 and created.out.startswith("database ready: sqlite:///"), created.err
    assert lookalike("status", *typo).code == 0


def test_similar_names_a_missing_image_and_an_unknown_backbone(labelled):
    _, db = labelled
    missing = lookalike("similar", 99999, *db)
    assert (missing.code, missing.err) == (2, "error: no such image 99999\n")
    unknown = lookalike("similar", 1, "--backbone", "effnet", *db)
    assert unknown.code == 2
    # (other tests may register backbones of their own in this process: they are listed after these)
    assert unknown.err.startswith("error: unknown backbone 'effnet'; available: efficientnet-lite0, "
                                  "efficientnet-lite0-dual, efficientnet-lite0-texture"), unknown.err


def test_errors_use_the_flags_and_suggest_what_was_meant(tmp_path):
    db = ["--db", f"sqlite:///{tmp_path}/e.db"]
    rule = lookalike("dedupe", "--rule", "nera", *db)
    assert rule.code == 2
    assert rule.err.splitlines()[-1] == ("lookalike dedupe: error: --rule must be one of verified, exact, near, "
                                         "not 'nera'; did you mean 'near'?")
    ratio = lookalike("split", "--test-ratio", "1.5", *db)
    assert ratio.err.splitlines()[-1] == ("lookalike split: error: --test-ratio must be between 0 and 1 "
                                          "(exclusive), not 1.5")
    top = lookalike("similar", "1", "--top", "ten", *db)
    assert top.err.splitlines()[-1] == "lookalike similar: error: --top must be a number, not 'ten'"
    command = lookalike("similr", "1", *db)
    assert command.code == 2 and command.err.splitlines()[-1].endswith("; did you mean 'similar'?")
    nothing_close = lookalike("zzzz", *db)
    assert nothing_close.code == 2 and "did you mean" not in nothing_close.err
    assert not (tmp_path / "e.db").exists()


def _parsers(parser: argparse.ArgumentParser, name: str = "lookalike"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_argument_has_help_and_every_default_is_shown():
    for name, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            default = action.default
            if action.option_strings and default not in (None, False, argparse.SUPPRESS):
                shown = default[0] if isinstance(default, tuple) and len(default) == 1 else default
                assert f"(default: {shown})" in text or "default" in action.help, \
                    f"{name} {action.option_strings[0]} does not show its default {default!r}"


def test_serve_on_a_busy_port_fails_before_saying_it_serves(tmp_path):
    db = ["--db", f"sqlite:///{tmp_path}/s.db"]
    assert lookalike("db", "init", *db).code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = lookalike("serve", "--port", port, *db)
    assert refused.code != 0 and "serving" not in refused.out
    assert refused.err.startswith(f"error: cannot serve on 127.0.0.1:{port}: "), refused.err


def test_scores_ties_are_ordered_by_id_and_explained(labelled):
    _, db = labelled
    for query in (1, 2, 3):
        found = lookalike("similar", query, "--space", "scores", "--top", 8, *db)
        assert found.code == 0, found.err
        rows = [line.split() for line in found.out.splitlines()[1:] if line[:4].strip().isdigit()]
        assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
        similarity = [r[-2] if r[-2].replace(".", "").isdigit() else r[-1] for r in rows]
        ordered = [(-float(s), int(r[1])) for s, r in zip(similarity, rows)]
        assert ordered == sorted(ordered)   # best first; equal similarity: by image id
        ties = len(similarity) - len(set(similarity))
        assert ("results tie: in the scores space" in found.out) == (ties > 0)
        again = lookalike("similar", query, "--space", "scores", "--top", 8, "--json", *db)
        assert [m["image_id"] for m in json.loads(again.out)] == [int(r[1]) for r in rows]


def test_run_prints_the_finished_steps_when_a_later_one_fails(labelled):
    _, db = labelled
    failed = lookalike("run", "--rule", "exact", "--max-distance", 3, *db)
    assert failed.code == 2
    assert [line.split("]")[0] + "]" for line in failed.out.splitlines() if line.startswith("[")] == [
        "[hash]", "[featurize]", "[index]", "[dedupe]"]
    assert "[dedupe] failed after " in failed.out and "featurize (efficientnet-lite0): 0 embedded" in failed.out
    assert failed.err == "error: the exact rule takes no maximum distance; use the near or verified rule\n"


def test_load_records_its_run(tmp_path, labelled):
    root, _ = labelled
    db = ["--db", f"sqlite:///{tmp_path}/l.db"]
    assert lookalike("load", root / "samples", *db).code == 0
    assert lookalike("load", root / "samples", *db).code == 0
    assert lookalike("load", tmp_path / "missing", *db).code == 2   # refused before it starts: no row
    with sa.create_engine(db[1]).connect() as conn:
        rows = conn.execute(sa.select(runs.c.step, runs.c.outcome, runs.c.counts).order_by(runs.c.id)).all()
    assert [(step, outcome) for step, outcome, _ in rows] == [("load", "ok"), ("load", "ok")]
    first, again = (json.loads(row.counts) for row in rows)
    assert first["loaded"] > 0 and again["loaded"] == 0
    assert again["skipped"] == first["loaded"] + first["already_present"]   # every source, none fetched again
