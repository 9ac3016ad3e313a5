"""The hand-over gives relations over in batches that each lock a bounded number of
relations (stages.database.cluster.ClusterAdmin._reassign_in_batches). No database:
a cursor that records what it is sent."""

from __future__ import annotations

import psycopg2.extensions

from stages.database.cluster import REASSIGN_LOCKS, ClusterAdmin


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


def _alters(cursor: _Cursor) -> list[list[str]]:
    return [text.split("; ") for text in cursor.sent if text.startswith("ALTER TABLE")]


def test_statements_are_batched_by_the_relations_they_lock(monkeypatch):
    monkeypatch.setattr(psycopg2.extensions, "quote_ident", lambda name, conn: f'"{name}"', raising=False)
    tables = [("public", f"t{i}", 5) for i in range(20)] + [("public", "wide", 100), ("public", "last", 5)]
    cursor = _Cursor(tables)
    ClusterAdmin._reassign_in_batches(cursor, "capy_restore_x", "capy_prj_x")  # type: ignore[arg-type]
    batches = _alters(cursor)
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
