"""The hand-over gives relations over in batches that each lock a bounded number of
relations (stages.database.cluster.ClusterAdmin._reassign_in_batches), many batches in
two sessions. No database: cursors that record what they are sent."""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg2.extensions
import pytest

from stages.database.cluster import (
    REASSIGN_LOCKS,
    REASSIGN_SESSIONS,
    REASSIGN_SHARED_FROM,
    ClusterAdmin,
    _Batch,
    _SharedBatches,
)
from stages.errors import ClusterUnavailable, TransientError


class _Cursor:
    """Records what it is sent; each ALTER takes `pause` seconds (a real one takes some)."""

    def __init__(self, relations: list[tuple[str, str, int]], pause: float = 0.0) -> None:
        self.relations = relations
        self.pause = pause
        self.sent: list[str] = []
        self._rows: list[tuple] = []

    def execute(self, statement, params=None) -> None:
        text = statement if isinstance(statement, str) else statement.as_string(_Quoting())
        self.sent.append(text)
        if self.pause and text.startswith("ALTER "):
            time.sleep(self.pause)
        self._rows = list(self.relations) if "relname" in text and "pg_class" in text else []

    def fetchall(self) -> list[tuple]:
        return self._rows


class _Quoting:
    """What sql.Composable.as_string needs of a connection (Identifier quoting only)."""

    encoding = "UTF8"

    def __getattr__(self, name):
        raise AttributeError(name)


def _alters(
    cursor: _Cursor, from_role: str = "capy_restore_x", to_role: str = "capy_prj_x"
) -> list[list[str]]:
    batches = ClusterAdmin._reassign_batches(cursor, from_role, to_role)  # type: ignore[arg-type]
    return [batch.statements.as_string(_Quoting()).split("; ") for batch in batches]


def test_statements_are_batched_by_the_relations_they_lock(monkeypatch):
    monkeypatch.setattr(psycopg2.extensions, "quote_ident", lambda name, conn: f'"{name}"', raising=False)
    tables = [("public", f"t{i}", 5) for i in range(20)] + [("public", "wide", 100), ("public", "last", 5)]
    batches = _alters(_Cursor(tables))
    # Every table once, in order.
    names = [
        statement.split(" OWNER")[0].split(".")[-1].strip('"') for batch in batches for statement in batch
    ]
    assert names == [name for _schema, name, _locks in tables]
    locks = {name: count for _schema, name, count in tables}
    for batch in batches:
        held = sum(locks[s.split(" OWNER")[0].split(".")[-1].strip('"')] for s in batch)
        assert held <= REASSIGN_LOCKS or len(batch) == 1, batch
    # A table locking more than a batch goes alone; the others share round trips.
    assert ["wide" in s for s in next(b for b in batches if any("wide" in s for s in b))] == [True]
    assert len(batches) < len(tables) / 4


class _Admin(ClusterAdmin):
    """A cluster whose second sessions are recording cursors (or fail to open)."""

    def __init__(self, *, second: _Cursor | None) -> None:
        super().__init__("postgresql://admin@db.invalid/postgres")
        self.second = second

    @contextlib.contextmanager
    def autocommit(self, dbname=None):
        if self.second is None:
            raise ClusterUnavailable("the project's cluster has no connection left")
        yield self.second


def _statements(cursor: _Cursor) -> list[str]:
    return [s for text in cursor.sent if text.startswith("ALTER ") for s in text.split("; ")]


@pytest.fixture
def quoting(monkeypatch):
    monkeypatch.setattr(psycopg2.extensions, "quote_ident", lambda name, conn: f'"{name}"', raising=False)


def test_many_batches_are_shared_by_two_sessions_each_given_once(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM * 4)]
    first, second = _Cursor(tables, pause=0.002), _Cursor([], pause=0.002)
    _Admin(second=second)._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    given = _statements(first) + _statements(second)
    assert sorted(given) == sorted(
        f'ALTER TABLE "public"."{name}" OWNER TO "capy_prj_x"' for _s, name, _l in tables
    )
    assert _statements(second), "the second session took no batch"
    assert "SET synchronous_commit = off" in second.sent


def test_few_batches_stay_in_one_session(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM - 1)]
    first, second = _Cursor(tables), _Cursor([])
    _Admin(second=second)._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    assert len(_statements(first)) == len(tables) and second.sent == []


def test_without_a_second_session_the_first_takes_every_batch(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM * 2)]
    first = _Cursor(tables)
    _Admin(second=None)._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    assert len(_statements(first)) == len(tables)


class _Failing(_Cursor):
    """A session whose first ALTER fails, once the other session has given one batch."""

    def __init__(self, took: threading.Event, raised: threading.Event) -> None:
        super().__init__([])
        self.took, self.raised = took, raised

    def execute(self, statement, params=None) -> None:
        super().execute(statement, params)
        if self.sent[-1].startswith("ALTER "):
            self.took.wait(5)
            self.raised.set()
            raise TransientError("another session holds a lock")


