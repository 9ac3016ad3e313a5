"""The copy's list scheduler: dependencies, critical path first, no conflicting locks."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from stages.copy.scheduler import Schedule, Task, rank


def _recorder():
    log: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    def make(name: str, seconds: float = 0.0):
        def run(_lane: object) -> None:
            with lock:
                log.append(("start", name, time.monotonic()))
            if seconds:
                time.sleep(seconds)
            with lock:
                log.append(("end", name, time.monotonic()))

        return run

    return log, make


def test_rank_is_the_longest_chain_to_the_end():
    a = Task[None]("a", 1, lambda _l: None)
    b = Task[None]("b", 10, lambda _l: None, after=[a])
    c = Task[None]("c", 2, lambda _l: None, after=[a])
    d = Task[None]("d", 5, lambda _l: None, after=[c])
    rank([a, b, c, d])
    assert (a.rank, b.rank, c.rank, d.rank) == (11, 10, 7, 5)


def test_the_table_with_the_longest_index_build_is_copied_first_even_if_smaller():
    log, make = _recorder()
    big = Task[None]("copy big", 100, make("copy big"), frozenset({"big"}))
    small = Task[None]("copy small", 10, make("copy small"), frozenset({"small"}))
    gin = Task[None](
        "gin on small", 500, make("gin on small"), frozenset({"small"}), exclusive=False, after=[small]
    )
    btree = Task[None](
        "btree on big", 40, make("btree on big"), frozenset({"big"}), exclusive=False, after=[big]
    )
    Schedule([big, small, gin, btree], [None]).run()
    starts = [name for event, name, _ in log if event == "start"]
    assert starts[0] == "copy small"
    assert starts.index("gin on small") < starts.index("btree on big")


def test_dependencies_are_honoured_on_many_lanes():
    log, make = _recorder()
    tasks: list[Task[None]] = []
    for i in range(20):
        copy = Task[None](f"copy {i}", i, make(f"copy {i}", 0.005), frozenset({f"t{i}"}))
        index = Task[None](
            f"index {i}",
            2 * i,
            make(f"index {i}", 0.005),
            frozenset({f"t{i}"}),
            exclusive=False,
            after=[copy],
        )
        tasks += [copy, index]
    Schedule(tasks, [1, 2, 3, 4]).run()
    when = {(event, name): at for event, name, at in log}
    for i in range(20):
        assert when[("end", f"copy {i}")] <= when[("start", f"index {i}")]


def test_exclusive_tasks_on_a_table_never_overlap_shared_ones_may():
    log, make = _recorder()
    copy = Task[None]("copy", 1, make("copy"), frozenset({"t"}))
    indexes = [
        Task[None](f"index {i}", 5, make(f"index {i}", 0.05), frozenset({"t"}), exclusive=False, after=[copy])
        for i in range(3)
    ]
    fk_a = Task[None]("fk a", 1, make("fk a", 0.05), frozenset({"t", "u"}), after=indexes)
    fk_b = Task[None]("fk b", 1, make("fk b", 0.05), frozenset({"u", "t"}), after=indexes)
    Schedule([copy, *indexes, fk_a, fk_b], [1, 2, 3]).run()
    spans: dict[str, list[float]] = {}
    for _event, name, at in log:
        spans.setdefault(name, []).append(at)

    def overlap(x: str, y: str) -> bool:
        return spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]

    assert not overlap("fk a", "fk b")  # they lock the same tables: one after the other
    assert any(overlap(f"index {i}", f"index {j}") for i in range(3) for j in range(3) if i < j)


def test_the_first_failure_stops_the_schedule_and_is_raised():
    ran: list[str] = []
    stopped: list[BaseException] = []

    def fail(_lane: object) -> None:
        raise ValueError("boom")

    first = Task[None]("first", 10, fail)
    later = Task[None]("later", 1, lambda _l: ran.append("later"), after=[first])
    with pytest.raises(ValueError, match="boom"):
        Schedule([first, later], [None, None], on_failure=stopped.append).run()
    assert ran == []
    assert [str(e) for e in stopped] == ["boom"]


_JOB = contextvars.ContextVar("job", default=None)


def test_tasks_run_in_the_callers_context():
    """Log lines from the lanes carry the stage's job, stage and attempt (pipeline.logs
    keeps them in context variables)."""
    seen: list[object] = []
    token = _JOB.set("job_1")
    try:
        tasks = [Task[str](f"t{i}", 1, lambda _lane: seen.append(_JOB.get())) for i in range(4)]
        Schedule(tasks, ["lane-a", "lane-b"]).run()
    finally:
        _JOB.reset(token)
    assert seen == ["job_1"] * 4


def test_foreign_keys_into_one_table_are_chained_soonest_ready_first_and_ranked_by_their_sum():
    from stages.copy.engine import chain_serial

    copy_small = Task[None]("copy small", 5, lambda _l: None)
    gin_small = Task[None]("gin on small", 500, lambda _l: None, after=[copy_small])
    copy_big = Task[None]("copy big", 100, lambda _l: None)
    copy_mid = Task[None]("copy mid", 20, lambda _l: None)
    keys = [
        Task[None]("fk small", 1, lambda _l: None, frozenset({"parent"}), after=[gin_small]),
        Task[None]("fk big", 30, lambda _l: None, frozenset({"parent"}), after=[copy_big]),
        Task[None]("fk mid", 10, lambda _l: None, frozenset({"parent"}), after=[copy_mid]),
    ]
    chain_serial(keys)
    by_name = {task.name: task for task in keys}
    # The small table's key waits for its trigram index: it comes last, not first.
    assert by_name["fk mid"].after == [copy_mid]
    assert by_name["fk big"].after == [copy_big, by_name["fk mid"]]
    assert by_name["fk small"].after == [gin_small, by_name["fk big"]]
    rank([copy_small, gin_small, copy_big, copy_mid, *keys])
    assert by_name["fk mid"].rank == 41  # the whole chain is still ahead of the first key


def test_serial_tasks_run_in_order_on_their_own_thread_and_gate_what_waits_for_them():
    """The schema's slices: one after another, on no lane (a single lane keeps copying
    beside them), and a copy waits only for its own slice."""
    log, make = _recorder()
    threads: dict[str, str] = {}

    def slice_run(name: str):
        inner = make(name, 0.05)

        def run(lane: object) -> None:
            threads[name] = threading.current_thread().name
            inner(lane)

        return run

    slices: list[Task[None]] = []
    for i in range(3):
        slices.append(Task[None](f"slice {i}", 1, slice_run(f"slice {i}"), after=slices[-1:]))
    copies = [
        Task[None](f"copy {i}", 10, make(f"copy {i}", 0.01), frozenset({f"t{i}"}), after=[slices[i]])
        for i in range(3)
    ]
    last = Task[None]("index", 1, make("index"), after=[copies[0], slices[-1]])
    Schedule([*copies, last], [None], serial=slices).run()
    when = {(event, name): at for event, name, at in log}
    for i in range(3):
        assert when[("end", f"slice {i}")] <= when[("start", f"copy {i}")]
        if i:
            assert when[("end", f"slice {i - 1}")] <= when[("start", f"slice {i}")]
    # The one lane copied the first table while the later slices were still restored.
    assert when[("start", "copy 0")] < when[("start", "slice 2")]
    assert when[("end", "slice 2")] <= when[("start", "index")]
    assert set(threads.values()) == {"copy-lane-serial"}


def test_a_failing_serial_task_stops_the_schedule_and_the_rest_of_the_series():
    ran: list[str] = []

    def fail(_lane: object) -> None:
        raise ValueError("schema slice failed")

    first = Task[None]("slice 1", 1, fail)
    second = Task[None]("slice 2", 1, lambda _l: ran.append("slice 2"), after=[first])
    copy = Task[None]("copy", 1, lambda _l: ran.append("copy"), after=[first])
    with pytest.raises(ValueError, match="schema slice failed"):
        Schedule([copy], [None, None], serial=[first, second]).run()
    assert ran == []


def test_a_task_waiting_for_one_that_never_runs_is_reported_stuck():
    never = Task[None]("not scheduled", 1, lambda _l: None)
    waiting = Task[None]("copy t", 1, lambda _l: None, after=[never])
    with pytest.raises(RuntimeError, match="stuck: nothing runs and copy t cannot start"):
        Schedule([waiting], [None]).run()


def test_thousands_of_tasks_start_in_rank_order_as_they_become_ready():
    """Picking the next task keeps to the ranks (highest first, ties in the given order)
    without scanning every waiting task."""
    order: list[str] = []
    tasks = [Task[None](f"t{i}", float(i % 7), lambda _l, i=i: order.append(f"t{i}")) for i in range(3000)]
    Schedule(tasks, [None]).run()
    expected = [t.name for t in sorted(tasks, key=lambda t: -t.rank)]
    assert order == expected


def test_a_task_marked_alone_has_the_lanes_to_itself_while_it_runs():
    log, make = _recorder()
    serial = [Task[None]("schema slice", 1, make("schema slice", 0.05))]
    before = Task[None]("copy running already", 1, make("copy running already", 0.1), frozenset({"r"}))
    head = Task[None](
        "copy head", 50, make("copy head", 0.1), frozenset({"h"}), alone=True, after=[serial[0]]
    )
    others = [
        Task[None](f"copy {i}", 5, make(f"copy {i}", 0.01), frozenset({f"t{i}"}), after=[serial[0]])
        for i in range(4)
    ]
    gin = Task[None]("gin", 100, make("gin", 0.05), frozenset({"h"}), exclusive=False, after=[head])
    Schedule([before, head, *others, gin], [1, 2, 3], serial=serial).run()
    when = {(event, name): at for event, name, at in log}
    # Started before the head was ready, it goes on beside it; nothing else starts meanwhile.
    assert (
        when[("start", "copy running already")]
        < when[("start", "copy head")]
        < when[("end", "copy running already")]
    )
    for name in [*(f"copy {i}" for i in range(4)), "gin"]:
        start = when[("start", name)]
        assert not when[("start", "copy head")] <= start < when[("end", "copy head")], name
    assert when[("end", "copy head")] <= when[("start", "gin")]


def test_a_task_that_starts_its_statement_just_after_the_stop_is_stopped_again():
    """A lane's task passed its start check, then another lane failed and the stop
    (a cancel of every lane's statement) came before this task sent its statement: that
    cancel found nothing to stop, and the statement (an index build, a COPY waiting for a
    lock) would run to its end. The schedule repeats the stop while a task still runs
    (seen: `test_a_failure_in_one_lane_stops_the_others[memory]`, a lane reading a small
    table into memory before it sent its COPY into a locked table)."""
    stops: list[float] = []
    first_stop = threading.Event()
    stopped_again = threading.Event()

    def on_failure(_err: BaseException) -> None:
        stops.append(time.monotonic())
        (stopped_again if first_stop.is_set() else first_stop).set()

    def late_statement(_lane: object) -> None:
        first_stop.wait(10)  # the other lane fails first, and the stop finds this lane idle
        if not stopped_again.wait(10):  # the statement waits until something stops it
            raise AssertionError("the statement sent after the stop was never stopped")
        raise RuntimeError("canceling statement due to user request")

    def fail(_lane: object) -> None:
        time.sleep(0.05)
        raise ValueError("boom")

    slow = Task[None]("late", 10, late_statement, frozenset({"a"}))
    failing = Task[None]("fails", 1, fail, frozenset({"b"}))
    with pytest.raises(ValueError, match="boom"):
        Schedule([slow, failing], [1, 2], on_failure=on_failure).run()
    assert len(stops) >= 2
