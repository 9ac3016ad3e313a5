"""stages.connections.rows.one_row: the row of a query that always returns one."""

from __future__ import annotations

import pytest

from stages.connections.rows import NoRow, one_row


class Cursor:
    """What one_row reads of a psycopg2 cursor: the next row, or None past the last."""

    def __init__(self, *rows: tuple[object, ...]) -> None:
        self.rows = list(rows)

    def fetchone(self) -> tuple[object, ...] | None:
        return self.rows.pop(0) if self.rows else None


def test_the_row_is_returned():
    assert one_row(Cursor((3, "x"))) == (3, "x")


def test_no_row_is_an_error_that_says_so():
    with pytest.raises(NoRow, match="returned none"):
        one_row(Cursor())
