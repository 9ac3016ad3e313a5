"""A list scheduler for the copy: tasks with dependencies, run on N lanes, the ready
task on the longest remaining chain first (critical path), never two at once that
would wait on each other's table locks.

Each task names the tables it locks and whether it locks them exclusively (a COPY into
a table truncated in its own transaction, ALTER TABLE, ANALYZE) or shares them (CREATE
INDEX takes a SHARE lock: several builds on one table run side by side). A task starts
only when every task it depends on has finished and no running task holds one of its
tables in a conflicting way: lanes never wait on one another, and two ALTER TABLE …
FOREIGN KEY on tables that reference each other cannot deadlock.

A task marked `alone` has the lanes to itself while it runs: no other lane task starts
until it ends (those already running go on). The engine marks so the copy at the head of
a chain that bounds the whole copy (a large table with a trigram index): side by side
with another table's rows it loads at half the speed, and every second it takes delays
the end of the copy by as much.

Serial tasks (`serial`) run one after another, in their order, on a thread of their
own beside the lanes (the schema restored slice by slice while the first tables copy):
they take no lane, and other tasks may wait for them.

The first task that fails stops the schedule: no new task starts, running tasks are
told to stop (`on_failure`), again every RESTOP_SECONDS while any still runs (a task
that sent its statement just after a stop was not stopped by it), and `run` raises that
first error once every lane is idle. An exception raised in `run`'s own thread (a
worker's time limit, a shutdown) stops the schedule the same way, and `run` raises it
once every lane has ended: lanes are counted as they end, not asked whether they live
(a thread whose `join` such an exception interrupted says it has ended, on Python 3.11,
while it still runs).
"""

from __future__ import annotations

import contextvars
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Lane = TypeVar("Lane")

log = logging.getLogger(__name__)

# After a failure, how often the tasks still running are told to stop again.
RESTOP_SECONDS = 1.0


@dataclass(eq=False)
class Task(Generic[Lane]):
    """One unit of work. `cost` is an estimate in arbitrary units (bytes to copy or
    index); only its relative size matters. `run(lane)` does the work on a lane's
    resources (its connections)."""

    name: str
    cost: float
    run: Callable[[Lane], None]
    tables: frozenset[str] = frozenset()
    exclusive: bool = True
    after: list[Task[Lane]] = field(default_factory=list)
    alone: bool = False  # no other lane task starts while it runs
    # Set by the scheduler: the cost of the longest chain from this task to the end.
    rank: float = 0.0

    def conflicts(self, other: Task[Lane]) -> bool:
        return bool(self.tables & other.tables) and (self.exclusive or other.exclusive)


def rank(tasks: Sequence[Task[Lane]]) -> None:
    """Set each task's rank: its cost plus the largest rank among the tasks that wait
    for it (the "bottom level" of list scheduling)."""
    waiting: dict[int, list[Task[Lane]]] = {id(t): [] for t in tasks}
    for task in tasks:
        for before in task.after:
            if id(before) in waiting:  # (one not among `tasks` never runs: Schedule says it is stuck)
                waiting[id(before)].append(task)
    done: dict[int, float] = {}

    def bottom(task: Task[Lane]) -> float:
        # Iterative: a chain of thousands of tasks must not exhaust the stack.
        stack = [task]
        while stack:
            top = stack[-1]
            pending = [t for t in waiting[id(top)] if id(t) not in done]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            done[id(top)] = top.cost + max((done[id(t)] for t in waiting[id(top)]), default=0.0)
        return done[id(task)]

    for task in tasks:
        task.rank = bottom(task)


