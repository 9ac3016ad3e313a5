"""One small class per external Postgres tool, each run under a deadline.

Each wrapper builds an argument list (never a shell string), passes the password
through the environment (PGPASSWORD), keeps only a bounded, redacted tail of stdout
and stderr, logs stderr as it arrives, and raises `CommandFailed` on a non-zero exit,
classified as transient or permanent by what the tool said.

Every run has a wall-clock deadline (the earliest of the command limit, the job's
deadline and the caller's) enforced on the process itself: the tool is started in a
session of its own, and a watchdog thread stops the whole process group when the
deadline passes (SIGINT, on which the Postgres tools cancel their running query on the
server, then SIGTERM, then SIGKILL) or when a tool whose progress can be seen makes
none for the stall window. The waiting thread polls, so an interrupt (Dramatiq's time
limit, shutdown) reaches it too and stops the tool. Either way `CommandTimedOut` says
which limit was reached and what to do.

A tool also dies with the worker: it is started through `setpriv --pdeathsig KILL`,
so the kernel kills it when the worker thread that started it ends, however the worker
ends (SIGKILL, OOM killer) — see `_with_parent_death_signal`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import fcntl
import io
import logging
import multiprocessing.util
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypedDict, TypeVar

from stages.connections.pgurl import redact, tool_environment
from stages.errors import (
    CommandCancelled,
    PermanentCommandFailure,
    PermanentCommandTimeout,
    PermanentError,
    TransientCommandFailure,
    TransientCommandTimeout,
)
from stages.tools.timelimit import Deadline, Limit, seconds_text

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_SECONDS = 3 * 3600
DEFAULT_STALL_SECONDS = 600
STALL_SETTING = "CAPY_COMMAND_STALL_SECONDS"
DEFAULT_LIMIT = Limit(
    DEFAULT_COMMAND_TIMEOUT_SECONDS,
    "CAPY_COMMAND_TIMEOUT_SECONDS",
    "the dump may be damaged, or too large for one import: split it into smaller dumps, "
    "or ask the operator to raise CAPY_COMMAND_TIMEOUT_SECONDS",
)
# How often the watchdog looks, and how long each polite signal gets before the next.
POLL_SECONDS = 0.25
PROBE_SECONDS = 5.0
SIGNAL_GRACE_SECONDS = 2.0
# Server side: how often a backend checks that its client (a stopped tool) is still
# there while it runs a long query (PostgreSQL 14+, client_connection_check_interval).
CONNECTION_CHECK_MS = 10_000
SERVER_SLACK_MS = 10_000

TAIL_LINES = 40

# Set in every tool's environment to what it works for (a job): a takeover kills only
# processes that carry it, never a stranger that reused the process group id.
LABEL_VARIABLE = "CAPY_TOOL_FOR"

# util-linux's setpriv (in every Debian/Ubuntu base image, the Dockerfile's included).
SETPRIV = shutil.which("setpriv")


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """`argv` run so that the kernel SIGKILLs it when its parent dies (PR_SET_PDEATHSIG).

    Why setpriv rather than prctl in `preexec_fn`: the worker is threaded (Dramatiq's
    worker threads, heartbeats, watchdogs), and code run between fork and exec in a
    threaded process can deadlock on a lock another thread held at fork time (the
    subprocess documentation warns against preexec_fn there); setpriv calls prctl after
    exec, in a process of its own, then execs the tool, which keeps the setting (it
    survives execve of a program that is not set-user-ID). The signal fires when the
    *thread* that forked exits: tools are started by the stage's own thread, which
    waits for them, so that thread outlives every tool it starts unless the worker dies.
    A parent that dies in the instant between fork and setpriv's prctl leaves its tool
    unsignalled: then the exit hook below, or a later takeover (which kills the recorded
    process group, see pipeline.import_steps), stops it. Pipes of its own workers
    (pg_dump --jobs) close with it, and they exit.
    """
    if SETPRIV is None:
        return argv
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


# The group reaper's script: on SIGTERM (its parent-death signal) the tool's whole group
# gets SIGTERM (pg_dump's and pg_restore's parallel workers cancel their queries and
# exit), then SIGKILL; otherwise it exits once the group is empty. `wait` on a
# background `sleep` returns at once when the trapped signal arrives.
_REAPER_SCRIPT = (
    'trap "kill -TERM -$1 2>/dev/null; sleep 2; kill -KILL -$1 2>/dev/null; exit 0" TERM; '
    "while kill -0 -$1 2>/dev/null; do sleep 1 & wait $!; done"
)
REAPER_NAME = "capy-tool-reaper"


def start_group_reaper(pgid: int) -> subprocess.Popen[bytes] | None:
    """A tiny process (dash) that stops the tool's whole process group `pgid` when the
    worker thread that started them dies.

    The tool's own parent-death signal reaches only the tool: the workers pg_dump and
    pg_restore fork for `--jobs` are re-parented to init when it dies and, blocked on a
    source that stopped answering, would go on holding their sessions and writing files.
    The reaper has the parent-death signal too (SIGTERM, which it traps) and is in a
    session of its own, so stopping the tool's group does not stop it; `stop_group_reaper`
    ends it when the tool has ended."""
    if SETPRIV is None:
        return None
    return subprocess.Popen(
        [SETPRIV, "--pdeathsig", "TERM", "--", "/bin/sh", "-c", _REAPER_SCRIPT, REAPER_NAME, str(pgid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_group_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """End a reaper whose tool has ended (SIGKILL: its trap must not run)."""
    if reaper is None:
        return
    try:
        os.killpg(reaper.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    reaper.wait()


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
    "canceling statement due to lock timeout",
    "could not obtain lock on relation",
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


# Whose server a tool talks to decides how its failures are classified (`PgCommand.server`).
SOURCE = "source"  # the user's: a refused login is theirs to fix (permanent)
CLUSTER = "cluster"  # ours (the project's cluster): failing to reach it is never the user's fault
LOCAL = "local"  # no server: a file on this worker (pg_restore --list)

# libpq's words for a session that could not be opened or was lost, whatever the cause.
_CONNECTION_LOST = re.compile(
    r"connection to server .*failed|could not connect to server|"
    r"server closed the connection unexpectedly|terminating connection due to administrator command|"
    r"the database system is (starting up|shutting down|in recovery mode)|too many connections|"
    r"remaining connection slots are reserved|could not (receive|send) data (from|to) server|ssl syscall error",
    re.IGNORECASE,
)
# Where libpq names the server it tried: hidden when the server is ours.
_SERVER_ADDRESS = re.compile(r'server (at "[^"]*"(?: \([^)]*\))?, port \d+|on socket "[^"]*")')
CLUSTER_NAME = "the project's database cluster"


def hide_cluster_address(text: str) -> str:
    """`text` with libpq's naming of the server (`server at "10.0.0.5", port 5432`)
    replaced by "the project's database cluster": a user never sees our addresses."""
    return _SERVER_ADDRESS.sub(f"server ({CLUSTER_NAME})", text)


# What the tools print around the real error, which says nothing about its cause: a
# parallel run's other workers dying after the first failed, the summary of an
# --exit-on-error restore, the framing before the server's words.
_NOISE = re.compile(
    r"a worker process died unexpectedly|warning: errors ignored on restore|"
    r"error: (?:could not execute query|query failed):?\s*$|^\s*$",
    re.IGNORECASE,
)
# The server's own words: "...: ERROR:  role "x" does not exist".
_SERVER_ERROR = re.compile(r"\b(?:ERROR|FATAL|PANIC):\s+(.*\S)")
_COPY_FAILED = re.compile(r'COPY failed for table "((?:[^"]|"")+)"')
# A tool's own error (no server involved): "pg_restore: error: could not read ...".
_TOOL_ERROR = re.compile(r"^(?:pg_restore|pg_dump|pg_dumpall|psql)\S*: error: ")
# What the failing statement was, as each tool says it.
_STATEMENT = re.compile(r"^(?:\S+: detail: )?(?:Command was|Query was):\s*(.*\S)")
_DETAIL = re.compile(r"^(?:\S+: detail: )?(?:DETAIL|HINT):\s+(.*\S)")
# psql names the script and line of a failing statement: "psql:/work/x/dump.sql:12: ERROR:".
_PSQL_LOCATION = re.compile(r"^psql:(.*):(\d+): ")
ERROR_CONTEXT_LINES = 8
STATEMENT_CHARS = 300

# Causes a user can act on, with what to change (matched against the server's words).
_ADVICE = (
    (
        re.compile(r'^role "([^"]+)" does not exist'),
        "the dump names the role {0}, which the project's database does not have (roles are not "
        "imported): drop or change the policies, grants and ownership that name it in the source "
        "(or dump with --no-owner --no-privileges), then dump again",
    ),
    (
        re.compile(r'^query would be affected by row-level security policy for table "([^"]+)"'),
        "the source user cannot read every row of table {0} (row-level security): connect as the "
        "table's owner or a role with BYPASSRLS",
    ),
)


# What a tool prints of its own progress (`--verbose`, pg_log_info: "pg_restore: creating
# TABLE …", "pg_dump: reading schemas"), as against its warnings, errors, their context
# ("while PROCESSING TOC:", "from TOC entry …") and the server's notices: a line per
# object, thousands for a large schema, logged at DEBUG (logging each at INFO cost the
# worker more CPU than pg_restore spent rendering the schema). The job's tail keeps
# every line.
_PROGRESS_LINE = re.compile(
    r"^(?:pg_restore|pg_dump|pg_dumpall): (?:connecting|creating|dropping|processing|executing|disabling"
    r"|enabling|setting|implied|entering|skipping|launching|finished|transferring|reducing|restoring"
    r"|restored|saving|reading|finding|flagging|identifying|dumping|last built-in|started) "
)


def _is_error_line(line: str) -> bool:
    return bool(_SERVER_ERROR.search(line) or _TOOL_ERROR.match(line)) and not _NOISE.search(line)


@dataclass(frozen=True)
class ToolError:
    """The first real error a tool printed: the server's (or the tool's) words, the
    statement that failed, the server's DETAIL or HINT, and for psql the line of the
    script it was running."""

    text: str
    statement: str | None = None
    detail: str | None = None
    script_line: int | None = None
    line: str = ""
    # pg_restore's "COPY failed for table "t"": the rows of that table were loading.
    loading: str | None = None

    def describe(self, *, located: bool = True) -> str:
        """In the user's terms: the error, what to change for causes we know, the
        detail and the statement. psql's own naming of the script and line is kept
        (`located`) unless the caller says where in the user's file it was."""
        text = self.line.strip() if located and self.script_line is not None else self.text
        for pattern, advice in _ADVICE:
            match = pattern.match(self.text)
            if match:
                text = f"{self.text}; {advice.format(*match.groups())}"
                break
        if self.detail:
            text += f" ({self.detail})"
        if self.loading:
            text += f'; while loading the rows of table "{self.loading}"'
        if self.statement:
            statement = self.statement
            if len(statement) > STATEMENT_CHARS:
                statement = statement[:STATEMENT_CHARS] + "…"
            text += f"; the statement was: {statement}"
        return text