class _Taking(_Cursor):
    """A session that gives its first batch at once and each later one after the other
    session's error (and a moment in which the other thread runs: a fake statement
    holds no lock, so without it this thread could give every batch first)."""

    def __init__(self, relations, took: threading.Event, raised: threading.Event) -> None:
        super().__init__(relations)
        self.took, self.raised = took, raised

    def execute(self, statement, params=None) -> None:
        super().execute(statement, params)
        if self.sent[-1].startswith("ALTER "):
            if self.took.is_set():
                self.raised.wait(5)
                time.sleep(0.01)
            self.took.set()


def test_the_first_error_stops_both_sessions_and_is_raised(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM * 8)]
    took, raised = threading.Event(), threading.Event()
    first, second = _Taking(tables, took, raised), _Failing(took, raised)
    with pytest.raises(TransientError, match="another session holds a lock"):
        _Admin(second=second)._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    # The other session stopped taking batches: far from every table was given.
    assert len(_statements(first)) < 8 and len(_statements(second)) == 1
    # Nothing after the error: no large objects given in a hand-over that failed.
    assert not any("largeobject" in text for text in first.sent)


class _Stopping(_Cursor):
    """The first session: its second ALTER fails as a time limit does (a BaseException
    raised in its thread), once the other session is running a batch."""

    def __init__(self, relations, other_running: threading.Event) -> None:
        super().__init__(relations)
        self.other_running, self.alters = other_running, 0

    def execute(self, statement, params=None) -> None:
        super().execute(statement, params)
        if self.sent[-1].startswith("ALTER "):
            self.alters += 1
            if self.alters == 2:
                self.other_running.wait(5)
                raise _TimeLimit


class _TimeLimit(BaseException):
    pass


class _Slow(_Cursor):
    """A second session whose batches take a moment each."""

    def __init__(self, running: threading.Event) -> None:
        super().__init__([])
        self.running = running

    def execute(self, statement, params=None) -> None:
        super().execute(statement, params)
        if self.sent[-1].startswith("ALTER "):
            self.running.set()
            time.sleep(0.02)


def _hand_over_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hand-over" and t.is_alive()]


def test_a_time_limit_in_the_first_session_stops_the_other_before_it_is_raised(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM * 8)]
    running = threading.Event()
    first, second = _Stopping(tables, running), _Slow(running)
    with pytest.raises(_TimeLimit):
        _Admin(second=second)._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    # Raised only once the other session had stopped: it gave no batch after that.
    given = len(_statements(second))
    assert not _hand_over_threads()
    time.sleep(0.1)
    assert len(_statements(second)) == given < len(tables) - 2


class _SetFails(_Cursor):
    def execute(self, statement, params=None) -> None:
        super().execute(statement, params)
        raise psycopg2.OperationalError("server closed the connection unexpectedly")


def test_a_second_session_that_fails_its_first_statement_leaves_the_batches_to_the_first(quoting):
    tables = [("public", f"t{i}", REASSIGN_LOCKS) for i in range(REASSIGN_SHARED_FROM * 2)]
    first = _Cursor(tables)
    _Admin(second=_SetFails([]))._reassign_in_batches(first, "capy_preview_x", "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    assert len(_statements(first)) == len(tables)


class _Counting:
    """A session that records the locks held by the batches running while it runs one."""

    def __init__(self, shared: _SharedBatches, seen: list[tuple[int, int]]) -> None:
        self.shared, self.seen = shared, seen

    def execute(self, statements, params=None) -> None:
        time.sleep(0.005)  # a batch takes a moment: the other session's may start meanwhile
        with self.shared.turns:
            self.seen.append((int(statements), self.shared.held))


def test_batches_running_at_once_stay_within_the_lock_budget_or_run_alone():
    budget = REASSIGN_SESSIONS * REASSIGN_LOCKS
    sizes = [REASSIGN_LOCKS, 3 * REASSIGN_LOCKS, REASSIGN_LOCKS // 2, REASSIGN_LOCKS, 5 * REASSIGN_LOCKS] * 6
    # A batch's "statements" are its size here, so the session can tell which one runs.
    shared = _SharedBatches([_Batch(size, size) for size in sizes], budget)  # type: ignore[arg-type]
    seen: list[tuple[int, int]] = []
    threads = [threading.Thread(target=shared.take, args=(_Counting(shared, seen),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(size for size, _held in seen) == sorted(sizes)
    for size, held in seen:
        assert held <= budget or held == size, (size, held)
    # Within the budget, two batches did run at once.
    assert any(held > size for size, held in seen)
