"""The pre-data section of a schema archive in slices, restored one after another
beside the copy (stages.copy.engine.SchemaPlan): the first tables' rows stream while
the later tables are created.

A schema of thousands of tables takes seconds to create (each CREATE TABLE of a table
with a TOAST table builds and syncs an index): restored whole before the copy, every
lane waited for it. The slices are contiguous runs of the section's entries, read from
the archive's own table of contents, in an order their dependencies allow (`_order`:
the archive's, but the tables other tables' foreign keys reference first, and each
table followed at once by what depends on it), each restored by `pg_restore
--use-list` of exactly its entries. They grow (SLICE_FIRST, then twice the last), so
the copy starts early and few pg_restore runs are paid for. What each table's copy and
each later entry waits for is in `schema_slices`. A schema of fewer than
SLICE_MIN_ENTRIES entries is one slice.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterator

from stages.connections.pgurl import SourceURL
from stages.copy.engine import SchemaPlan, SchemaSlice
from stages.dumps import toc
from stages.dumps.archivetoc import ArchiveEntry
from stages.tools.commands import PgTools
from stages.tools.restore import restore_section

SLICE_FIRST = 100
SLICE_MIN_ENTRIES = 400
SECTION_NONE, SECTION_PRE_DATA = 1, 2  # pg_backup.h: an entry's section, as the archive records it


def schema_slices(
    tools: PgTools,
    target: SourceURL,
    archive: str,
    kept: list[toc.TocEntry],
    list_file: str,
    work_dir: str,
    *,
    archived: list[ArchiveEntry],
    first: Collection[int] = (),
) -> SchemaPlan:
    """The pre-data entries of `kept` (whose list is `list_file`) in slices, each
    restored into `target` from `archive` (a custom archive pg_dump wrote for us, whose
    table of contents is `archived`: stages.dumps.archivetoc.read_toc) by
    its `restore()`, in an order their dependencies allow (`_order`), and which slice
    each copied table and each other entry of `kept` waits for:

    - a table, the last slice holding an entry that depends on it: a view over it, a
      column default set after it, a partition attached to it. Such an entry locks the
      table, and would wait for the table's whole copy (holding every later slice);
    - a table that depends on a function (a CHECK, a domain, a generated column calls
      one, whose body may read any table), the last slice;
    - any other entry, the last slice holding an entry it depends on, directly or
      through entries outside the slices (`_needs`)."""
    if len(kept) < SLICE_MIN_ENTRIES:
        whole = SchemaSlice(
            len(kept), lambda: restore_section(tools, target, archive, "pre-data", list_file=list_file)
        )
        return SchemaPlan([whole], {e.catalog_id[1]: 0 for e in kept if e.desc == "TABLE"})
    lines = {e.dump_id: e for e in kept}
    pre_data = [e for e, section in _sections(archived) if section == SECTION_PRE_DATA and e.dump_id in lines]
    entries = _order(pre_data, set(first))
    slices: list[SchemaSlice] = []
    in_slice: dict[int, int] = {}
    start, size = 0, SLICE_FIRST
    while start < len(entries) or not slices:
        part = entries[start : start + size]
        path = os.path.join(work_dir, f"pre-data-{len(slices) + 1}.list")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(lines[e.dump_id].line + "\n" for e in part))

        def restore(path: str = path) -> None:
            restore_section(tools, target, archive, "pre-data", list_file=path, listed_only=True)

        in_slice.update((e.dump_id, len(slices)) for e in part)
        slices.append(SchemaSlice(len(part), restore))
        start, size = start + size, size * 2
    return SchemaPlan(
        slices, _table_waits(entries, in_slice, len(slices) - 1), _needs(archived, in_slice, set(lines))
    )


FUNCTIONS = frozenset({"FUNCTION", "PROCEDURE", "AGGREGATE"})


def _dependents(entries: list[ArchiveEntry], by_id: dict[int, ArchiveEntry]) -> dict[int, list[int]]:
    """For each entry of `by_id`, the entries that depend on it directly, in order."""
    dependents: dict[int, list[int]] = {}
    for entry in entries:
        for dep in entry.deps:
            if dep in by_id:
                dependents.setdefault(dep, []).append(entry.dump_id)
    return dependents


def _sections(archived: list[ArchiveEntry]) -> list[tuple[ArchiveEntry, int]]:
    """Each entry with its section as pg_restore counts it: one of no section (a
    comment, a security label) is in the section of the last entry before it that has one."""
    current, counted = SECTION_PRE_DATA, []
    for entry in archived:
        if entry.section != SECTION_NONE:
            current = entry.section
        counted.append((entry, current))
    return counted


def _table_waits(entries: list[ArchiveEntry], in_slice: dict[int, int], last: int) -> dict[int, int]:
    """The slice each table's copy waits for (see `schema_slices`), by catalog oid;
    `entries` in the slices' order, which puts every entry after its dependencies."""
    by_id = {e.dump_id: e for e in entries}
    dependents = _dependents(entries, by_id)
    latest: dict[int, int] = {}  # the last slice holding the entry or anything depending on it
    for entry in reversed(entries):
        latest[entry.dump_id] = max(
            [
                in_slice[entry.dump_id],
                *(latest.get(d, in_slice[d]) for d in dependents.get(entry.dump_id, [])),
            ]
        )
    calls: dict[int, bool] = {}  # whether the entry depends on a function
    for entry in entries:
        calls[entry.dump_id] = entry.desc in FUNCTIONS or any(calls.get(d, False) for d in entry.deps)
    waits = {e.dump_id: last if calls[e.dump_id] else latest[e.dump_id] for e in entries if e.desc == "TABLE"}
    # Attaching a partition locks its parent's default partition and every partition
    # under that (it scans them): a table of a partition tree waits for the last slice
    # holding anything of the tree.
    parent: dict[int, int] = {}
    for entry in entries:
        if entry.desc == "TABLE ATTACH":
            tables = list(dict.fromkeys(d for d in entry.deps if d in waits))  # a dependency may repeat
            if len(tables) == 2:
                # The partition is the one that depends on the other (its parent).
                child = next(
                    (t for t in tables if any(d in tables and d != t for d in by_id[t].deps)), tables[1]
                )
                parent[child] = next(t for t in tables if t != child)

    def root(table: int) -> int:
        seen = {table}
        while table in parent and parent[table] not in seen:
            table = parent[table]
            seen.add(table)
        return table

    trees: dict[int, int] = {}  # root -> the last slice holding anything of its tree
    for table in parent:
        top = root(table)
        trees[top] = max(trees.get(top, latest[top]), latest[table])
    for table in waits:
        top = root(table)
        if top in trees:
            waits[table] = max(waits[table], trees[top])
    return {by_id[dump_id].catalog_id[1]: wait for dump_id, wait in waits.items()}


