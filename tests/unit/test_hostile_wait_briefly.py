"""Hostile review of CommandProcess.wait_briefly (stages.tools.commands): the pidfd wait."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from stages.tools.commands import CommandProcess, PgCommand
from tests.unit.test_command_deadlines import write_program


class Quick(PgCommand):
    program = "quick"


@pytest.fixture
def many_fds():
    """Push this process's next file descriptors above 1024 (FD_SETSIZE), as a worker
    with many lanes, sockets and pipes open has them (the limit here is far higher)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200 if hard == resource.RLIM_INFINITY else min(1200, hard)
    assert wanted == 1200, f"the hard limit on open files ({hard}) is below 1200: raise it to run this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    opened = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            opened.append(fd)
            if fd > 1100:
                break
        yield
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_wait_briefly_works_when_the_pidfd_is_above_fd_setsize(many_fds):
    process = CommandProcess(["sh", "-c", "exit 3"])
    try:
        # select.select() refuses descriptors >= 1024: ValueError, not the exit code.
        assert process.wait_briefly(30) == 3
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()


def test_a_command_that_succeeds_is_not_reported_as_failed_in_a_process_with_many_fds(
    tmp_path: Path, many_fds
):
    write_program(tmp_path, "quick", "echo done\nexit 0\n")
    result = Quick(str(tmp_path)).run([], what="a quick command")
    assert result.exit_code == 0


def test_the_pidfd_is_closed_when_the_wait_is_interrupted(tmp_path: Path):
    # A time limit raised in the waiting thread: _wait_for_exit aborts the command
    # (killed, reaped); its pidfd must not stay open for as long as the object lives.
    write_program(tmp_path, "quick", "sleep 30\n")
    command = Quick(str(tmp_path))
    before = _pidfds()
    process = command.start([])
    try:
        assert process.wait_briefly(0.01) is None  # opens the pidfd
    finally:
        command.abort(process)
    assert process.returncode is not None
    leaked = _pidfds() - before
    assert leaked == 0, f"pidfd {leaked} still open after the command was aborted and reaped"


def _pidfds() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd) == "anon_inode:[pidfd]")


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
