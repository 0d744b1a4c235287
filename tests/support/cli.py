"""The `lookalike` command called in this process: main(argv), with stdout and stderr captured."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from lookalike.cli import main


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def lookalike(*argv: object) -> Result:
    """Run ``lookalike ARGV...`` in process; every argument is passed as text.

    A usage error (argparse exits with 2) comes back as its exit code, as from the shell.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return Result(code, out.getvalue(), err.getvalue())