class Schedule(Generic[Lane]):
    """Run `tasks` on `lanes` (one thread each), and `serial` in order on a thread of
    their own (given the first lane, which they do not use). `on_start`/`on_finish` see
    each task as it starts and ends (progress); `on_failure` is called with the first
    error to stop the running tasks (e.g. cancel their connections), and again every
    RESTOP_SECONDS while a task still runs: it must be safe to repeat."""

    def __init__(
        self,
        tasks: Iterable[Task[Lane]],
        lanes: Sequence[Lane],
        *,
        serial: Sequence[Task[Lane]] = (),
        on_start: Callable[[Task[Lane]], None] = lambda _t: None,
        on_finish: Callable[[Task[Lane]], None] = lambda _t: None,
        on_failure: Callable[[BaseException], None] = lambda _e: None,
    ) -> None:
        self.tasks = list(tasks)
        self.serial = list(serial)
        self.lanes = list(lanes)
        if not self.lanes:
            raise ValueError("a schedule needs at least one lane")
        rank([*self.serial, *self.tasks])
        self.on_start, self.on_finish, self.on_failure = on_start, on_finish, on_failure
        lock = threading.Lock()
        # Lanes wait on `_cond` for a task to become eligible, `run`'s own thread on
        # `_watch` for a lane to end or a task to fail: a task's end (thousands of
        # them) wakes only the lanes.
        self._cond = threading.Condition(lock)
        self._watch = threading.Condition(lock)
        # Tasks whose dependencies are all done, by rank (then their given order): a
        # heap, so that picking the next task does not scan thousands that must wait.
        by_rank = sorted(self.tasks, key=lambda t: -t.rank)
        self._position = {id(task): position for position, task in enumerate(by_rank)}
        self._eligible: list[tuple[int, Task[Lane]]] = []
        self._waiting: dict[int, int] = {}  # unfinished dependencies, by task
        self._dependents: dict[int, list[Task[Lane]]] = {}
        for task in by_rank:
            before = {id(t) for t in task.after}
            self._waiting[id(task)] = len(before)
            for dependency in before:
                self._dependents.setdefault(dependency, []).append(task)
            if not before:
                heapq.heappush(self._eligible, (self._position[id(task)], task))
        self._left = len(self.tasks)  # lane tasks not started yet
        self._serial_left = len(self.serial)  # serial tasks not finished yet
        self._finished: set[int] = set()
        self._running: list[Task[Lane]] = []
        self._error: BaseException | None = None
        self._threads_left = 0  # lane and serial threads not ended yet

    def _done(self, task: Task[Lane]) -> None:
        """`task` finished well: the tasks that waited only for it become eligible (under the lock)."""
        self._finished.add(id(task))
        for waiting in self._dependents.get(id(task), []):
            self._waiting[id(waiting)] -= 1
            if self._waiting[id(waiting)] == 0:
                heapq.heappush(self._eligible, (self._position[id(waiting)], waiting))

    def _next(self) -> Task[Lane] | None:
        """The highest-ranked task that may start now; None when none is left to run
        (blocks while tasks remain that must wait for running ones)."""
        with self._cond:
            while True:
                if self._error is not None or not self._left:
                    return None
                task, aside = None, []
                while self._eligible and not any(other.alone for other in self._running):
                    candidate = heapq.heappop(self._eligible)
                    if any(candidate[1].conflicts(other) for other in self._running):
                        aside.append(candidate)  # its tables are busy: after the running task
                        continue
                    task = candidate[1]
                    break
                for item in aside:
                    heapq.heappush(self._eligible, item)
                if task is not None:
                    self._left -= 1
                    self._running.append(task)
                    return task
                if not self._running and not self._serial_left:
                    stuck = [t.name for t in self.tasks if id(t) not in self._finished][:5]
                    raise RuntimeError(
                        f"the copy schedule is stuck: nothing runs and {', '.join(stuck)} cannot start"
                    )
                self._cond.wait()

    def _lane(self, lane: Lane) -> None:
        try:
            self._take_tasks(lane)
        finally:
            self._thread_ended()

    def _thread_ended(self) -> None:
        with self._cond:
            self._threads_left -= 1
            self._cond.notify_all()
            self._watch.notify_all()

    def _take_tasks(self, lane: Lane) -> None:
        while True:
            try:
                task = self._next()
            except RuntimeError as err:
                self._fail(err)
                return
            if task is None:
                return
            self._perform(task, lane)

    def _serial(self) -> None:
        try:
            self._run_series()
        finally:
            self._thread_ended()

    def _run_series(self) -> None:
        for task in self.serial:
            with self._cond:
                if self._error is not None:
                    return
                self._running.append(task)
            self._perform(task, self.lanes[0], serial=True)

    def _perform(self, task: Task[Lane], lane: Lane, *, serial: bool = False) -> None:
        """Run a task taken for running; a failure stops the schedule."""
        try:
            self.on_start(task)
            task.run(lane)
            self.on_finish(task)
        except BaseException as err:  # noqa: BLE001 - re-raised by run() in the caller's thread
            self._fail(err)
        finally:
            with self._cond:
                self._running.remove(task)
                if serial:
                    self._serial_left -= 1
                if self._error is None:
                    self._done(task)
                self._cond.notify_all()

    def _fail(self, err: BaseException) -> bool:
        """Record `err` as the schedule's error and stop the running tasks, unless a
        failure came first; whether it was the first."""
        with self._cond:
            first = self._error is None
            if first:
                self._error = err
            self._cond.notify_all()
            self._watch.notify_all()
        if first:
            self._stop(err)
        return first

    def run(self) -> None:
        """Run every task; raise the first error once every lane has stopped."""
        threads = [
            threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._lane, lane),
                name=f"copy-lane-{i}",
                daemon=True,
            )
            for i, lane in enumerate(self.lanes)
        ]
        if self.serial:
            threads.append(
                threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(self._serial,),
                    name="copy-lane-serial",
                    daemon=True,
                )
            )
        self._threads_left = len(threads)
        for thread in threads:
            thread.start()
        try:
            self._wait_for_threads()
        except BaseException as err:
            # Stopped from outside (a time limit, a shutdown): stop the lanes (again, if a
            # task failed first), wait until every one has ended, then go.
            if not self._fail(err):
                self._stop(self._error or err)
            self._wait_for_threads(interruptible=False)
            raise
        if self._error is not None:
            raise self._error

    def _wait_for_threads(self, *, interruptible: bool = True) -> None:
        """Wait until every lane and the serial thread have ended, in short waits (an
        exception raised in this thread is seen between them; with `interruptible`
        False it is not let through: the lanes are being stopped), telling the tasks
        still running to stop again every RESTOP_SECONDS after a failure: a statement
        sent just after the first stop would run to its end, or wait for a lock forever."""
        stopped_at: float | None = None
        while True:
            try:
                with self._cond:
                    if not self._threads_left:
                        return
                    self._watch.wait(0.2)
                    error, running = self._error, bool(self._running)
                if error is None:
                    continue
                now = time.monotonic()
                if stopped_at is None:
                    stopped_at = now  # the failing task's own stop just went out
                elif running and now - stopped_at >= RESTOP_SECONDS:
                    self._stop(error)
                    stopped_at = now
            except BaseException:
                if interruptible:
                    raise
                log.warning("the copy's lanes are being stopped; waiting for them to end")

    def _stop(self, error: BaseException) -> None:
        """`on_failure`; if it fails, the error being raised is still the news."""
        try:
            self.on_failure(error)
        except Exception:  # noqa: BLE001 - a repeated stop must not replace the error being raised
            log.warning("stopping the copy's running tasks again failed", exc_info=True)
