"""One exception root for the whole service, split by what the caller must do.

`TransientError` means "try again later" (network, timeouts, a busy dependency);
`PermanentError` means "retrying will not help" and its message is shown to the user
as the job's `error`, so it must say what to fix. The class docstring is the default
message. Vendor exceptions (psycopg2, minio, pika) are translated at the boundary with
``raise ... from err``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.tools.commands import ToolError


class CapyError(Exception):
    """Something went wrong in CapyDB Imports."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class TransientError(CapyError):
    """A dependency failed in a way that may go away on its own; the job is retried.

    `when_repeated`, if given, is what the failure means once every attempt failed the
    same way (a source refusing connections is restarting once, misconfigured if it
    never stops): the job then fails as permanent with that message. Without it, a job
    whose retries ran out fails as transient, with this error as its last.
    """

    when_repeated: str | None = None

    def __init__(self, message: str | None = None, *, when_repeated: str | None = None) -> None:
        super().__init__(message)
        if when_repeated is not None:
            self.when_repeated = when_repeated


class PermanentError(CapyError):
    """The import cannot succeed as requested; retrying will not help."""


class CommandFailed(CapyError):
    """An external command (pg_dump, pg_restore, psql) exited with an error.

    Carries the exit code and the redacted tails of its output so the job can show
    them as `last_exit_code`, `last_stdout` and `last_stderr`; `cause` is the tool's
    first real error (a stages.tools.commands.ToolError), when it printed one.
    """

    cause: ToolError | None = None

    def __init__(self, message: str, *, exit_code: int, stdout_tail: str = "", stderr_tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout_tail = stdout_tail
        self.stderr_tail = stderr_tail

    def with_message(self, message: str) -> CommandFailed:
        """The same failure (class, exit code, output) explained differently."""
        failure = type(self)(
            message, exit_code=self.exit_code, stdout_tail=self.stdout_tail, stderr_tail=self.stderr_tail
        )
        failure.cause = self.cause
        return failure


class PermanentCommandFailure(CommandFailed, PermanentError):
    """An external command failed on input that will not get better by retrying."""


class TransientCommandFailure(CommandFailed, TransientError):
    """An external command failed for a reason that may pass (connection lost, busy)."""


class CommandTimedOut(CommandFailed):
    """An external command ran past its deadline, or made no progress for too long, and
    was stopped together with every process it started."""


class PermanentCommandTimeout(CommandTimedOut, PermanentCommandFailure):
    """An external command did not finish in the time it is allowed; retrying would
    run into the same limit."""


class TransientCommandTimeout(CommandTimedOut, TransientCommandFailure):
    """An external command stalled on something outside it (the source); it is retried."""


class Cancelled(PermanentError):
    """The import was cancelled; the project's database was not changed."""


class CommandCancelled(CommandFailed, Cancelled):
    """An external command was stopped, with every process it started, because its
    import was cancelled."""


class SourceUnreachable(TransientError):
    """The source database could not be reached."""


CLUSTER_UNAVAILABLE = "the project's database cluster is unavailable; try again shortly"


class ClusterUnavailable(TransientError):
    """The project's database cluster could not be reached, or lost our session.

    Ours, not the user's: never permanent, and its message (the API's 503 body, a job's
    error) never names the cluster's internal address; operators find the cause in the
    log.
    """

    def __init__(self, message: str = CLUSTER_UNAVAILABLE) -> None:
        super().__init__(message)


class ObjectMissing(PermanentError):
    """The uploaded object does not exist in storage."""


class StorageUnavailable(TransientError):
    """Object storage could not be reached."""


class InvalidObjectKey(PermanentError):
    """The upload key is not a key this project's uploads can have."""


class ObjectTooLarge(PermanentError):
    """The uploaded dump is larger than this import allows."""


class ObjectChanged(PermanentError):
    """The uploaded object was replaced after its import had read it."""


class UnrecognizedDump(PermanentError):
    """The upload is not a pg_dump output; upload a file made by pg_dump -Fc, -Ft or plain SQL."""
