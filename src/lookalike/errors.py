"""The errors a user can fix, one family for every front end.

Each class carries what the CLI exits with, the HTTP status the web app answers
and the SQLSTATE a PL/Python routine raises, so the three map the same error the
same way. Anything outside the family is a bug: the CLI prints its traceback,
the web app answers 500 and logs it, a routine raises XX000 and logs it.

The classes also derive from the builtin a caller would expect (``BadInput`` is
a ``ValueError``, ``NotFound`` a ``LookupError``), so ``except ValueError`` keeps
working for code written against the builtins.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2   # every user error; 1 stays "ran, but the answer is no / some items failed"
EXIT_BUG = 70         # EX_SOFTWARE (sysexits.h): an internal error, traceback printed
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that left early


class LookalikeError(Exception):
    """Base of every error a user can fix; the message says what to fix."""

    exit_code = EXIT_USER_ERROR
    http_status = 400
    sqlstate = "22023"   # invalid_parameter_value

    def __init__(self, message: str):
        super().__init__(message)
        self.reason = message


class BadInput(LookalikeError, ValueError):
    """A value, file or setting that cannot be used as given."""

    http_status = 422


class NotFound(LookalikeError, LookupError):
    """A named thing (an image id, a model, a file) does not exist."""

    http_status = 404
    sqlstate = "P0002"   # no_data_found


class MissingFile(NotFound):
    """A file the user named is not there."""

    sqlstate = "58P01"   # undefined_file


class Forbidden(BadInput):
    """A file or object the user named may not be read or written."""

    http_status = 403
    sqlstate = "42501"   # insufficient_privilege


class Precondition(LookalikeError, LookupError):
    """An earlier step has not run yet (``run `lookalike featurize` first``), or the state forbids this."""

    http_status = 409
    sqlstate = "P0002"   # no_data_found: what it needs is not there yet (as LookupError mapped before)


class TooLarge(BadInput):
    """Input over a size cap."""

    http_status = 413
    sqlstate = "54000"   # program_limit_exceeded


class Unreachable(LookalikeError):
    """A URL or service that could not be reached or answered with an error."""

    http_status = 502
    sqlstate = "58030"   # io_error


class TooSlow(Unreachable):
    """Work that did not finish within its deadline."""

    http_status = 504
    sqlstate = "57014"   # query_canceled


class Busy(LookalikeError):
    """No capacity now; try again shortly."""

    http_status = 503
    sqlstate = "53000"   # insufficient_resources


def describe(exc: BaseException) -> LookalikeError | None:
    """``exc`` as a user error, or None when it is a bug.

    A missing or unreadable file the user named is theirs to fix, though the OS
    raised it; every other exception outside the family is a bug.
    """
    if isinstance(exc, LookalikeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return MissingFile(str(exc))
    if isinstance(exc, PermissionError):
        return Forbidden(str(exc))
    return None
