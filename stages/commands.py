"""One small class per external Postgres tool.

Each wrapper builds an argument list (never a shell string), passes the password
through the environment (PGPASSWORD), keeps only a bounded, redacted tail of stdout
and stderr, logs stderr as it arrives, and raises `CommandFailed` on a non-zero exit,
classified as transient or permanent by what the tool said.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from stages.errors import PermanentCommandFailure, PermanentError, TransientCommandFailure
from stages.pgurl import redact

log = logging.getLogger(__name__)

TAIL_LINES = 40

# libpq and server messages that mean "the connection, not the data, failed".
_TRANSIENT_MARKERS = (
    "could not connect to server",
    "connection to server at",
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "the database system is starting up",
    "the database system is shutting down",
    "too many connections",
    "remaining connection slots are reserved",
    "could not receive data from server",
    "could not send data to server",
    "ssl syscall error",
    "timeout expired",
    "canceling statement due to conflict with recovery",
    "deadlock detected",
)
# ...unless the server answered and refused us for a reason that will not pass.
_PERMANENT_MARKERS = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "server does not support ssl",
    "aborting because of server version mismatch",
    "unsupported version",
    "input file appears to be a text format dump",
    "not a valid archive",
    "did not find magic string",
    "could not read input file",
    "unexpected end of file",
)


def is_transient(stderr: str) -> bool:
    text = stderr.lower()
    if any(marker in text for marker in _PERMANENT_MARKERS):
        return False
    return any(marker in text for marker in _TRANSIENT_MARKERS)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout_tail: str
    stderr_tail: str


class _TailReader(threading.Thread):
    """Drains a pipe, keeping the last lines and logging each one as it comes."""

    def __init__(self, stream: IO[bytes], name: str, secrets: Sequence[str | None]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.label = name
        self.secrets = secrets
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = redact(raw.decode("utf-8", "replace").rstrip("\n"), *self.secrets)
            self.lines.append(line)
            if self.label == "stderr":
                log.info("%s", line)
        self.stream.close()

    def tail(self) -> str:
        return "\n".join(self.lines)


Observer = Callable[[CommandResult], None]


class PgCommand:
    """Runs one Postgres client program; subclasses build its argument list.

    `observer`, if given, sees the (redacted) result of every run, success or not,
    so a job can show its last command's exit code and output.
    """

    program = ""

    def __init__(self, bin_dir: str, observer: Observer | None = None) -> None:
        self.path = os.path.join(bin_dir, self.program)
        self.observer = observer

    def run(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        secrets: Sequence[str | None] = (),
        what: str = "",
    ) -> CommandResult:
        """Run and wait; raise CommandFailed (transient or permanent) on failure."""
        process = self.start(args, env=env)
        return self.wait(process, secrets=secrets, what=what)

    def start(self, args: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if not os.path.exists(self.path):
            raise PermanentError(f"{self.program} is not installed at {self.path} on this worker")
        full_env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "capy-imports", **(env or {})}
        log.info("running %s", redact(" ".join([self.program, *args])))
        return subprocess.Popen(
            [self.path, *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait(
        self,
        process: subprocess.Popen[bytes],
        *,
        secrets: Sequence[str | None] = (),
        what: str = "",
    ) -> CommandResult:
        assert process.stdout is not None and process.stderr is not None
        readers = [
            _TailReader(process.stdout, "stdout", secrets),
            _TailReader(process.stderr, "stderr", secrets),
        ]
        for reader in readers:
            reader.start()
        try:
            exit_code = process.wait()
        except BaseException:
            # An interrupt (time limit, shutdown) must not leave the tool running.
            self.abort(process)
            raise
        for reader in readers:
            reader.join()
        result = CommandResult(exit_code, readers[0].tail(), readers[1].tail())
        self._observe(result)
        if exit_code != 0:
            raise self.failure(result, what or self.program)
        return result

    def run_streaming(
        self,
        args: Sequence[str],
        consume: Callable[[IO[bytes]], None],
        *,
        env: dict[str, str] | None = None,
        secrets: Sequence[str | None] = (),
        what: str = "",
    ) -> CommandResult:
        """Run, handing stdout to `consume` as it is produced (never held whole)."""
        process = self.start(args, env=env)
        assert process.stdout is not None and process.stderr is not None
        stderr = _TailReader(process.stderr, "stderr", secrets)
        stderr.start()
        try:
            consume(process.stdout)
        except BaseException:
            self.abort(process)
            raise
        finally:
            process.stdout.close()
        exit_code = process.wait()
        stderr.join()
        result = CommandResult(exit_code, "", stderr.tail())
        self._observe(result)
        if exit_code != 0:
            raise self.failure(result, what or self.program)
        return result

    def _observe(self, result: CommandResult) -> None:
        if self.observer is not None:
            self.observer(result)

    @staticmethod
    def abort(process: subprocess.Popen[bytes]) -> None:
        """Kill a started command and release its pipes."""
        process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def failure(self, result: CommandResult, what: str) -> Exception:
        last = next(
            (line for line in reversed(result.stderr_tail.splitlines()) if "error" in line.lower()),
            result.stderr_tail.splitlines()[-1] if result.stderr_tail else "no output",
        )
        message = f"{what} failed (exit code {result.exit_code}): {last.strip()}"
        cls = TransientCommandFailure if is_transient(result.stderr_tail) else PermanentCommandFailure
        return cls(
            message,
            exit_code=result.exit_code,
            stdout_tail=result.stdout_tail,
            stderr_tail=result.stderr_tail,
        )


class PgDump(PgCommand):
    program = "pg_dump"

    def directory_args(self, conninfo: str, out_dir: str, *, jobs: int, snapshot: str | None) -> list[str]:
        """Parallel directory-format dump of everything, owners and grants included."""
        args = ["--format=directory", f"--jobs={max(1, jobs)}", f"--file={out_dir}", "--no-password"]
        if snapshot:
            args.append(f"--snapshot={snapshot}")
        args.append(f"--dbname={conninfo}")
        return args


class PgRestore(PgCommand):
    program = "pg_restore"

    def list_args(self, archive: str) -> list[str]:
        """Read the archive's table of contents only: proves this pg_restore can read it."""
        return ["--list", "--file=/dev/null", archive]

    def restore_args(
        self, archive: str, conninfo: str, *, jobs: int, list_file: str | None = None
    ) -> list[str]:
        """Restore into an existing database without replaying owners or grants.

        `--exit-on-error` makes any failed object fail the restore: an import that
        silently skips a table is worse than one that stops and says why.
        """
        return [
            f"--dbname={conninfo}",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            f"--jobs={max(1, jobs)}",
            "--no-password",
            *([f"--use-list={list_file}"] if list_file else []),
            archive,
        ]


