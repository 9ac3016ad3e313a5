"""A cancel stops every command a stage has running, with its whole process group, and
any it starts afterwards. Real (tiny) programs, no sockets."""

from __future__ import annotations

import threading
import time

import pytest

from stages.errors import Cancelled, CommandCancelled, PermanentError
from stages.tools.commands import Cancellation, PgCommand
from tests.unit.test_command_deadlines import FAMILY, MARGIN, gone, read_pid, write_program


class Sleeper(PgCommand):
    program = "sleeper"


def test_a_cancel_stops_the_running_command_and_everything_it_started(tmp_path):
    write_program(tmp_path, "sleeper", FAMILY.format(pids=tmp_path))
    cancellation = Cancellation()
    seen = []
    command = Sleeper(str(tmp_path), seen.append, cancellation=cancellation)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            command.run([], what="sleeping")
        except BaseException as err:
            failures.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    began = time.monotonic()
    cancellation.cancel("cancelled by operator:ann")
    worker.join(MARGIN)
    assert not worker.is_alive() and time.monotonic() - began < MARGIN
    assert gone(child) and gone(grandchild)
    [err] = failures
    assert (
        isinstance(err, CommandCancelled) and isinstance(err, Cancelled) and isinstance(err, PermanentError)
    )
    assert err.message == "sleeping was stopped: cancelled by operator:ann"
    assert seen[-1].stderr_tail.splitlines()[-1] == "stopped: sleeping was stopped: cancelled by operator:ann"


def test_a_command_started_after_the_cancel_is_stopped_at_once(tmp_path):
    write_program(tmp_path, "sleeper", "sleep 300\n")
    cancellation = Cancellation()
    cancellation.cancel("cancelled by operator:ann")
    began = time.monotonic()
    with pytest.raises(CommandCancelled):
        Sleeper(str(tmp_path), cancellation=cancellation).run([], what="sleeping")
    assert time.monotonic() - began < MARGIN
    assert cancellation.cancelled and cancellation.reason == "cancelled by operator:ann"


def test_commands_of_other_stages_are_left_alone(tmp_path):
    write_program(tmp_path, "sleeper", "echo done\n")
    Cancellation().cancel("cancelled by operator:ann")
    assert Sleeper(str(tmp_path), cancellation=Cancellation()).run([]).stdout_tail == "done"


def test_a_cancel_callback_that_blocks_does_not_hold_the_canceller():
    """Interrupting a session can block on a source that stopped answering; the caller
    (the heartbeat thread) must go on beating meanwhile."""
    cancellation = Cancellation()
    entered, release = threading.Event(), threading.Event()

    def blocking() -> None:
        entered.set()
        release.wait(30)

    cancellation.on_cancel(blocking)
    caller = threading.Thread(target=cancellation.cancel, args=("cancelled by tester",))
    caller.start()
    try:
        assert entered.wait(10), "the callback was not called"
        caller.join(5)
        assert not caller.is_alive(), "cancel() waited for its callback"
        assert cancellation.reason == "cancelled by tester"
    finally:
        release.set()
        caller.join()