def first_error(stderr: str) -> ToolError | None:
    """The first real error in a tool's stderr (see _NOISE for what is skipped), with
    the lines after it that say which statement failed; None if it printed none."""
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        if not _is_error_line(line):
            continue
        server = _SERVER_ERROR.search(line)
        text = server.group(1) if server else line.strip()
        location = _PSQL_LOCATION.match(line)
        statement = detail = None
        for after in lines[index + 1 : index + 1 + ERROR_CONTEXT_LINES]:
            if _is_error_line(after):
                break
            if statement is None and (found := _STATEMENT.match(after)):
                statement = found.group(1)
            elif detail is None and (found := _DETAIL.match(after)):
                detail = found.group(1)
        copying = _COPY_FAILED.search(line)
        return ToolError(
            text,
            statement,
            detail,
            int(location.group(2)) if location else None,
            line,
            loading=copying.group(1) if copying else None,
        )
    return None


class _Output(TypedDict):
    """What a CommandFailed carries of the tool's run."""

    exit_code: int
    stdout_tail: str
    stderr_tail: str


def classify_failure(
    result: CommandResult, what: str, server: str
) -> TransientCommandFailure | PermanentCommandFailure:
    """The CommandFailed for a tool that exited non-zero, classified by whose server it
    talked to and what it said (deadlines are classified where they are enforced). Its
    message names the tool's first real error (`first_error`), its tails stay whole.

    - our cluster that could not be reached, or lost the session: transient, the
      message naming no address;
    - the user's source refusing connections: transient (it may be restarting), and
      permanent once every attempt met it (`when_repeated`);
    - otherwise what libpq or the server said (`is_transient`): a lost connection,
      a busy server, a deadlock are transient; a refused login, a missing object, a
      damaged dump are permanent.
    """
    stderr = result.stderr_tail
    last = next(
        (line for line in reversed(stderr.splitlines()) if "error" in line.lower()),
        stderr.splitlines()[-1] if stderr else "no output",
    ).strip()
    output = _Output(exit_code=result.exit_code, stdout_tail=result.stdout_tail, stderr_tail=stderr)
    if server == CLUSTER and _CONNECTION_LOST.search(stderr):
        return TransientCommandFailure(
            f"{what} failed (exit code {result.exit_code}): {CLUSTER_NAME} is unavailable; it will be retried",
            **output,
        )
    # The first real error names the cause (a parallel restore ends with "a worker
    # process died unexpectedly"); the tail stays in stderr_tail.
    cause = first_error(result.error_lines or stderr)
    message = f"{what} failed (exit code {result.exit_code}): {cause.describe() if cause else last}"
    if server == CLUSTER:
        message = hide_cluster_address(message)
    if server == SOURCE and "connection refused" in stderr.lower():
        refused = TransientCommandFailure(message, **output)
        refused.when_repeated = (
            f"the source database kept refusing connections ({last}); "
            "check the host and port and that the database is running"
        )
        return refused
    cls = TransientCommandFailure if is_transient(stderr) else PermanentCommandFailure
    failure = cls(message, **output)
    failure.cause = cause
    return failure


