"""Every external command runs under a wall-clock deadline and a stall watchdog,
enforced on its whole process group. Real (tiny) programs, no sockets."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

from stages.errors import (
    CommandTimedOut,
    PermanentCommandTimeout,
    PermanentError,
    TransientCommandTimeout,
    TransientError,
)
from stages.tools import commands
from stages.tools.commands import (
    STREAM_PIPE_BYTES,
    CommandResult,
    Deadline,
    Limit,
    PgCommand,
    PgDump,
    PgRestore,
    PgTools,
)

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux
# Seconds a stopped command may take beyond its deadline: the watchdog's poll, the
# SIGINT and SIGTERM graces, process start-up on a busy machine.
MARGIN = 8.0


class Sleeper(PgCommand):
    program = "sleeper"


def write_program(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def gone(pid: int, wait: float = 3.0) -> bool:
    """The process no longer exists (a zombie waiting for init counts as gone)."""
    until = time.monotonic() + wait
    while True:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > until:
            return False
        time.sleep(0.05)


def read_pid(path: Path, wait: float = 5.0) -> int:
    until = time.monotonic() + wait
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < until, f"{path} was never written"
        time.sleep(0.05)
    return int(path.read_text())


# A child that starts a grandchild in the background, as pg_dump --jobs starts workers.
FAMILY = """
sleep 300 &
echo $! > "{pids}/grandchild"
echo $$ > "{pids}/child"
echo "started, working" >&2
wait
"""


def test_deadline_kills_the_whole_process_group_and_says_which_limit(tmp_path):
    write_program(tmp_path, "sleeper", FAMILY.format(pids=tmp_path))
    seen: list[CommandResult] = []
    command = Sleeper(
        str(tmp_path),
        seen.append,
        limit=Limit(1, "CAPY_COMMAND_TIMEOUT_SECONDS", "raise CAPY_COMMAND_TIMEOUT_SECONDS"),
    )
    began = time.monotonic()
    with pytest.raises(PermanentCommandTimeout) as info:
        command.run([], what="sleeping")
    elapsed = time.monotonic() - began
    assert 1 <= elapsed < 1 + MARGIN
    assert gone(read_pid(tmp_path / "child")) and gone(read_pid(tmp_path / "grandchild"))
    err = info.value
    assert isinstance(err, CommandTimedOut) and isinstance(err, PermanentError)
    assert (
        err.message
        == "sleeping did not finish within 1 s (CAPY_COMMAND_TIMEOUT_SECONDS); raise CAPY_COMMAND_TIMEOUT_SECONDS"
    )
    # The job shows what happened: the tool's own output, then why it was stopped.
    assert len(seen) == 1 and seen[0].exit_code != 0
    assert seen[0].stderr_tail.splitlines()[0] == "started, working"
    assert seen[0].stderr_tail.splitlines()[-1] == "stopped: " + err.message
    assert err.stderr_tail == seen[0].stderr_tail


def test_the_earliest_of_the_command_limit_the_job_deadline_and_the_callers_wins(tmp_path):
    write_program(tmp_path, "sleeper", "sleep 30\n")
    job = Deadline.after(
        Limit(1, "CAPY_JOB_TIME_LIMIT_SECONDS", "split the import", label="the import's time limit of ")
    )
    command = Sleeper(
        str(tmp_path), limit=Limit(60, "CAPY_COMMAND_TIMEOUT_SECONDS", "raise it"), deadline=job
    )
    with pytest.raises(PermanentCommandTimeout) as info:
        command.run([], what="psql restoring the plain SQL dump")
    assert info.value.message == (
        "psql restoring the plain SQL dump did not finish within the import's time limit of 1 s "
        "(CAPY_JOB_TIME_LIMIT_SECONDS); split the import"
    )
    own = Deadline.after(Limit(1, "CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS", "try again"))
    with pytest.raises(
        PermanentCommandTimeout, match=r"within 1 s \(CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS\)"
    ):
        Sleeper(str(tmp_path), limit=Limit(60, "X", "y")).run([], deadline=own)


def test_an_expired_deadline_does_not_start_the_command(tmp_path):
    marker = tmp_path / "ran"
    write_program(tmp_path, "sleeper", f"touch {marker}\n")
    expired = Deadline.after(
        Limit(0, "CAPY_JOB_TIME_LIMIT_SECONDS", "split the import", label="the import's time limit of ")
    )
    with pytest.raises(PermanentCommandTimeout, match="CAPY_JOB_TIME_LIMIT_SECONDS"):
        Sleeper(str(tmp_path), deadline=expired).run([], what="pg_restore")
    assert not marker.exists()


def test_a_command_within_its_deadline_is_left_alone(tmp_path):
    write_program(tmp_path, "sleeper", "sleep 0.3\necho done\n")
    result = Sleeper(str(tmp_path), limit=Limit(10, "X", "y"), stall_seconds=0.1).run([])
    assert (result.exit_code, result.stdout_tail) == (0, "done")


def test_streaming_command_silent_for_the_stall_window_is_stopped(tmp_path):
    write_program(tmp_path, "pg_restore", 'echo "header"\nsleep 300\n')
    seen: list[CommandResult] = []
    began = time.monotonic()
    with pytest.raises(PermanentCommandTimeout) as info:
        PgRestore(str(tmp_path), seen.append, stall_seconds=1).run_streaming(
            ["--data-only", "--file=-", "x"], lambda out: out.read(), what="reading the dump's table data"
        )
    assert time.monotonic() - began < 1 + MARGIN
    assert info.value.message.startswith(
        "reading the dump's table data made no progress for 1 s (CAPY_COMMAND_STALL_SECONDS); "
    )
    assert "damaged or truncated" in info.value.message
    assert seen[-1].stderr_tail.endswith("stopped: " + info.value.message)


def test_a_stalled_pg_dump_is_transient(tmp_path):
    """pg_dump waits on the source: a stall is the source's, and may pass."""
    write_program(tmp_path, "pg_dump", 'echo $$ > "$0.pid"\nsleep 300\n')
    out = tmp_path / "dump"
    with pytest.raises(TransientCommandTimeout) as info:
        PgDump(str(tmp_path), stall_seconds=1).run(
            [f"--file={out}", "--format=directory"], what="pg_dump of the source"
        )
    assert isinstance(info.value, TransientError)
    assert "pg_dump of the source made no progress for 1 s (CAPY_COMMAND_STALL_SECONDS)" in info.value.message
    assert "the source" in info.value.message
    assert gone(read_pid(tmp_path / "pg_dump.pid"))


