"""The schema's slices (stages.copy.predata): their order (`_order`), what each table's
copy waits for (`_table_waits`) and what every other entry waits for (`_needs`). Every
entry stays after its dependencies."""

from __future__ import annotations

from stages.copy.predata import _order, _table_waits
from stages.dumps.archivetoc import ArchiveEntry


def entry(dump_id: int, desc: str, oid: int, *deps: int) -> ArchiveEntry:
    return ArchiveEntry(dump_id, (1259, oid), b"", desc, 2, None, None, b"public", tuple(deps))


def assert_dependencies_first(ordered: list[ArchiveEntry]) -> None:
    position = {e.dump_id: i for i, e in enumerate(ordered)}
    for e in ordered:
        assert all(position[d] < position[e.dump_id] for d in e.deps if d in position), e


def test_referenced_tables_come_first_with_what_they_need_and_what_depends_on_them():
    entries = [
        entry(1, "SCHEMA", 10),
        entry(2, "TABLE", 20, 1),  # a table the keys do not reference
        entry(3, "TYPE", 30, 1),
        entry(4, "FUNCTION", 40, 3),
        entry(5, "TABLE", 50, 1, 3),  # referenced: needs the schema and the type
        entry(6, "DEFAULT", 60, 5, 4),  # its default needs the function
        entry(7, "TABLE", 70, 5),  # inherits from it
    ]
    ordered = _order(entries, {50})
    assert [e.dump_id for e in ordered] == [1, 3, 5, 4, 6, 7, 2]
    assert_dependencies_first(ordered)


def test_each_table_is_followed_by_its_default_and_the_sequence_it_needs():
    """pg_dump writes every table, then every sequence and default: in that order a
    table's default would come in the last slice, and hold the table's copy there."""
    entries = [
        entry(1, "TABLE", 10),
        entry(2, "TABLE", 20),
        entry(3, "SEQUENCE", 30),
        entry(4, "SEQUENCE", 40),
        entry(5, "DEFAULT", 50, 1, 3),
        entry(6, "DEFAULT", 60, 2, 4),
        entry(7, "VIEW", 70, 1, 2),
    ]
    ordered = _order(entries, set())
    # The view over both pulls table 2 forward, and table 2 its default.
    assert [e.dump_id for e in ordered] == [1, 3, 5, 2, 7, 4, 6]
    assert_dependencies_first(ordered)
    assert _order(entries[:2], set()) == entries[:2]


def test_a_table_waits_for_the_last_slice_holding_what_depends_on_it_or_the_last_if_it_calls_a_function():
    entries = [
        entry(1, "TABLE", 10),
        entry(2, "FUNCTION", 20),
        entry(3, "TABLE", 30, 2),  # a CHECK calls the function
        entry(4, "TABLE", 40),
        entry(5, "VIEW", 50, 1),
        entry(6, "VIEW", 60, 5),  # over the view over table 1
        entry(7, "TABLE", 70),
    ]
    in_slice = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 3}
    waits = _table_waits(entries, in_slice, last=4)
    assert waits == {10: 3, 30: 4, 40: 1, 70: 3}


def test_each_entry_outside_the_slices_waits_for_the_last_slice_it_depends_on():
    """Directly, or through entries outside the slices (a foreign key through the key
    it references); a dependency shared by two paths counts on both; a loop ends."""
    from stages.copy.predata import _needs

    archived = [
        entry(1, "TABLE", 10),  # slice 0
        entry(2, "TABLE", 20),  # slice 1
        entry(3, "FUNCTION", 30, 2),  # slice 2: reads table 2's rows
        entry(4, "INDEX", 40, 1, 3),  # on table 1, calls the function
        entry(5, "CONSTRAINT", 50, 2),  # table 2's key
        entry(6, "FK CONSTRAINT", 60, 1, 5),  # table 1 -> table 2, through its key
        entry(7, "INDEX", 70, 8),  # a loop (pg_dump writes none): 7 -> 8 -> 7
        entry(8, "INDEX", 80, 7, 1),
        entry(9, "TRIGGER", 90, 4, 6),  # a diamond: both paths
    ]
    in_slice = {1: 0, 2: 1, 3: 2}
    needs = _needs(archived, in_slice, {e.dump_id for e in archived})
    assert needs[4] == 2 and needs[5] == 1 and needs[6] == 1 and needs[9] == 2
    assert needs[7] == 0 and needs[8] == 0
    assert set(needs) == {4, 5, 6, 7, 8, 9}


