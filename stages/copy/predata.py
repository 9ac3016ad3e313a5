"""The pre-data section of a schema archive in slices, restored one after another
beside the copy (stages.copy.engine.SchemaSlice): the first tables' rows stream while
the later tables are created.

A schema of thousands of tables takes seconds to create (each CREATE TABLE of a table
with a TOAST table builds and syncs an index): restored whole before the copy, every
lane waited for it. The slices are contiguous runs of the section's entries in the
archive's order, which is an order their dependencies allow, each restored by
`pg_restore --section=pre-data --use-list`; they grow (SLICE_FIRST, then twice the
last), so the copy starts early and few pg_restore runs are paid for. A schema of
fewer than SLICE_MIN_ENTRIES entries is one slice, with no listing of its own.
"""

from __future__ import annotations

import os

from stages.connections.pgurl import SourceURL
from stages.copy.engine import SchemaSlice
from stages.dumps import toc
from stages.tools.commands import PgTools
from stages.tools.restore import restore_section

SLICE_FIRST = 100
SLICE_MIN_ENTRIES = 400


def schema_slices(
    tools: PgTools,
    target: SourceURL,
    archive: str,
    kept: list[toc.TocEntry],
    list_file: str,
    work_dir: str,
    *,
    encoding: str = "UTF8",
) -> list[SchemaSlice]:
    """The pre-data entries of `kept` (whose list is `list_file`) in slices, each
    restored into `target` from `archive` by its `restore()`."""
    if len(kept) < SLICE_MIN_ENTRIES:
        return [
            SchemaSlice(
                len(kept),
                frozenset(e.catalog_id[1] for e in kept if e.desc == "TABLE"),
                lambda: restore_section(tools, target, archive, "pre-data", list_file=list_file),
            )
        ]
    wanted = {e.dump_id for e in kept}
    entries = [
        e for e in toc.read(tools, archive, encoding=encoding, section="pre-data") if e.dump_id in wanted
    ]
    slices: list[SchemaSlice] = []
    start, size = 0, SLICE_FIRST
    while start < len(entries) or not slices:
        part = entries[start : start + size]
        path = os.path.join(work_dir, f"pre-data-{len(slices) + 1}.list")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(e.line + "\n" for e in part))

        def restore(path: str = path) -> None:
            restore_section(tools, target, archive, "pre-data", list_file=path)

        slices.append(
            SchemaSlice(len(part), frozenset(e.catalog_id[1] for e in part if e.desc == "TABLE"), restore)
        )
        start, size = start + size, size * 2
    return slices
