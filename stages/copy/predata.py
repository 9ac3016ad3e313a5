"""The pre-data section of a schema archive in slices, restored one after another
beside the copy (stages.copy.engine.SchemaSlice): the first tables' rows stream while
the later tables are created.

A schema of thousands of tables takes seconds to create (each CREATE TABLE of a table
with a TOAST table builds and syncs an index): restored whole before the copy, every
lane waited for it. The slices are contiguous runs of the section's entries, read
from the archive's own table of contents, in an order their dependencies allow (the
archive's, but for the tables other tables' foreign keys reference, which come first:
see `schema_slices`), each restored by `pg_restore --section=pre-data --use-list`.
They grow (SLICE_FIRST, then twice the last), so the copy starts early and few
pg_restore runs are paid for. A schema of fewer than SLICE_MIN_ENTRIES entries is one
slice.
"""

from __future__ import annotations

import os
from collections.abc import Collection

from stages.connections.pgurl import SourceURL
from stages.copy.engine import SchemaSlice
from stages.dumps import toc
from stages.dumps.archivetoc import ArchiveEntry, read_toc
from stages.tools.commands import PgTools
from stages.tools.restore import restore_section

SLICE_FIRST = 100
SLICE_MIN_ENTRIES = 400
SECTION_PRE_DATA = 2  # pg_backup.h: an entry's section, as the archive records it
# Entries that define nothing an index or constraint could use: a table, and what
# only names or changes one (pg_dump sorts functions that read a table after it, and
# those are definitions).
NOT_DEFINITIONS = frozenset(
    {
        "TABLE",
        "TABLE ATTACH",
        "DEFAULT",
        "SEQUENCE",
        "SEQUENCE OWNED BY",
        "VIEW",
        "MATERIALIZED VIEW",
        "COMMENT",
        "ACL",
        "SECURITY LABEL",
    }
)


def schema_slices(
    tools: PgTools,
    target: SourceURL,
    archive: str,
    kept: list[toc.TocEntry],
    list_file: str,
    work_dir: str,
    *,
    first: Collection[int] = (),
) -> list[SchemaSlice]:
    """The pre-data entries of `kept` (whose list is `list_file`) in slices, each
    restored into `target` from `archive` (a custom archive pg_dump wrote for us) by
    its `restore()`.

    The tables of `first` (catalog oids: those other tables' foreign keys reference)
    are created first, with what they depend on, so that the keys into them, one
    after another, can start with the first tables' rows; the rest keeps the archive's
    order (`pg_restore --use-list` restores in the list's order)."""
    if len(kept) < SLICE_MIN_ENTRIES:
        return [
            SchemaSlice(
                len(kept),
                frozenset(e.catalog_id[1] for e in kept if e.desc == "TABLE"),
                lambda: restore_section(tools, target, archive, "pre-data", list_file=list_file),
            )
        ]
    lines = {e.dump_id: e for e in kept}
    entries = [e for e in read_toc(archive).entries if e.section == SECTION_PRE_DATA and e.dump_id in lines]
    entries = _first(entries, set(first))
    slices: list[SchemaSlice] = []
    start, size = 0, SLICE_FIRST
    while start < len(entries) or not slices:
        part = entries[start : start + size]
        path = os.path.join(work_dir, f"pre-data-{len(slices) + 1}.list")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(lines[e.dump_id].line + "\n" for e in part))

        def restore(path: str = path) -> None:
            restore_section(tools, target, archive, "pre-data", list_file=path)

        slices.append(
            SchemaSlice(
                len(part),
                frozenset(e.catalog_id[1] for e in part if e.desc == "TABLE"),
                restore,
                definitions=any(e.desc not in NOT_DEFINITIONS for e in part),
            )
        )
        start, size = start + size, size * 2
    return slices


def _first(entries: list[ArchiveEntry], tables: set[int]) -> list[ArchiveEntry]:
    """`entries` (in the archive's order, which their dependencies allow) with the
    tables of `tables` and everything they depend on moved to the front, each part in
    its own order: an entry's dependencies come before it in either part."""
    if not tables:
        return entries
    by_id = {e.dump_id: e for e in entries}
    wanted = {e.dump_id for e in entries if e.desc == "TABLE" and e.catalog_id[1] in tables}
    stack = list(wanted)
    while stack:
        for dep in by_id[stack.pop()].deps:
            if dep in by_id and dep not in wanted:
                wanted.add(dep)
                stack.append(dep)
    return [e for e in entries if e.dump_id in wanted] + [e for e in entries if e.dump_id not in wanted]
