"""The order of the schema's slices (stages.copy.predata._first): the tables other
tables' keys reference come first, with everything they depend on, and every entry
still comes after its dependencies."""

from __future__ import annotations

from stages.copy.predata import _first
from stages.dumps.archivetoc import ArchiveEntry


def entry(dump_id: int, desc: str, oid: int, *deps: int) -> ArchiveEntry:
    return ArchiveEntry(dump_id, (1259, oid), b"", desc, 2, None, None, b"public", tuple(deps))


def test_referenced_tables_and_their_dependencies_come_first_in_their_own_order():
    entries = [
        entry(1, "SCHEMA", 10),
        entry(2, "TABLE", 20, 1),  # a table the keys do not reference
        entry(3, "TYPE", 30, 1),
        entry(4, "FUNCTION", 40, 3),
        entry(5, "TABLE", 50, 1, 3),  # referenced: needs the schema and the type
        entry(6, "DEFAULT", 60, 5, 4),  # its default needs the function
        entry(7, "TABLE", 70, 5),  # inherits from it
    ]
    ordered = [e.dump_id for e in _first(entries, {50})]
    assert ordered == [1, 3, 5, 2, 4, 6, 7]
    position = {dump_id: i for i, dump_id in enumerate(ordered)}
    for e in entries:
        assert all(position[d] < position[e.dump_id] for d in e.deps), e


def test_without_referenced_tables_the_order_is_the_archives():
    entries = [entry(1, "TABLE", 10), entry(2, "TABLE", 20)]
    assert _first(entries, set()) == entries
    assert _first(entries, {999}) == entries