@dataclass(frozen=True)
class CommandResult:
    """`error_lines`: stderr from its first error line on (a few lines), kept even
    when later output pushed it out of the tail."""

    exit_code: int
    stdout_tail: str
    stderr_tail: str
    error_lines: str = ""


class _Activity:
    """When a command last showed progress (output read, files grown)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


class _TailReader(threading.Thread):
    """Drains a pipe, keeping the last lines and logging each one of stderr as it comes
    (its progress lines at DEBUG, the rest at INFO), with the tool's name (`tool` on the
    log record) and the context of the thread that started the tool (the job and stage
    it runs for, see pipeline.logs)."""

    def __init__(
        self,
        stream: IO[bytes],
        name: str,
        secrets: Sequence[str | None],
        activity: _Activity,
        tool: str | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.label = name
        self.secrets = secrets
        self.activity = activity
        self.tool = tool
        self.context = contextvars.copy_context()
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.first_error: list[str] = []

    def run(self) -> None:
        self.context.run(self._drain)

    def _drain(self) -> None:
        for raw in iter(self.stream.readline, b""):
            self.activity.touch()
            line = redact(raw.decode("utf-8", "replace").rstrip("\n"), *self.secrets)
            self.lines.append(line)
            if self.first_error and len(self.first_error) <= ERROR_CONTEXT_LINES:
                self.first_error.append(line)
            elif not self.first_error and self.label == "stderr" and _is_error_line(line):
                self.first_error.append(line)
            if self.label == "stderr":
                level = logging.DEBUG if _PROGRESS_LINE.match(line) else logging.INFO
                log.log(level, "%s", line, extra={"tool": self.tool})
        self.stream.close()

    def tail(self) -> str:
        return "\n".join(self.lines)


# What a pipe between the worker and a command streaming to it holds (Linux's default is
# 64 kB): the command runs ahead while the worker hands the last chunk on. A table's rows
# read from an uploaded archive by pg_restore and sent on to the preview: mix's documents,
# 220 MB, 1.9-2.1 s through a 64 kB pipe and 1.3-1.6 s through 1 MB, measured here.
STREAM_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux


def widen_pipe(fd: int) -> None:
    """Let the pipe at `fd` (either end) hold STREAM_PIPE_BYTES, if the system allows it
    (fs.pipe-max-size, a user's pipe pages): a pipe of the default size works too."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, STREAM_PIPE_BYTES)


class _ProgressStream(io.RawIOBase):
    """A command's stdout as handed to a consumer: every read counts as progress."""

    def __init__(self, stream: IO[bytes], activity: _Activity) -> None:
        self._stream = stream
        self._activity = activity

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # A Popen pipe, an io.BufferedReader (typeshed: IO[bytes], which has no readinto1).
        count: int = self._stream.readinto1(buffer)  # type: ignore[attr-defined]
        if count:
            self._activity.touch()
        return count

    def close(self) -> None:
        self._stream.close()
        super().close()


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> bool:
    """Send `sig` to the command's process group; False if no member is left."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_group(process: subprocess.Popen[bytes], grace: float = SIGNAL_GRACE_SECONDS) -> None:
    """Stop a command and everything it started: SIGINT (pg_dump, pg_restore and psql
    then ask the server to cancel their running query), SIGTERM, and at last SIGKILL
    for whatever is left in the group."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if not _signal_group(process, sig):
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process, signal.SIGKILL)
    process.wait()


