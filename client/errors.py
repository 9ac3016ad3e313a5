"""The client's errors and the exit code each one ends the command with."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Exit codes of `capydb-import` (documented in the README, "Client CLI")."""

    OK = 0
    FAILED = 1  # the import failed, or the preflight found a failing check
    USAGE = 2  # bad arguments (argparse uses 2 too)
    CANCELLED = 3  # the import was cancelled
    UNREACHABLE = 4  # the API (or the upload's storage) could not be reached or is down
    REFUSED = 5  # the API refused the request (400, 401, 403, 404, 409, …): its message says why
    INTERRUPTED = 130  # Ctrl-C; the import, if started, goes on on the server


class ClientError(Exception):
    """Root of the client's errors: `message` is for a person, `exit_code` for the shell."""

    exit_code = Exit.FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ClientError):
    """The command line is missing something or holds a bad value."""

    exit_code = Exit.USAGE


class ApiUnreachable(ClientError):
    """The API could not be reached, timed out, or answered that a dependency is down."""

    exit_code = Exit.UNREACHABLE


class ApiRefused(ClientError):
    """The API answered with an error the client cannot fix by retrying."""

    exit_code = Exit.REFUSED

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
