"""Hostile review of the copy schedule's repeated stop (0640dbd): `on_failure` again
every RESTOP_SECONDS while a task still runs. Real Postgres sessions stand for the
lanes where it matters (a cancel landing on a ROLLBACK, on a blocked statement)."""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time

import psycopg2
import pytest

from stages.copy import scheduler
from stages.copy.scheduler import Schedule, Task
from tests.support import pg


def _lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("copy-lane") and t.is_alive()]


def test_the_first_error_is_raised_even_when_a_repeated_stop_fails():
    """The repeated stop runs in run()'s own thread: if it raises (a cancel that finds a
    connection in a state it refuses), the first error must still be the one raised."""
    calls: list[BaseException] = []
    release = threading.Event()

    def on_failure(err: BaseException) -> None:
        calls.append(err)
        if len(calls) >= 2:
            release.set()
            raise OSError("the repeated stop failed")

    def slow(_lane: object) -> None:
        release.wait(10)

    def fail(_lane: object) -> None:
        time.sleep(0.05)
        raise ValueError("the first error")

    tasks = [Task[None]("slow", 10, slow, frozenset({"a"})), Task[None]("fails", 1, fail, frozenset({"b"}))]
    with pytest.raises(ValueError, match="the first error"):
        Schedule(tasks, [1, 2], on_failure=on_failure).run()
    assert not _lane_threads()


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


class TimeLimit(BaseException):
    """What a worker's time limit raises in the stage's thread."""


@pytest.mark.parametrize("failed_first", [False, True], ids=["stopped-from-outside", "failed-then-outside"])
def test_a_stop_from_outside_leaves_no_lane_running_and_stops_a_late_statement_again(
    monkeypatch, failed_first
):
    """The outside stop (dramatiq's stage time limit raises TimeLimitExceeded in run()'s
    thread, inside `thread.join(0.2)`) stops the lanes once, then joins them. On Python
    3.11 the thread whose join was interrupted reports itself dead at once: run() returns
    while that lane still runs (the engine then closes its session under it), and a
    statement it sent just after the stop is never stopped again."""
    monkeypatch.setattr(scheduler, "RESTOP_SECONDS", 0.2)
    stops: list[float] = []
    stopped = threading.Event()
    second_stop = threading.Event()
    late_ended = threading.Event()

    def on_failure(_err: BaseException) -> None:
        stops.append(time.monotonic())
        (second_stop if stopped.is_set() else stopped).set()

    def late_statement(_lane: object) -> None:
        try:
            stopped.wait(10)  # passed its start check; the stop finds this lane idle
            time.sleep(0.1)  # then sends its statement, which waits until something stops it
            if not second_stop.wait(3):
                raise AssertionError("never stopped again")
            raise RuntimeError("canceling statement due to user request")
        finally:
            late_ended.set()

    def other(_lane: object) -> None:
        if failed_first:
            time.sleep(0.05)
            raise ValueError("boom")
        stopped.wait(10)

    tasks = [
        Task[None]("late", 10, late_statement, frozenset({"a"})),
        Task[None]("other", 1, other, frozenset({"b"})),
    ]
    outcome: list[BaseException] = []
    lanes_alive_at_return: list[list[str]] = []

    def runner() -> None:
        try:
            Schedule(tasks, [1, 2], on_failure=on_failure).run()
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)
        lanes_alive_at_return.append([] if late_ended.is_set() else ["late"])

    thread = threading.Thread(target=runner)
    thread.start()
    time.sleep(0.1)
    _raise_in(thread, TimeLimit)
    thread.join(15)
    try:
        assert not thread.is_alive()
        assert outcome
        assert lanes_alive_at_return == [[]], "run() returned while lanes still ran"
        assert second_stop.is_set(), f"stopped {len(stops)} time(s)"
    finally:
        second_stop.set()
        for t in threading.enumerate():
            if t.name.startswith("copy-lane"):
                t.join(5)


@pytest.fixture
def target(scratch_db):
    name = scratch_db("capytgt_restop")
    pg.psql(name, text="CREATE TABLE locked (id int); CREATE TABLE other (id int);")
    return name


def test_a_repeated_cancel_does_not_break_a_lane_that_is_rolling_back(target, monkeypatch):
    """Many stops while lanes roll back their cancelled statements: each lane ends with
    its own error, its session usable (not stuck in an aborted transaction), the first
    error raised, no lane thread left."""
    monkeypatch.setattr(scheduler, "RESTOP_SECONDS", 0.01)
    conns = [psycopg2.connect(pg.url_for(target)) for _ in range(4)]
    holder = psycopg2.connect(pg.url_for(target))
    try:
        with holder.cursor() as cur:
            cur.execute("BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")

        def on_failure(_err: BaseException) -> None:
            for conn in conns:
                if not conn.closed:
                    with contextlib.suppress(psycopg2.Error):
                        conn.cancel()

        def blocked(lane: psycopg2.extensions.connection) -> None:
            try:
                with lane.cursor() as cur:
                    cur.execute("INSERT INTO locked VALUES (1)")
                lane.commit()
            except BaseException:
                with contextlib.suppress(psycopg2.Error):
                    for _ in range(50):  # many ROLLBACKs under the stops
                        lane.rollback()
                        with lane.cursor() as cur:
                            cur.execute("SELECT 1")
                        lane.rollback()
                raise

        def fail(_lane: object) -> None:
            time.sleep(0.3)
            raise ValueError("the first error")

        tasks = [Task("blocked " + str(i), 10, blocked, frozenset({f"t{i}"})) for i in range(3)]
        tasks.append(Task("fails", 1, fail, frozenset({"x"})))
        with pytest.raises(ValueError, match="the first error"):
            Schedule(tasks, conns, on_failure=on_failure).run()
        assert not _lane_threads()
        holder.rollback()
        for conn in conns:
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM locked")
                assert cur.fetchone() == (0,)
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
            conn.rollback()
    finally:
        for conn in [*conns, holder]:
            conn.close()
