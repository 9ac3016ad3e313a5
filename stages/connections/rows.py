"""Reading the row of a query that always returns exactly one (an aggregate, a function)."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions


class NoRow(LookupError):
    """A query that always returns one row returned none."""


def one_row(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    """The row the last query on `cur` returned; `NoRow` if there was none."""
    row = cur.fetchone()
    if row is None:
        raise NoRow(NoRow.__doc__)
    return row
