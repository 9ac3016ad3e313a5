"""Foreign keys of small tables into one table are added a few to a transaction
(stages.copy.engine.KEY_BATCH): runs of consecutive keys in the order they can start,
each run one task after what each of its keys waited for; a larger table's key alone."""

from __future__ import annotations

import pytest

import stages.copy.engine as engine
from stages.copy.catalog import Owned
from stages.copy.engine import CopyProgress, _ForeignKey, _key_batches, _key_task, chain_serial
from stages.copy.postdata import Block
from stages.copy.scheduler import Task, rank
from stages.copy.stream import SourceTable
from stages.dumps.toc import TocEntry

PARENT = SourceTable("public.parent", "public", "parent", ("id",), 4 << 20, oid=1)


def _table(oid: int, size: int) -> SourceTable:
    return SourceTable(f"public.t{oid}", "public", f"t{oid}", ("id", "parent_id"), size, oid=oid)


def _key(table: SourceTable, ready: Task[None]) -> _ForeignKey:
    name = f"{table.name} fk"
    entry = TocEntry(
        f"{table.oid}; 2606 {table.oid} FK CONSTRAINT public {name}",
        table.oid,
        "FK CONSTRAINT",
        "public",
        name,
    )
    sql = f"ALTER TABLE ONLY public.{table.name}\n    ADD CONSTRAINT fk FOREIGN KEY (parent_id) REFERENCES public.parent(id);\n"
    return _ForeignKey(
        Block(entry, sql), Owned(table.oid, "foreign key", references=PARENT.oid), 1.0, [ready]
    )


def _builds(cost: float) -> Task[None]:
    return Task[None](f"builds {cost}", cost, lambda _lane: None)


def test_keys_of_small_tables_run_in_batches_in_the_order_they_can_start(monkeypatch):
    monkeypatch.setattr(engine, "KEY_BATCH", 3)
    small = [_table(10 + i, 1000) for i in range(7)]
    big = _table(99, engine.SMALL_TABLE_BYTES)
    # Ready soonest first: t16, t15, t14, the big table, t13, t12, t11, t10.
    keys = [_key(t, _builds(100 - 10 * i)) for i, t in enumerate(small)]
    keys.append(_key(big, _builds(65)))
    by_table = {t.oid: t for t in [*small, big, PARENT]}
    batches = engine._key_batches(keys, by_table, {})
    assert [[key.owned.table for key in batch] for batch in batches] == [
        [16, 15, 14],
        [99],  # the big table's key, ready between t14's and t13's, alone
        [13, 12, 11],  # a run starts again after it, KEY_BATCH at most
        [10],
    ]


def test_a_batch_is_one_statement_string_after_every_key_s_predecessors_and_locks_them_all():
    tables = [_table(10 + i, 1000) for i in range(3)]
    waits = [_builds(5 + i) for i in range(3)]
    batch = [_key(t, w) for t, w in zip(tables, waits, strict=True)]
    sent: list[str] = []

    class Cursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, statement):
            sent.append(statement)

    class Target:
        def cursor(self):
            return Cursor()

        def commit(self):
            sent.append("COMMIT")

    class Lane:
        target = Target()

    by_table = {t.oid: t for t in [*tables, PARENT]}
    task = _key_task(batch, by_table, CopyProgress(3, 0))
    assert task.after == waits
    assert task.tables == engine.table_locks(PARENT.oid, 10, 11, 12)
    assert task.cost == 3.0
    task.run(Lane())
    assert sent == [key.block.sql for key in batch] + ["COMMIT"]  # one transaction, a statement per key


def test_what_a_key_task_says_it_creates(monkeypatch):
    said: list[str] = []

    def recording(original):
        def record(statement, what, **options):
            said.append(what)
            return original(statement, what, **options)

        return record

    # Every build runs through it (`_execute` is one statement's `_execute_together`).
    monkeypatch.setattr(engine, "_execute_together", recording(engine._execute_together))
    tables = [_table(10 + i, 1000) for i in range(5)]
    by_table = {t.oid: t for t in [*tables, PARENT]}
    keys = [_key(t, _builds(1.0)) for t in tables]
    alone = _key_task(keys[:1], by_table, CopyProgress(1, 0))
    _key_task(keys[:2], by_table, CopyProgress(2, 0))
    _key_task(keys, by_table, CopyProgress(5, 0))
    assert alone.name == "foreign key t10 fk" and alone.tables == engine.table_locks(10, PARENT.oid)
    assert said == [
        "foreign key t10 fk",
        "2 foreign keys into table public.parent",
        "5 foreign keys into table public.parent",
    ]


def test_a_batch_waits_for_every_key_s_tables_and_the_chain_keeps_its_rank():
    tables = [_table(10 + i, 1000) for i in range(4)]
    builds = [_builds(40 - 10 * i) for i in range(4)]
    keys = [_key(t, b) for t, b in zip(tables, builds, strict=True)]
    by_table = {t.oid: t for t in [*tables, PARENT]}
    chain = [_key_task(batch, by_table, CopyProgress(4, 0)) for batch in _key_batches(keys, by_table, {})]
    chain_serial(chain)
    rank([*builds, *chain])
    assert len(chain) == 1 and chain[0].rank == 4.0
    assert sorted(map(id, chain[0].after)) == sorted(map(id, builds))


@pytest.mark.parametrize("count", [1, engine.KEY_BATCH, engine.KEY_BATCH + 1, 3 * engine.KEY_BATCH])
def test_no_batch_is_longer_than_key_batch_and_every_key_is_in_one(count):
    tables = [_table(10 + i, 1000) for i in range(count)]
    keys = [_key(t, _builds(float(i))) for i, t in enumerate(tables)]
    batches = _key_batches(keys, {t.oid: t for t in [*tables, PARENT]}, {})
    assert all(1 <= len(batch) <= engine.KEY_BATCH for batch in batches)
    assert sorted(key.owned.table for batch in batches for key in batch) == [t.oid for t in tables]


def test_a_batch_locks_no_more_than_key_batch_locks_relations():
    """Each key's check locks its table and that table's indexes until the transaction
    ends, and the referenced table's once: a batch stops short of KEY_BATCH_LOCKS."""
    tables = [_table(10 + i, 1000) for i in range(10)]
    keys = [_key(t, _builds(float(i))) for i, t in enumerate(tables)]
    by_table = {t.oid: t for t in [*tables, PARENT]}
    relations = {PARENT.oid: 4, **{t.oid: 20 for t in tables}}  # each child with 19 indexes
    batches = _key_batches(keys, by_table, relations)
    assert [len(batch) for batch in batches] == [3, 3, 3, 1]  # 4 + 3 × 20 = 64
    relations[10] = 200  # more than a batch may hold: that key goes alone
    assert [len(batch) for batch in _key_batches(keys, by_table, relations)][:2] == [1, 3]