def test_pg_dump_writing_its_directory_silently_is_not_stalled(tmp_path):
    """pg_dump prints nothing; the files it writes growing is its progress."""
    write_program(
        tmp_path,
        "pg_dump",
        'for a in "$@"; do case "$a" in --file=*) out="${a#--file=}";; esac; done\n'
        'mkdir -p "$out"\nfor i in 1 2 3 4 5 6 7 8 9 10; do echo "row $i" >> "$out/1.dat"; sleep 0.3; done\n',
    )
    out = tmp_path / "dump"
    dump = PgDump(str(tmp_path), stall_seconds=1)
    process = dump.start(["--format=directory", f"--file={out}", "--dbname=dbname=x"])
    result = dump.wait(process, what="pg_dump")
    assert result.exit_code == 0 and (out / "1.dat").read_text().count("row") == 10


def test_chatty_streaming_command_is_not_stalled(tmp_path):
    write_program(tmp_path, "pg_restore", "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.3; done\n")
    lines: list[bytes] = []
    PgRestore(str(tmp_path), stall_seconds=1).run_streaming(["--list", "x"], lambda out: lines.extend(out))
    assert len(lines) == 10


def test_silent_restore_into_a_database_is_bounded_by_its_deadline_only(tmp_path):
    """A restore prints nothing while COPY loads a large table: silence is not a stall."""
    write_program(tmp_path, "psql", "sleep 2\n")
    result = PgTools(str(tmp_path), stall_seconds=0.5).psql.run(["--file=x"])
    assert result.exit_code == 0


def test_restore_tools_get_server_side_timeouts(tmp_path):
    write_program(tmp_path, "psql", f'echo "$PGOPTIONS" > {tmp_path}/options\n')
    write_program(tmp_path, "pg_dump", f'echo "$PGOPTIONS" > {tmp_path}/dump-options\n')
    tools = PgTools(
        str(tmp_path), limit=Limit(100, "CAPY_COMMAND_TIMEOUT_SECONDS", "x"), stall_seconds=600, major=15
    )
    tools.psql.run([], env={"PGOPTIONS": "-c search_path=pg_catalog"})
    options = (tmp_path / "options").read_text().split()
    assert options[-2:] == ["-c", "search_path=pg_catalog"]  # the caller's own options are kept
    settings = dict(o.split("=", 1) for o in options if "=" in o)
    # Just after the process deadline, so the watchdog speaks first.
    assert 109_000 <= int(settings["statement_timeout"]) <= 110_000
    assert settings["idle_in_transaction_session_timeout"] == "600000"
    assert settings["client_connection_check_interval"] == "10000"
    # pg_dump talks to the source, whose version and settings are not ours to change.
    tools.pg_dump.run([])
    assert (tmp_path / "dump-options").read_text().strip() == ""


