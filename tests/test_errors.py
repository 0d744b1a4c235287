"""One error family (lookalike.errors): each class maps to one exit code, HTTP status and SQLSTATE,
and whatever is outside it is shown as a bug: a traceback, never a bare "error:"."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import httpx
import pytest

from lookalike import errors, status
from lookalike.cli import main
from lookalike.config import ConfigError
from lookalike.db import Database
from lookalike.errors import (EXIT_BROKEN_PIPE, EXIT_BUG, BadInput, Busy, Forbidden, LookalikeError, MissingFile,
                              NotFound, Precondition, TooLarge, TooSlow, Unreachable, describe)
from lookalike.export import ExportError
from lookalike.images import ImageError, open_image
from lookalike.ingest import LoadError
from lookalike.net import FetchError, Refused
from lookalike.store import StoreError
from lookalike.web.app import create_app, running_server

FAMILY = {  # class: (exit code, HTTP status, SQLSTATE)
    BadInput: (2, 422, "22023"), NotFound: (2, 404, "P0002"), MissingFile: (2, 404, "58P01"),
    Forbidden: (2, 403, "42501"), Precondition: (2, 409, "P0002"), TooLarge: (2, 413, "54000"),
    Unreachable: (2, 502, "58030"), TooSlow: (2, 504, "57014"), Busy: (2, 503, "53000"),
    FetchError: (2, 502, "22023"), Refused: (2, 400, "22023"), StoreError: (2, 507, "58030"),
    ConfigError: (2, 422, "22023"), ImageError: (2, 422, "22023"), LoadError: (2, 422, "22023"),
    ExportError: (2, 422, "22023"),
}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_each_error_carries_its_exit_code_http_status_and_sqlstate():
    for cls, expected in FAMILY.items():
        error = cls("why")
        assert isinstance(error, LookalikeError) and error.reason == str(error) == "why"
        assert (error.exit_code, error.http_status, error.sqlstate) == expected, cls.__name__
    # Code written against the builtins keeps working.
    assert issubclass(BadInput, ValueError) and issubclass(NotFound, LookupError)
    assert issubclass(Precondition, LookupError) and issubclass(ConfigError, ValueError)


def test_os_errors_on_files_the_user_named_are_user_errors_and_anything_else_a_bug():
    assert isinstance(describe(FileNotFoundError(2, "No such file")), MissingFile)
    assert isinstance(describe(PermissionError(13, "Permission denied")), Forbidden)
    error = NotFound("no image with id 3")
    assert describe(error) is error
    for bug in (ValueError("x"), LookupError("x"), KeyError("x"), TypeError("x"), ZeroDivisionError()):
        assert describe(bug) is None


def test_an_image_that_cannot_be_decoded_is_a_user_error():
    with pytest.raises(BadInput, match="^undecodable image|^not an image|^unsupported"):
        open_image(b"this is text, not an image" * 4)


def test_cli_user_errors_exit_2_with_one_line(tmp_path):
    db = f"sqlite:///{tmp_path}/e.db"
    code, out, err = run("load", str(tmp_path / "nowhere"), "--db", db)
    assert (code, out) == (2, "") and err.startswith("error: ") and "no such folder or manifest" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run("similar", "1", "--db", db)          # nothing loaded yet
    assert code == 2 and err == "error: no such image 1\n"
    code, _, err = run("status", "--db", "mysql://user:hunter2@localhost/x")
    assert code == 2 and "unsupported database" in err and "hunter2" not in err


def test_cli_shows_a_bug_as_a_bug(tmp_path, monkeypatch):
    def broken(db):
        return {}["no such key"]  # a real KeyError, as a bug in a step would raise
    monkeypatch.setattr(status, "collection_status", broken)
    Database(f"sqlite:///{tmp_path}/b.db").close()   # status opens only a database that exists
    code, out, err = run("status", "--db", f"sqlite:///{tmp_path}/b.db")
    assert code == EXIT_BUG == 70 and out == ""
    assert "internal error" in err and "Traceback (most recent call last)" in err and "KeyError" in err
    assert not err.startswith("error:")


@pytest.mark.timeout(120)
def test_the_web_app_answers_a_family_error_with_its_status(tmp_path):
    with Database(f"sqlite:///{tmp_path}/w.db", tmp_path / "store") as db:
        app = create_app(db, warm=False)

        def raises(kind: str):
            raise {"missing": NotFound("no such thing"), "early": Precondition("run `lookalike featurize` first"),
                   "slow": TooSlow("too slow"), "bug": ZeroDivisionError("oops")}[kind]
        app.add_api_route("/raise/{kind}", raises)
        with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as http:
            answers = {kind: http.get(f"/raise/{kind}") for kind in ("missing", "early", "slow", "bug")}
    assert {kind: r.status_code for kind, r in answers.items()} == {
        "missing": 404, "early": 409, "slow": 504, "bug": 500}
    assert answers["missing"].json() == {"error": "no such thing"}
    assert answers["bug"].json() == {"error": "internal server error"}  # never the bug's own text


def test_errors_module_imports_nothing_of_lookalike():
    source = open(errors.__file__).read()
    assert "import" not in source.replace("from __future__ import annotations", "")


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path, monkeypatch):
    # Probe: `lookalike uniques | head -2` printed "internal error" and a BrokenPipeError traceback.
    Database(f"sqlite:///{tmp_path}/p.db").close()   # status opens only a database that exists
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    stdout = io.TextIOWrapper(os.fdopen(write_end, "wb"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["status", "--db", f"sqlite:///{tmp_path}/p.db"])
    stdout.close()  # the pipe's descriptor now points at /dev/null: nothing left to fail
    assert (code, err.getvalue()) == (EXIT_BROKEN_PIPE, "")