def _order(entries: list[ArchiveEntry], first: set[int]) -> list[ArchiveEntry]:
    """`entries` (the archive's order, which their dependencies allow) reordered, still
    each after its dependencies: the tables of `first` (that foreign keys reference)
    with what they depend on at the front; then the archive's order, but each table
    followed at once by what depends on it (and what that needs): a column default,
    a sequence it owns, a comment, a view over it. pg_dump puts all the defaults after
    all the tables, and a default would otherwise hold its table's copy to the end."""
    entries = _with_cast_dependencies(entries)
    by_id = {e.dump_id: e for e in entries}
    position = {e.dump_id: i for i, e in enumerate(entries)}
    dependents = _dependents(entries, by_id)
    done: set[int] = set()
    ordered: list[ArchiveEntry] = []
    tables: list[int] = []

    def needed(dump_id: int) -> Iterator[int]:
        """What the entry depends on among `entries`, in the archive's order."""
        return iter(sorted((d for d in by_id[dump_id].deps if d in by_id), key=position.__getitem__))

    def emit(dump_id: int) -> None:
        """The entry, after what it needs that is not out yet: depth first, each
        entry's dependencies in the archive's order. (A loop, which pg_dump does not
        write, ends where it closes.)"""
        if dump_id in done:
            return
        on_path = {dump_id}
        stack = [(dump_id, needed(dump_id))]
        while stack:
            top, deps = stack[-1]
            for dep in deps:
                if dep not in done and dep not in on_path:
                    on_path.add(dep)
                    stack.append((dep, needed(dep)))
                    break
            else:
                stack.pop()
                on_path.discard(top)
                done.add(top)
                ordered.append(by_id[top])
                if by_id[top].desc == "TABLE":
                    tables.append(top)

    def emit_with_dependents(dump_id: int) -> None:
        emit(dump_id)
        while tables:  # each table out, then what depends on it
            for dependent in dependents.get(tables.pop(), []):
                if dependent not in done:
                    emit(dependent)

    # What pg_dump puts before every table (types, functions, casts, operators…) stays
    # there, in its order: a cast is used where its function is, not where it is named.
    first_table = next((i for i, e in enumerate(entries) if e.desc == "TABLE"), len(entries))
    for entry in entries[:first_table]:
        emit(entry.dump_id)
    for entry in entries:
        if entry.desc == "TABLE" and entry.catalog_id[1] in first and entry.dump_id not in done:
            emit_with_dependents(entry.dump_id)
    for entry in entries:
        if entry.dump_id not in done:
            emit_with_dependents(entry.dump_id)
    return ordered