def test_an_interrupt_of_the_waiting_thread_stops_the_command(tmp_path):
    """Dramatiq's time limit raises in the worker thread: the wait must notice it."""
    write_program(tmp_path, "sleeper", FAMILY.format(pids=tmp_path))
    raised: list[BaseException] = []

    def work() -> None:
        try:
            Sleeper(str(tmp_path)).run([])
        except BaseException as err:  # noqa: BLE001 - the interrupt itself is under test
            raised.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    raise_thread_exception(thread.ident, TimeLimitExceeded)
    thread.join(MARGIN)
    assert not thread.is_alive()
    assert raised and isinstance(raised[0], TimeLimitExceeded)
    assert gone(child) and gone(grandchild)


def test_abort_kills_the_process_group(tmp_path):
    write_program(tmp_path, "sleeper", FAMILY.format(pids=tmp_path))
    command = Sleeper(str(tmp_path))
    process = command.start([])
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    command.abort(process)
    assert gone(child) and gone(grandchild)
    assert process.stdout is not None and process.stdout.closed


def test_deadline_remaining_and_earliest():
    clock = iter([100.0, 100.0, 103.0]).__next__
    deadline = Deadline.after(Limit(10, "A", "a"), clock=clock)
    assert deadline.at == 110.0
    assert deadline.remaining(clock=clock) == 10.0
    assert deadline.remaining(clock=clock) == 7.0
    sooner = Deadline(105.0, Limit(1, "B", "b"))
    assert Deadline.earliest(deadline, None, sooner) is sooner


def test_commands_still_running_when_the_worker_exits_are_killed(tmp_path):
    """Tools run in sessions of their own: the worker's exit must stop them itself."""
    write_program(tmp_path, "sleeper", FAMILY.format(pids=tmp_path))
    script = (
        "import sys\n"
        "from tests.unit.test_command_deadlines import Sleeper\n"
        f"Sleeper({str(tmp_path)!r}).start([])\n"
        "import time; time.sleep(1)\n"
        "sys.exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, cwd=Path(__file__).parents[2])
    assert gone(read_pid(tmp_path / "child")) and gone(read_pid(tmp_path / "grandchild"))


def test_tools_do_not_inherit_the_workers_libpq_variables(tmp_path, monkeypatch):
    """PGSERVICE, PGHOST, PGSSLCERT… of the worker's own environment never reach a
    tool that talks to a tenant's server; what the caller passes does."""
    monkeypatch.setenv("PGSERVICE", "ours")
    monkeypatch.setenv("PGSSLCERT", "/root/.postgresql/postgresql.crt")
    monkeypatch.setenv("PGPASSWORD", "the-workers-own-password")
    write_program(tmp_path, "pg_dump", f"env > {tmp_path}/env\n")
    tools = PgTools(
        str(tmp_path), limit=Limit(100, "CAPY_COMMAND_TIMEOUT_SECONDS", "x"), stall_seconds=600, major=15
    )
    tools.pg_dump.run([], env={"PGPASSFILE": "/nonexistent"})
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert "PGSERVICE" not in seen and "PGSSLCERT" not in seen and "PGPASSWORD" not in seen
    assert seen["PGPASSFILE"] == "/nonexistent"


def test_wait_briefly_answers_none_while_a_command_runs_and_its_exit_code_once_it_ends(tmp_path):
    from stages.tools.commands import CommandProcess

    gate = tmp_path / "gate"
    process = CommandProcess(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.01; done; exit 3"])
    try:
        assert process.wait_briefly(0.05) is None  # still running
        gate.touch()
        assert process.wait_briefly(30) == 3
        assert process.wait_briefly(0) == 3  # and again, once reaped
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()


def test_a_streaming_commands_pipe_holds_a_megabyte_so_it_runs_ahead_of_the_worker(tmp_path):
    """The worker hands each chunk on (to the preview) before it reads the next: through
    Linux's default 64 kB pipe, pg_restore waited on it for a third of a table's copy."""
    write_program(tmp_path, "pg_restore", "head -c 3000000 /dev/zero\n")
    sizes: list[int] = []
    read: list[int] = []

    def started(process) -> None:
        sizes.append(fcntl.fcntl(process.stdout.fileno(), F_GETPIPE_SZ))

    PgRestore(str(tmp_path), stall_seconds=5).run_streaming(
        ["--data-only", "--file=-", "x"], lambda out: read.append(len(out.read())), started=started
    )
    assert sizes and sizes[0] >= STREAM_PIPE_BYTES, sizes
    assert read == [3_000_000]


def test_a_pipe_the_system_will_not_widen_still_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "STREAM_PIPE_BYTES", 1 << 40)  # past any fs.pipe-max-size
    write_program(tmp_path, "pg_restore", "head -c 300000 /dev/zero\n")
    read: list[int] = []
    PgRestore(str(tmp_path), stall_seconds=5).run_streaming(
        ["--data-only", "--file=-", "x"], lambda out: read.append(len(out.read()))
    )
    assert read == [300_000]
