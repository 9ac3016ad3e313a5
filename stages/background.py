"""One call run on a thread of its own while the caller goes on (the preview database
created while the schema is dumped, a rehearsal database while the source is checked),
and work that nobody waits for but the process must not drop on its way out
(`start_held`)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
JOIN_POLL_SECONDS = 0.1
# How long `start_held` keeps a process that is exiting, from the work's start: within
# the 30 s a platform (and gunicorn, and the e2e tests' harness) gives a process to stop.
EXIT_WAIT_SECONDS = 20.0


def start_held(work: Callable[[], None], *, name: str) -> threading.Thread:
    """`work()` started on a daemon thread that nobody waits for, but which holds this
    process's exit until it ends, for EXIT_WAIT_SECONDS at most from now: a thread that
    is not a daemon joins it. Python waits for such threads however a process exits
    short of SIGKILL (its main thread returning or calling sys.exit, multiprocessing's
    children included: a dramatiq worker process that takes a second SIGTERM as "exit
    now", a gunicorn worker), where a daemon thread dies mid-work. For work that must not
    be lost half done (a rehearsal database's drop, a cluster's spares: what is left
    waits for the sweep)."""
    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    threading.Thread(
        target=thread.join, args=(EXIT_WAIT_SECONDS,), name=f"finish-{name}", daemon=False
    ).start()
    return thread


class Background(Generic[T]):
    """`work()` started now on a daemon thread, in a copy of the caller's context (its
    logging fields: job, stage, attempt).

    `result()` waits for it and returns its value or raises its error, in the caller's
    thread; `join()` only waits (a caller on its way out: whatever the work made exists,
    or has failed, once it returns, so the caller's cleanup finds it)."""

    def __init__(self, work: Callable[[], T], *, name: str) -> None:
        self._value: list[T] = []
        self._error: list[BaseException] = []
        # Set once the work has ended, however. Waits are on it, not on the thread: a
        # Thread.join interrupted by an exception raised in the waiting thread (a time
        # limit) marks a thread still running as stopped (CPython 3.11), and every later
        # join then returns at once, before the work is done (found by review).
        self._done = threading.Event()

        def run() -> None:
            try:
                self._value.append(work())
            except BaseException as err:  # noqa: BLE001 - raised by result(), in the caller's thread
                self._error.append(err)
            finally:
                self._done.set()

        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(run,), name=name, daemon=True
        )
        self._thread.start()

    def join(self, *, interrupt: Callable[[], None] | None = None) -> None:
        """Wait for the work, in short waits: an exception raised in the caller's thread
        (Dramatiq's time limit, a shutdown) is delivered only between them. Such an
        exception still waits for the work before it propagates: what the work makes
        (a database) must exist, or have failed, before the caller's cleanup looks.
        `interrupt` is called first, then: what stops the work (a command's cancel),
        when the work could otherwise run on for as long as it likes."""
        try:
            while not self._done.wait(JOIN_POLL_SECONDS):
                pass
        except BaseException:
            if interrupt is not None:
                interrupt()
            self._done.wait()
            raise

    def settle(self) -> None:
        """`join`, for a caller's `finally`: it waits once more when an exception raised
        in the caller's thread (a time limit) ended the first wait before it began. One
        landing as `settle` itself is entered (Python delivers it as a function is
        entered) ends it before either wait: a caller that must not go on before the
        work is done follows it with `join()` in a `finally` of its own."""
        try:
            self.join()
        finally:
            self.join()

    @property
    def error(self) -> BaseException | None:
        """The work's error, once it has ended with one (None before it ends)."""
        return self._error[0] if self._done.is_set() and self._error else None

    def result(self, *, interrupt: Callable[[], None] | None = None) -> T:
        """The work's value, or its error raised here (`interrupt`: as `join`'s)."""
        self.join(interrupt=interrupt)
        if self._error:
            raise self._error[0]
        return self._value[0]