class Psql(PgCommand):
    program = "psql"

    def script_args(self, conninfo: str, script: str, *, restrict_key: str) -> list[str]:
        """Run a SQL file, stopping at the first error, ignoring ~/.psqlrc, with every
        backslash command of the file refused (`\\restrict` with a key the file cannot know)."""
        return [
            "--no-psqlrc",
            "--quiet",
            "--no-password",
            "--set=ON_ERROR_STOP=1",
            f"--dbname={conninfo}",
            f"--command=\\restrict {restrict_key}",
            f"--file={script}",
        ]


@dataclass(frozen=True)
class PgTools:
    """The client programs of one Postgres major version."""

    bin_dir: str
    observer: Observer | None = None

    @classmethod
    def for_major(cls, major: int, template: str, observer: Observer | None = None) -> PgTools:
        bin_dir = template.format(major=major)
        if not os.path.isdir(bin_dir):
            raise PermanentError(
                f"this worker has no PostgreSQL {major} client tools (looked in {bin_dir}); "
                f"install postgresql-client-{major}"
            )
        return cls(bin_dir, observer)

    @property
    def pg_dump(self) -> PgDump:
        return PgDump(self.bin_dir, self.observer)

    @property
    def pg_restore(self) -> PgRestore:
        return PgRestore(self.bin_dir, self.observer)

    @property
    def psql(self) -> Psql:
        return Psql(self.bin_dir, self.observer)