class _Watchdog(threading.Thread):
    """Stops a command's process group at its deadline, or when a command whose
    progress can be seen shows none for `stall_seconds`. `verdict` says which."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        deadline: Deadline,
        activity: _Activity,
        *,
        stall_seconds: float | None,
        probe: Callable[[], int] | None,
    ) -> None:
        super().__init__(daemon=True, name=f"watchdog-{process.pid}")
        self.process = process
        self.deadline = deadline
        self.activity = activity
        self.stall_seconds = stall_seconds
        self.probe = probe
        self.verdict: str | None = None
        self.cancel_reason: str | None = None
        self._finished = threading.Event()

    def cancel(self, reason: str) -> None:
        """Stop the command at the next look, because its import was cancelled."""
        self.cancel_reason = reason

    def run(self) -> None:
        size = self._size()
        # Walking a dump directory of many files is not free: measure now and then.
        probe_every = min(PROBE_SECONDS, (self.stall_seconds or PROBE_SECONDS) / 4)
        probed = time.monotonic()
        while not self._finished.wait(POLL_SECONDS):
            if self.cancel_reason is not None:
                self._halt("cancelled")
                return
            # Checked even after the leader exited: something it started may hold on.
            if self.deadline.remaining() <= 0:
                self._halt("deadline")
                return
            if self.stall_seconds is None or self.process.poll() is not None:
                continue
            now = time.monotonic()
            if self.probe is not None and now - probed >= probe_every:
                probed = now
                grown = self._size()
                if grown != size:
                    size = grown
                    self.activity.touch()
            if now - self.activity.last >= self.stall_seconds:
                self._halt("stall")
                return

    def _size(self) -> int | None:
        try:
            return self.probe() if self.probe else None
        except OSError:
            return None

    def _halt(self, verdict: str) -> None:
        self.verdict = verdict
        log.warning("stopping pid %d (%s reached)", self.process.pid, verdict)
        stop_group(self.process)

    def finish(self) -> None:
        self._finished.set()
        if self is not threading.current_thread() and self.ident is not None:
            self.join()


# Commands started by this process and not yet waited for. Each runs in a session of
# its own, so nothing stops it when the worker exits with a stage still running
# (Dramatiq's shutdown timeout): the exit hook does.
_running: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()
_hooked_pid: int | None = None


def _kill_running() -> None:
    for process in list(_running):
        if process.returncode is None:
            _signal_group(process, signal.SIGKILL)


def _track(process: subprocess.Popen[bytes]) -> None:
    global _hooked_pid
    if _hooked_pid != os.getpid():
        # Runs at exit of a plain process and of a multiprocessing child (Dramatiq's
        # worker processes end with os._exit, after multiprocessing's finalizers).
        multiprocessing.util.Finalize(None, _kill_running, exitpriority=100)
        _hooked_pid = os.getpid()
    _running.add(process)


class CommandProcess(subprocess.Popen[bytes]):
    """A started command with what watches it: its deadline, readers and watchdog."""

    deadline: Deadline
    activity: _Activity
    readers: list[_TailReader]
    watchdog: _Watchdog
    reaper: subprocess.Popen[bytes] | None = None
    _pidfd: int | None = None

    def wait_briefly(self, timeout: float) -> int | None:
        """The exit code if the command ends within `timeout` seconds, else None.

        It wakes the moment the command exits (a pidfd, polled: any descriptor number),
        where `Popen.wait(timeout)` polls with sleeps of up to 50 ms: a stage that runs
        a dozen short commands lost a third of a second to those naps. Without pidfds
        (not Linux 5.3+), it falls back to `Popen.wait`."""
        if self.returncode is not None:
            self.close_pidfd()
            return self.returncode
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):
                try:
                    return self.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    return None
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return None
        self.close_pidfd()
        return self.wait()  # it has exited: at once

    def close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        self.close_pidfd()
        super().__del__()


def _run_callback(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # a connection already gone: nothing left to interrupt
        log.debug("cancel callback failed", exc_info=True)


class Cancellation:
    """The commands one stage has running, so that a cancel stops them all (and any
    started after it) within a watchdog poll: each one's process group gets SIGINT,
    SIGTERM, then SIGKILL, and its run raises CommandCancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: set[CommandProcess] = set()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when the stage is cancelled (at once if it already is): how a
        query of the stage's own, which no process kill reaches, is interrupted (e.g.
        `connection.cancel()`). Returns the function that unsubscribes it."""
        with self._lock:
            self._callbacks.append(callback)
            already = self.reason is not None
        if already:
            threading.Thread(
                target=_run_callback, args=(callback,), name="cancel-callback", daemon=True
            ).start()

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            running = list(self._processes)
            callbacks = list(self._callbacks)
        for process in running:
            process.watchdog.cancel(self.reason or reason)
        for callback in callbacks:
            # Each in a thread of its own: interrupting a session (psycopg2's cancel
            # opens a connection to the server) can block on a source that stopped
            # answering, and the caller is the heartbeat thread, which must go on.
            threading.Thread(
                target=_run_callback, args=(callback,), name="cancel-callback", daemon=True
            ).start()
        if running:
            log.warning("stopping %d command(s): %s", len(running), reason)

    def register(self, process: CommandProcess) -> None:
        with self._lock:
            self._processes.add(process)
            reason = self.reason
        if reason is not None:
            process.watchdog.cancel(reason)

    def unregister(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._processes.discard(process)


Observer = Callable[[CommandResult], None]
# Told (process group id, program path) when a tool starts, e.g. to record it on the job.
Started = Callable[[int, str], None]
_Tool = TypeVar("_Tool", bound="PgCommand")


class PgCommand:
    """Runs one Postgres client program; subclasses build its argument list.

    `observer`, if given, sees the (redacted) result of every run, success or not,
    so a job can show its last command's exit code and output. A run ends by the
    earliest of `limit` (counted from its start), `deadline` (e.g. the job's) and the
    deadline passed to the run. Tools that open sessions on the project's cluster get
    server-side timeouts too (`PGOPTIONS`).
    """

    program = ""
    # What a stall of this tool most likely means, and whether it may pass by itself.
    stall_hint = "it was stopped; the input may be damaged"
    stall_is_transient = False
    # Sessions on the project's cluster (restores) are bounded on the server side too.
    target_sessions = False
    # Whose server the tool talks to (SOURCE, CLUSTER, LOCAL): see classify_failure.
    server = LOCAL

    def __init__(
        self,
        bin_dir: str,
        observer: Observer | None = None,
        *,
        limit: Limit = DEFAULT_LIMIT,
        deadline: Deadline | None = None,
        stall_seconds: float | None = DEFAULT_STALL_SECONDS,
        major: int | None = None,
        cancellation: Cancellation | None = None,
        on_start: Started | None = None,
        label: str | None = None,
    ) -> None:
        self.path = os.path.join(bin_dir, self.program)
        self.on_start = on_start
        self.label = label
        self.observer = observer
        self.limit = limit
        self.deadline = deadline
        self.stall_seconds = stall_seconds
        self.major = major
        self.cancellation = cancellation

    def run(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        secrets: Sequence[str | None] = (),
        what: str = "",
        deadline: Deadline | None = None,
    ) -> CommandResult:
        """Run and wait; raise CommandFailed (transient or permanent) on failure, and
        CommandTimedOut when it was stopped for time."""
        process = self.start(args, env=env, secrets=secrets, what=what, deadline=deadline)
        return self.wait(process, secrets=secrets, what=what)

    def start(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        secrets: Sequence[str | None] = (),
        what: str = "",
        deadline: Deadline | None = None,
        streaming: bool = False,
    ) -> CommandProcess:
        """Start the command in a session of its own, watched until its deadline.

        Its output is drained as it comes (so a tool never blocks on a full pipe);
        with `streaming`, stdout is left for the caller to read (see run_streaming).
        """
        if not os.path.exists(self.path):
            raise PermanentError(f"{self.program} is not installed at {self.path} on this worker")
        effective = Deadline.earliest(Deadline.after(self.limit), self.deadline, deadline)
        if effective.remaining() <= 0:
            limit = effective.limit
            raise PermanentCommandTimeout(
                f"{what or self.program} could not start: the time allowed ({limit.describe()}) "
                f"is used up; {limit.advice}",
                exit_code=-1,
            )
        # No inherited PG* variable (PGSERVICE, PGHOST, PGSSLCERT…) reaches libpq.
        full_env = tool_environment({"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "capy-imports", **(env or {})})
        if self.label:
            # Inherited by everything it starts: how a later takeover recognises them.
            full_env[LABEL_VARIABLE] = self.label
        if self.target_sessions:
            # Ours first: options the caller passes (search_path…) come later and win.
            full_env["PGOPTIONS"] = " ".join(
                part for part in (self._session_options(effective), full_env.get("PGOPTIONS", "")) if part
            )
        log.info("running %s", redact(" ".join([self.program, *args])), extra={"tool": self.program})
        process = CommandProcess(
            _with_parent_death_signal([self.path, *args]),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdout is not None and process.stderr is not None
        if streaming:
            widen_pipe(process.stdout.fileno())
        process.reaper = start_group_reaper(process.pid)
        process.deadline = effective
        process.activity = _Activity()
        process.readers = (
            []
            if streaming
            else [_TailReader(process.stdout, "stdout", secrets, process.activity, self.program)]
        )
        process.readers.append(_TailReader(process.stderr, "stderr", secrets, process.activity, self.program))
        probe = self.output_probe(args)
        process.watchdog = _Watchdog(
            process,
            effective,
            process.activity,
            # Only a command whose progress can be seen can be said to have stalled:
            # a restore prints nothing while COPY loads a large table.
            stall_seconds=self.stall_seconds if streaming or probe is not None else None,
            probe=probe,
        )
        for thread in (*process.readers, process.watchdog):
            thread.start()
        _track(process)
        if self.cancellation is not None:
            self.cancellation.register(process)
        if self.on_start is not None:
            # Its own session: the pid is also the process group's id.
            self.on_start(process.pid, self.path)
        return process

    def _session_options(self, deadline: Deadline) -> str:
        """libpq `-c` options bounding the tool's sessions on the server. A dump may
        reset them (pg_dump output starts with `SET statement_timeout = 0`): they are
        a first line of defence, the process deadline is the bound."""
        # A little after the deadline: the watchdog stops the tool first and says why;
        # the server ends the statement even if the tool's cancel request is lost.
        options = {"statement_timeout": int(deadline.remaining() * 1000) + SERVER_SLACK_MS}
        if self.stall_seconds is not None:
            options["idle_in_transaction_session_timeout"] = int(self.stall_seconds * 1000)
        if self.major is not None and self.major >= 14:
            options["client_connection_check_interval"] = CONNECTION_CHECK_MS
        return " ".join(f"-c {name}={max(1, value)}" for name, value in options.items())

    def output_probe(self, args: Sequence[str]) -> Callable[[], int] | None:
        """A measure of the files the command writes, whose growth is its progress."""
        return None

    def wait(
        self,
        process: CommandProcess,
        *,
        secrets: Sequence[str | None] = (),
        what: str = "",
    ) -> CommandResult:
        """Wait for a started command; raise as `run` does. Its output is redacted with
        the secrets given to `start` (lines are logged as they come) and these."""
        return self._finish(process, what or self.program, secrets)

    def run_streaming(
        self,
        args: Sequence[str],
        consume: Callable[[IO[bytes]], None],
        *,
        env: dict[str, str] | None = None,
        secrets: Sequence[str | None] = (),
        what: str = "",
        deadline: Deadline | None = None,
        started: Callable[[CommandProcess], None] | None = None,
    ) -> CommandResult:
        """Run, handing stdout to `consume` as it is produced (never held whole);
        `started` sees the process first (to stop it from another thread: `kill`)."""
        process = self.start(args, env=env, secrets=secrets, what=what, deadline=deadline, streaming=True)
        assert process.stdout is not None
        if started is not None:
            started(process)
        stream = io.BufferedReader(_ProgressStream(process.stdout, process.activity), 1 << 16)
        try:
            consume(stream)
        except Exception:
            # Output cut short by the watchdog may not parse: then the timeout is the news.
            if process.watchdog.verdict is None:
                self.abort(process)
                raise
        except BaseException:
            self.abort(process)
            raise
        finally:
            stream.close()
        return self._finish(process, what or self.program)

    def _finish(
        self, process: CommandProcess, what: str, secrets: Sequence[str | None] = ()
    ) -> CommandResult:
        exit_code = self._wait_for_exit(process)
        process.watchdog.finish()
        _running.discard(process)
        if self.cancellation is not None:
            self.cancellation.unregister(process)
        # Whatever the tool left behind in its group would hold our pipes open.
        _signal_group(process, signal.SIGKILL)
        stop_group_reaper(process.reaper)
        for reader in process.readers:
            reader.join()
        stdout_tail = redact(process.readers[0].tail(), *secrets) if len(process.readers) == 2 else ""
        stderr_tail = redact(process.readers[-1].tail(), *secrets)
        error_lines = redact("\n".join(process.readers[-1].first_error), *secrets)
        if self.server == CLUSTER:  # the job shows these tails to its user
            stdout_tail, stderr_tail = hide_cluster_address(stdout_tail), hide_cluster_address(stderr_tail)
            error_lines = hide_cluster_address(error_lines)
        verdict = process.watchdog.verdict
        if verdict is None:
            result = CommandResult(exit_code, stdout_tail, stderr_tail, error_lines)
            self._observe(result)
            if exit_code != 0:
                raise self.failure(result, what)
            return result
        if verdict == "cancelled":
            message = f"{what} was stopped: {process.watchdog.cancel_reason}"
            stderr_tail = "\n".join(part for part in (stderr_tail, f"stopped: {message}") if part)
            self._observe(CommandResult(exit_code, stdout_tail, stderr_tail))
            raise CommandCancelled(
                message, exit_code=exit_code, stdout_tail=stdout_tail, stderr_tail=stderr_tail
            )
        cls: type[PermanentCommandTimeout | TransientCommandTimeout] = PermanentCommandTimeout
        if verdict == "stall":
            stall = seconds_text(self.stall_seconds or 0)
            message = f"{what} made no progress for {stall} s ({STALL_SETTING}); {self.stall_hint}"
            if self.stall_is_transient:
                cls = TransientCommandTimeout
        else:
            limit = process.deadline.limit
            message = f"{what} did not finish within {limit.describe()}; {limit.advice}"
        stderr_tail = "\n".join(part for part in (stderr_tail, f"stopped: {message}") if part)
        self._observe(CommandResult(exit_code, stdout_tail, stderr_tail))
        raise cls(message, exit_code=exit_code, stdout_tail=stdout_tail, stderr_tail=stderr_tail)

    def _wait_for_exit(self, process: CommandProcess) -> int:
        """Wait in short polls, so an exception raised in this thread (Dramatiq's time
        limit, a shutdown) is noticed at once; it stops the command, then propagates."""
        try:
            while (exit_code := process.wait_briefly(POLL_SECONDS)) is None:
                continue
            return exit_code
        except BaseException:
            self.abort(process)
            raise

    def _observe(self, result: CommandResult) -> None:
        if self.observer is not None:
            self.observer(result)

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """Stop a started command and what it started, from any thread: its end of
        output reaches the reader, and its run fails (or has already ended)."""
        _signal_group(process, signal.SIGKILL)

    @staticmethod
    def abort(process: subprocess.Popen[bytes]) -> None:
        """Kill a started command and everything it started, and release its pipes."""
        _signal_group(process, signal.SIGKILL)
        process.wait()
        _running.discard(process)
        if isinstance(process, CommandProcess):
            process.close_pidfd()
            stop_group_reaper(process.reaper)
            process.watchdog.finish()
            for reader in process.readers:
                reader.join(SIGNAL_GRACE_SECONDS)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def failure(self, result: CommandResult, what: str) -> Exception:
        return classify_failure(result, what, self.server)


def tree_size(path: str) -> int:
    """Bytes in a file, or in all files under a directory (0 while it does not exist)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:  # replaced while we looked
                continue
    return total


class PgDump(PgCommand):
    program = "pg_dump"
    server = SOURCE
    stall_hint = "the source may be stuck (a lock it waits for, or an overloaded server); it will be retried"
    stall_is_transient = True

    def output_probe(self, args: Sequence[str]) -> Callable[[], int] | None:
        """pg_dump prints nothing while it works: the files it writes growing is its progress."""
        out = next((arg.removeprefix("--file=") for arg in args if arg.startswith("--file=")), None)
        return None if out is None else (lambda: tree_size(out))

    def schema_args(
        self, conninfo: str, path: str, *, snapshot: str, lock_wait_ms: int, exclude_data: Sequence[str] = ()
    ) -> list[str]:
        """The schema archive of a live copy (custom format, uncompressed: it stays on
        this worker) in the exported `snapshot`: everything but the large objects and
        the rows of the tables matching `exclude_data` (pg_dump patterns), which stream
        instead. A table locked
        exclusively by another session on the source fails the dump after
        `lock_wait_ms` instead of holding it.

        In UTF8 whatever the source's encoding: the copy's sessions (and the rows they
        stream) are UTF8, and they run pg_restore's rendering of it, whose first line
        sets the archive's encoding as the client's."""
        return [
            "--format=custom",
            "--compress=0",
            "--encoding=UTF8",
            "--no-blobs",  # large objects stream instead (stages.copy.largeobjects)
            f"--file={path}",
            "--no-password",
            f"--lock-wait-timeout={lock_wait_ms}",
            f"--snapshot={snapshot}",
            *(f"--exclude-table-data={pattern}" for pattern in exclude_data),
            f"--dbname={conninfo}",
        ]


class PgRestore(PgCommand):
    program = "pg_restore"
    # What a restore leaves out (see restore_args); a rendering "as restored" too.
    AS_RESTORED = ("--no-owner", "--no-privileges", "--no-tablespaces")
    stall_hint = "the dump may be damaged or truncated; check it with pg_restore --list and upload it again"
    target_sessions = True
    # Restores go into a preview on the project's cluster; --list reads only a file.
    server = CLUSTER

    def list_args(self, archive: str) -> list[str]:
        """Read the archive's table of contents only: proves this pg_restore can read it.
        Printed to stdout, so the stall window applies (see `run_streaming`)."""
        return ["--list", "--file=-", archive]

    def restore_args(
        self, archive: str, conninfo: str, *, jobs: int, list_file: str | None = None
    ) -> list[str]:
        """Restore into an existing database without replaying owners, grants or
        tablespaces (the cluster's, not the project's: every object goes to the
        database's default tablespace).

        `--exit-on-error` makes any failed object fail the restore: an import that
        silently skips a table is worse than one that stops and says why.
        """
        return [
            f"--dbname={conninfo}",
            *self.AS_RESTORED,
            "--exit-on-error",
            f"--jobs={max(1, jobs)}",
            "--no-password",
            *([f"--use-list={list_file}"] if list_file else []),
            archive,
        ]


# Every psql run: no ~/.psqlrc, no prompt for a password, quiet (stdout holds only
# what a statement prints), and stopped by the first error.
PSQL_OPTIONS = ("--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1")


class Psql(PgCommand):
    program = "psql"
    target_sessions = True
    server = CLUSTER

    def script_args(self, conninfo: str, script: str, *, restrict_file: str) -> list[str]:
        """Run a SQL file, stopping at the first error, ignoring ~/.psqlrc, with every
        backslash command of the file refused: `restrict_file` holds `\\restrict <key>`
        with a key the file cannot know, read first in the same session (a file, not an
        argument, so the key is in no process listing or log)."""
        return [*PSQL_OPTIONS, f"--dbname={conninfo}", f"--file={restrict_file}", f"--file={script}"]


class SourcePsql(PgCommand):
    """psql on a live source: the rows of one table of the copy's snapshot, written to
    stdout by a client in C, not one Python call per row (stages.copy.stream)."""

    program = "psql"
    server = SOURCE
    stall_hint = "the source may be stuck (a lock it waits for, or an overloaded server); it will be retried"
    stall_is_transient = True

    def copy_out_args(self, conninfo: str, statements: Sequence[str]) -> list[str]:
        """Run `statements` in one session, stopping at the first error, ignoring
        ~/.psqlrc; quiet, so stdout holds nothing but what a COPY … TO STDOUT writes."""
        return [
            *PSQL_OPTIONS,
            f"--dbname={conninfo}",
            *(f"--command={statement}" for statement in statements),
        ]


@dataclass(frozen=True)
class PgTools:
    """The client programs of one Postgres major version, with what bounds their runs:
    the command `limit`, the job's `deadline` and the stall window (see PgCommand)."""

    bin_dir: str
    observer: Observer | None = None
    limit: Limit = DEFAULT_LIMIT
    deadline: Deadline | None = None
    stall_seconds: float | None = DEFAULT_STALL_SECONDS
    major: int | None = None
    cancellation: Cancellation | None = None
    on_start: Started | None = None
    label: str | None = None

    @classmethod
    def for_major(cls, major: int, template: str, observer: Observer | None = None, **bounds: Any) -> PgTools:
        """`bounds`: limit, deadline, stall_seconds, cancellation, on_start, label."""
        bin_dir = template.format(major=major)
        if not os.path.isdir(bin_dir):
            raise PermanentError(
                f"this worker has no PostgreSQL {major} client tools (looked in {bin_dir}); "
                f"install postgresql-client-{major}"
            )
        return cls(bin_dir, observer, major=major, **bounds)

    def _make(self, tool: type[_Tool]) -> _Tool:
        return tool(
            self.bin_dir,
            self.observer,
            limit=self.limit,
            deadline=self.deadline,
            stall_seconds=self.stall_seconds,
            major=self.major,
            cancellation=self.cancellation,
            on_start=self.on_start,
            label=self.label,
        )

    @property
    def pg_dump(self) -> PgDump:
        return self._make(PgDump)

    @property
    def pg_restore(self) -> PgRestore:
        return self._make(PgRestore)

    @property
    def psql(self) -> Psql:
        return self._make(Psql)

    @property
    def source_psql(self) -> SourcePsql:
        return self._make(SourcePsql)


def process_group_members(pgid: int, program: str, label: str | None = None) -> list[int]:
    """Pids of this host's processes in group `pgid` running `program` and, with
    `label`, started for it (LABEL_VARIABLE in their environment), read from /proc:
    so a reused group id is never mistaken for a tool."""
    wanted = None if label is None else f"{LABEL_VARIABLE}={label}".encode()
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) <= 2 or int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0", 1)[0].decode("utf-8", "replace")
            if argv0 not in (program, SETPRIV):
                continue
            if wanted is not None:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if wanted not in fh.read().split(b"\0"):
                        continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        members.append(int(entry))
    return members


def kill_process_group(pgid: int, program: str, label: str | None = None) -> list[int]:
    """SIGKILL the processes of a tool's group `pgid` (see process_group_members);
    returns their pids."""
    members = process_group_members(pgid, program, label)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    return members
