"""The hand-over gives relations over in batches that each lock a bounded number of
relations (stages.database.cluster.ClusterAdmin._reassign_in_batches), many batches in
two sessions. No database: cursors that record what they are sent."""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg2.extensions
import pytest

from stages.database.cluster import REASSIGN_LOCKS, REASSIGN_SHARED_FROM, ClusterAdmin
from stages.errors import ClusterUnavailable, TransientError


class _Cursor:
    def __init__(self, relations: list[tuple[str, str, int]]) -> None:
        self.relations = relations
        self.sent: list[str] = []
        self._rows: list[tuple] = []

    def execute(self, statement, params=None) -> None:
        text = statement if isinstance(statement, str) else statement.as_string(_Quoting())
        self.sent.append(text)
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
    return [batch.as_string(_Quoting()).split("; ") for batch in batches]


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
    first, second = _Cursor(tables), _Cursor([])
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
