"""The step registry is the one declaration: every front end exposes what it says.

Walks :data:`lookalike.steps.STEPS` and checks the Python API (each step
function's signature), the CLI (the real argparse parser, parsing real command
lines), ``lookalike run`` and :func:`run_pipeline`, the PL/Python routines (created
from the generated SQL on the throwaway PostgreSQL, read back from pg_proc), the
web app's query parameters, and the README's tables.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from lookalike.cli import build_parser
from lookalike.db import Database
from lookalike.errors import BadInput
from lookalike.pipeline import run_pipeline
from lookalike.steps import (PREPARED_DEFAULTS, REQUIRED, ROUTINES, RUN_STEPS, STEPS, procedures_sql, routine,
                             run_params)

README = Path(__file__).resolve().parents[1] / "README.md"
# What a positional argument is given when a test parses a command line (the step is never run).
POSITIONAL = {"out_dir": "d", "source": "s", "query": "1", "dest": "d"}
# CLI arguments that are the front end's own, not the step function's (output, display).
CLI_ONLY = {"samples": {"sheet"}, "load": {"max_bytes", "timeout", "deadline", "retries"}, "dedupe": {"html"},
            "uniques": {"plot"}, "is-duplicate": {"image"}, "similar": {"sheet", "json"},
            "duplicates": {"html", "json", "csv", "action"}, "inspect": {"json", "csv"},
            "evaluate": {"json"}}


def function_of(step):
    module, name = step.function.rsplit(".", 1)
    return getattr(importlib.import_module(f"lookalike.{module}"), name)


def subparser(name: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions[0]
    return actions.choices[name]


def arguments(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "db", "store", "quiet", "func")}


def base_command(name: str) -> list[str]:
    params = run_params() if name == "run" else STEPS[name].params
    extra = ["x.jpg"] if name == "is-duplicate" else []
    return [name] + [POSITIONAL[p.name] for p in params if p.default is REQUIRED] + extra


def out_of_bounds(param) -> list[str]:
    low, high = param.bounds
    if param.type is float:
        return [str(low - 0.5 if not param.open else low), str(high + 0.5 if not param.open else high)]
    return [str(low - 1), str(high + 1)]


@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_function_takes_the_registry_defaults(name):
    step = STEPS[name]
    signature = inspect.signature(function_of(step)).parameters
    for param in step.params:
        assert param.name in signature, f"{step.function} has no parameter {param.name}"
        found = signature[param.name].default
        if param.default is REQUIRED:
            assert found is inspect.Parameter.empty, f"{step.function}({param.name}) should have no default"
        else:
            assert found == param.default, f"{step.function}({param.name}={found!r}), registry: {param.default!r}"


@pytest.mark.parametrize("name", sorted(STEPS))
def test_cli_exposes_every_parameter_with_its_default_and_bounds(name):
    parser = subparser(name)
    step = STEPS[name]
    found = arguments(parser)
    assert set(found) - CLI_ONLY.get(name, set()) == {p.name for p in step.params}
    parsed = vars(parser.parse_args(base_command(name)[1:]))
    for param in step.params:
        action = found[param.name]
        if param.default is REQUIRED:
            assert not action.option_strings
            continue
        assert action.option_strings == [param.cli_flag]
        assert parsed[param.name] == param.default
        if param.choices:
            assert tuple(action.choices) == param.choices
        if param.bounds:
            low, high = param.bounds
            inside = [str((low + high) / 2)] if param.open else [str(low), str(high)]
            if param.type is int:
                inside = [str(low), str(int(high))]
            for value in inside:
                assert parser.parse_args(base_command(name)[1:] + [param.cli_flag, value])
            for value in out_of_bounds(param):
                with pytest.raises(SystemExit):
                    parser.parse_args(base_command(name)[1:] + [param.cli_flag, value])


def test_the_cli_passes_what_it_parsed_to_the_step():
    args = build_parser().parse_args(["dedupe", "--rule", "near", "--hash", "phash", "--size", "8",
                                      "--max-distance", "4", "--dedupe-backbone", "b", "--per-label"])
    assert STEPS["dedupe"].kwargs(vars(args)) == {"rule": "near", "hash_kind": "phash", "size": 8,
                                                  "max_distance": 4, "backbone": "b", "per_label": True,
                                                  "include_low_detail": False}


def test_run_takes_every_option_of_its_steps():
    params = {p.name: p for p in run_params()}
    # Every parameter of every step the run runs is one of its options, by its run name.
    for name in RUN_STEPS:
        for param in STEPS[name].params:
            if param.run_name == "source":
                continue  # optional in the run: nothing is loaded without it
            shared = params[param.run_name]
            assert (shared.type, shared.default, shared.bounds, shared.choices, shared.cli_flag) == \
                   (param.type, param.default, param.bounds, param.choices, param.cli_flag), \
                   f"{name}.{param.name} disagrees with the run option {param.run_name}"
    # The Python API: run_pipeline's signature is exactly these, with these defaults.
    signature = inspect.signature(run_pipeline).parameters
    assert set(signature) - {"db", "progress"} == set(params)
    for name, param in params.items():
        assert signature[name].default == param.default
    # The CLI: `lookalike run` has the same options, defaults and flags.
    found = arguments(subparser("run"))
    assert set(found) == set(params)
    parsed = vars(subparser("run").parse_args([]))
    for name, param in params.items():
        assert parsed[name] == param.default
        if param.default is not REQUIRED and not param.positional:
            assert found[name].option_strings == [param.cli_flag]
    # The legacy spellings still parse to the run names.
    args = build_parser().parse_args(["run", "--rule", "near", "--size", "6", "--negatives", "7", "--top", "3"])
    assert (args.dedupe_rule, args.dedupe_size, args.negatives_per_query, args.top) == ("near", 6, 7, 3)


def test_run_pipeline_refuses_unknown_and_out_of_bounds_options_before_any_step(tmp_path):
    with Database(f"sqlite:///{tmp_path}/t.db", tmp_path / "store") as db:
        with pytest.raises(TypeError, match="dedupe_ruel"):
            run_pipeline(db, dedupe_ruel="near")
        with pytest.raises(BadInput, match=r"test_ratio must be between 0 and 1 \(exclusive\), not 2"):
            run_pipeline(db, test_ratio=2)
        with pytest.raises(BadInput, match="dedupe_rule must be one of verified, exact, near"):
            run_pipeline(db, dedupe_rule="fuzzy")
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 0


SQL_TYPES = {"text": "text", "int": "integer", "float8": "double precision", "bigint": "bigint"}


def expected_arguments(r) -> str:
    """What pg_get_function_arguments shows for routine ``r``, from the registry."""
    parts = []
    for p in r.params:
        text = f"{p.name} {SQL_TYPES[p.type]}"
        default = p.spec.default
        if default is not REQUIRED:
            shown = "NULL" if default is None else f"'{default}'" if isinstance(default, str) else f"{default}"
            text += f" DEFAULT {shown}"
        parts.append(text)
    return ", ".join(parts)


def shown_arguments(text: str) -> str:
    """pg_get_function_arguments without casts and procedures' IN: ``size integer DEFAULT NULL``."""
    return re.sub(r"::[a-z ]+|\bIN ", "", text)