def test_what_uses_a_casts_function_comes_after_the_cast_too():
    """A view that casts records a dependency on the cast's function, not on the cast:
    moved forward with the table it reads, it must still come after the cast."""
    entries = [
        entry(1, "TYPE", 10),
        entry(2, "FUNCTION", 20, 1),
        entry(3, "CAST", 30, 2, 1),
        entry(4, "TABLE", 40),
        entry(5, "TABLE", 50),
        entry(6, "VIEW", 60, 5, 2, 1),  # over the referenced table, casting
    ]
    ordered = _order(entries, {50})
    ids = [e.dump_id for e in ordered]
    assert ids.index(3) < ids.index(6)
    assert_dependencies_first(ordered)
    assert next(e for e in ordered if e.dump_id == 2).deps == (1,)  # the function does not wait for its cast


def test_every_partition_waits_for_the_last_attachment_to_its_parent():
    """Attaching a partition locks its parent's default partition: none of the
    partitions loads before the last slice attaching one is in."""
    entries = [
        entry(1, "TABLE", 10),  # partitioned
        entry(2, "TABLE", 20, 1),
        entry(3, "TABLE", 30, 1),  # the default partition
        entry(4, "TABLE", 40, 1),
        entry(5, "TABLE ATTACH", 50, 1, 2),
        entry(6, "TABLE ATTACH", 60, 1, 3),
        entry(7, "TABLE ATTACH", 70, 1, 4),
        entry(8, "TABLE", 80),
    ]
    in_slice = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 3, 8: 3}
    waits = _table_waits(entries, in_slice, last=3)
    assert waits == {10: 3, 20: 3, 30: 3, 40: 3, 80: 3}
    in_slice = {**in_slice, 7: 2, 8: 3}
    assert _table_waits(entries, in_slice, last=3) == {10: 2, 20: 2, 30: 2, 40: 2, 80: 3}


def test_an_entry_of_no_section_counts_in_the_section_before_it():
    """As pg_restore counts them: a comment on a table is pre-data, one on an index post-data."""
    from stages.copy.predata import _sections

    entries = [
        ArchiveEntry(1, (0, 1), b"", "TABLE", 2, None, None, None, ()),
        ArchiveEntry(2, (0, 2), b"", "COMMENT", 1, None, None, None, (1,)),
        ArchiveEntry(3, (0, 3), b"", "INDEX", 4, None, None, None, (1,)),
        ArchiveEntry(4, (0, 4), b"", "COMMENT", 1, None, None, None, (3,)),
    ]
    assert [section for _e, section in _sections(entries)] == [2, 2, 4, 4]


def test_every_table_of_a_partition_tree_waits_for_the_last_slice_of_the_tree():
    """Attaching a partition to the root locks the root's default partition and every
    leaf under it: a leaf of a partitioned default partition waits for that attach."""
    entries = [
        entry(1, "TABLE", 10),  # the root
        entry(2, "TABLE", 20, 1),  # its default partition, itself partitioned
        entry(3, "TABLE", 30, 2),  # a leaf under it
        entry(6, "TABLE ATTACH", 60, 2, 3),
        entry(5, "TABLE ATTACH", 50, 1, 2),
        entry(4, "TABLE", 40, 1),
        entry(7, "TABLE ATTACH", 70, 1, 4),  # locks 2 and 3
        entry(8, "TABLE", 80),
    ]
    in_slice = {1: 0, 2: 0, 3: 1, 6: 1, 5: 1, 4: 2, 7: 3, 8: 3}
    assert _table_waits(entries, in_slice, last=3) == {10: 3, 20: 3, 30: 3, 40: 3, 80: 3}