# Objects a statement uses without naming them, so that the archive records a
# dependency on their function, not on them: a cast (`x::t`) and a transform.
IMPLICIT = frozenset({"CAST", "TRANSFORM"})


def _with_cast_dependencies(entries: list[ArchiveEntry]) -> list[ArchiveEntry]:
    """`entries`, each that depends on a cast's (or transform's) function also depending
    on the cast: a view that casts records its dependency on the function only."""
    functions = {e.dump_id for e in entries if e.desc in FUNCTIONS}
    implicit: dict[int, list[int]] = {}  # function -> the casts made with it
    for entry in entries:
        if entry.desc in IMPLICIT:
            for dep in entry.deps:
                if dep in functions:
                    implicit.setdefault(dep, []).append(entry.dump_id)
    if not implicit:
        return entries
    position = {e.dump_id: i for i, e in enumerate(entries)}
    changed = []
    for entry in entries:
        # Only on a cast before it in the archive: an order it allowed stays allowed, no loop is made.
        extra = [
            c
            for dep in entry.deps
            for c in implicit.get(dep, [])
            if position[c] < position[entry.dump_id] and c not in entry.deps
        ]
        changed.append(
            dataclasses.replace(entry, deps=(*entry.deps, *dict.fromkeys(extra))) if extra else entry
        )
    return changed


def _needs(archived: list[ArchiveEntry], in_slice: dict[int, int], kept: set[int]) -> dict[int, int]:
    """For each kept entry outside the slices, the last slice holding an entry it
    depends on, directly or through entries outside the slices (an index's function,
    a foreign key's table); 0 when it depends on none."""
    by_id = {e.dump_id: e for e in archived}
    needs: dict[int, int] = {}

    def need(root: int) -> None:
        # Depth first, iterative: a long chain of dependencies must not exhaust the
        # stack. (A loop, which pg_dump does not write, ends where it closes.)
        on_path = {root}
        stack = [(root, iter(by_id[root].deps))]
        while stack:
            top, deps = stack[-1]
            for dep in deps:
                if dep in by_id and dep not in in_slice and dep not in needs and dep not in on_path:
                    on_path.add(dep)
                    stack.append((dep, iter(by_id[dep].deps)))
                    break
            else:
                stack.pop()
                on_path.discard(top)
                needs[top] = max(
                    (
                        in_slice[d] if d in in_slice else needs.get(d, 0)
                        for d in by_id[top].deps
                        if d in by_id
                    ),
                    default=0,
                )

    for entry in archived:
        if entry.dump_id in kept and entry.dump_id not in in_slice:
            need(entry.dump_id)
    return {dump_id: slice_number for dump_id, slice_number in needs.items() if dump_id in kept}