def test_the_routines_pg_proc_shows_are_the_registry(pg_url):
    """The generated SQL, created on the throwaway server: names, types, defaults, comments, no PUBLIC EXECUTE."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS plpython3u; CREATE SCHEMA lookalike")
            with conn.connection.cursor() as cursor:
                cursor.execute(procedures_sql("/nonexistent/python", "/nonexistent/store"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT p.oid::regprocedure::text AS signature, pg_get_function_arguments(p.oid) AS args, "
                "obj_description(p.oid, 'pg_proc') AS comment, p.proacl::text[] AS acl, p.prosrc AS body "
                "FROM pg_proc p WHERE p.pronamespace = 'lookalike'::regnamespace")).all()
    finally:
        engine.dispose()
    found = {row.signature: row for row in rows}
    assert len(found) == len(ROUTINES)
    for r in ROUTINES:
        signature = f"lookalike.{r.name}({','.join(SQL_TYPES[p.type] for p in r.params)})"
        assert signature in found, f"{signature} not among {sorted(found)}"
        row = found[signature]
        assert shown_arguments(row.args) == expected_arguments(r)
        assert row.comment == r.comment
        assert not any(entry.startswith("=") for entry in row.acl or []), f"{signature}: PUBLIC may execute"
        assert row.body.count("sys.path.insert(0, \"/nonexistent/python\")") == 1


def test_routines_check_the_registry_bounds():
    with pytest.raises(BadInput, match="^top_k must be between 1 and 1000, not 0$"):
        routine("rank_candidates").check({"top_k": 0})
    with pytest.raises(BadInput, match="^k must be between 1 and 1000, not 1001$"):
        routine("similar_images").check({"k": 1001, "query": "x"})
    with pytest.raises(BadInput, match=r"^test_ratio must be between 0 and 1 \(exclusive\), not 1.0$"):
        routine("prepare_data").check({"test_ratio": 1.0})
    with pytest.raises(BadInput, match="^batch_size must not be NULL$"):
        routine("featurize_images").check({"backbone": "x", "batch_size": None})
    routine("dedupe").check({"rule": "near", "hash": None, "size": None, "max_distance": None})  # NULL: defaults
    assert PREPARED_DEFAULTS == {"test_ratio": STEPS["split"].param("test_ratio").default,
                                 "queries_per_label": STEPS["evaluate"].param("queries_per_label").default,
                                 "negatives_per_query": STEPS["evaluate"].param("negatives_per_query").default}


def test_the_web_query_parameters_are_the_registry():
    from lookalike.web.app import KParam, SimilarRequest
    k = STEPS["similar"].param("k")
    schema = SimilarRequest.model_json_schema()["properties"]
    assert (schema["k"]["default"], schema["k"]["minimum"], schema["k"]["maximum"]) == (k.default, *k.bounds)
    assert schema["space"]["default"] == STEPS["similar"].param("space").default
    limits = {type(m).__name__: m for m in KParam.__metadata__[0].metadata}
    assert (limits["Ge"].ge, limits["Le"].le) == k.bounds


def readme_rows(heading: str) -> list[list[str]]:
    text = README.read_text()
    section = text[text.index(heading):]
    table = re.search(r"((?:^\|.*\|\n)+)", section, re.M).group(1)
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_readme_step_table_names_each_step_and_its_function():
    rows = readme_rows("## The workflow, step by step")
    for name, step in STEPS.items():
        command = f"lookalike {name}"
        row = next((r for r in rows if re.search(rf"`{re.escape(command)}\b|/ `?{re.escape(name)}\b", r[0])), None)
        assert row is not None, f"README's step table has no row for `{command}`"
        module, function = step.function.rsplit(".", 1)
        assert f"{module}.{function}" in row[1] or (module in row[1] and function in row[1]), \
            f"README row for {name} names {row[1]}, the registry {step.function}"


def test_readme_routine_table_is_the_generated_signatures():
    rows = readme_rows("| routine | what it does |")
    shown = {re.sub(r"^(CALL|SELECT \* FROM) ", "", r[0].strip("`")) for r in rows}
    for r in ROUTINES:
        params = ", ".join(f"{p.name} {p.type}" + ("" if p.spec.default is REQUIRED else " DEFAULT " + (
            "NULL" if p.spec.default is None else f"'{p.spec.default}'" if isinstance(p.spec.default, str)
            else str(p.spec.default))) for p in r.params)
        assert f"lookalike.{r.name}({params})" in shown, f"README shows another signature for {r.name}"
