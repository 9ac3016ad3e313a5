"""Taking a spare database (stages.database.spares.take) when the spare looked at is
busy: another process renamed it first, an autovacuum worker is in it (which a
database refusing connections admits), or a lock on it outlasts lock_timeout. The
taker rolls back and tries another, then gives up (the caller creates the database);
any other error is the caller's."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from stages.database import spares


class FakeCursor:
    """An admin session whose spares are `names` and whose RENAMEs fail with `errors` in turn."""

    def __init__(self, names: list[str], errors: list[type[Exception] | None]) -> None:
        self.names, self.errors = names, list(errors)
        self.statements: list[str] = []
        self.connection = type("Conn", (), {"closed": False})()
        self._rows: list[tuple[str]] = []

    def execute(self, statement, params=None) -> None:
        text = statement if isinstance(statement, str) else repr(statement)
        self.statements.append(text)
        if text.startswith("SELECT d.datname"):  # the spares: each usable, refusing connections
            self._rows = [(name, True, True) for name in self.names]
        elif text.startswith("SELECT NOT d.datallowconn"):  # still usable once renamed
            self._rows = [(True,)]
        elif "RENAME TO" in text:
            error = self.errors.pop(0) if self.errors else None
            if error is not None:
                raise error("busy")

    def fetchall(self) -> list[tuple]:
        return self._rows

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None


@pytest.mark.parametrize(
    "busy",
    [psycopg2.errors.InvalidCatalogName, psycopg2.errors.ObjectInUse, psycopg2.errors.LockNotAvailable],
)
def test_a_busy_spare_is_passed_over_for_the_next(busy):
    cur = FakeCursor(["capy_spare_a", "capy_spare_b"], [busy, None])
    assert spares.take(cur, "capy_preview_x", "capy_restore_x")
    assert cur.statements.count("ROLLBACK") == 1 and cur.statements[-1] == "COMMIT"


def test_a_taker_gives_up_after_a_few_busy_spares():
    cur = FakeCursor(["capy_spare_a"], [psycopg2.errors.ObjectInUse] * spares.TAKE_TRIES)
    assert not spares.take(cur, "capy_preview_x", None)
    assert cur.statements.count("ROLLBACK") == spares.TAKE_TRIES and "COMMIT" not in cur.statements


def test_any_other_error_is_rolled_back_and_raised():
    cur = FakeCursor(["capy_spare_a"], [psycopg2.errors.DuplicateDatabase])
    with pytest.raises(psycopg2.errors.DuplicateDatabase):
        spares.take(cur, "capy_preview_x", None)
    assert cur.statements[-1] == "ROLLBACK"


def test_no_spare_no_take():
    cur = FakeCursor([], [])
    assert not spares.take(cur, "capy_preview_x", None)
    assert not any("RENAME" in s for s in cur.statements)
