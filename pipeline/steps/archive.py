"""The restore of an uploaded custom or tar archive, on the copy engine (called by
pipeline.steps.upload once the archive, or a custom archive's table of contents, is in
this stage's folder).

As for a live source (pipeline.steps.live): the pre-data section is restored by
pg_restore as the restore role; then the copy engine's lanes stream each table's rows
out of the archive (`pg_restore --data-only --file=-`, stages.copy.archive) into COPY
FREEZE on the preview, counting them, and build each table's indexes and constraints as
soon as its rows are in; the rest of the data section (sequence values, large objects,
rows only pg_restore can load) and of post-data follow as for a live copy.

The rows are counted as they stream: no second pass over the archive. Rows that
pg_restore restores itself are counted from its output of just those entries, as fetch
once counted the whole archive (stages.dumps.rows).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import psycopg2.extensions

from pipeline.config import Settings
from pipeline.limits import job_deadline
from pipeline.steps.live import close_thread_connection, report_progress
from pipeline.steps.results import recorded
from stages.connections.pgurl import SourceURL
from stages.copy.archive import ArchiveBytes, ArchiveSource, OnDisk, plan_archive
from stages.copy.engine import copy_rows, plan_copy
from stages.copy.postdata import split
from stages.dumps import toc
from stages.dumps.archivetoc import ArchiveToc, End, read_toc
from stages.dumps.rows import RowCounter, count_archive_rows
from stages.dumps.sqlscript import ScriptError
from stages.errors import PermanentError
from stages.preflight.rehearsal import skip_map
from stages.tools.commands import PgRestore, PgTools
from stages.tools.restore import restore_section

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.import_steps import StageContext

# Ordinary tables of the preview, by schema and name (what COPY FREEZE may fill).
_PLAIN_TABLES = """
SELECT n.nspname, c.relname FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'r'
"""


def restore_archive_upload(
    context: StageContext,
    *,
    settings: Settings,
    tools: PgTools,
    archive: str,
    folder: str,
    target: SourceURL,
    open_target: Callable[[], psycopg2.extensions.connection],
    contents: ArchiveToc | None = None,
    arriving: ArchiveBytes | None = None,
) -> dict[str, Any]:
    """Restore the archive at `archive` into the preview `target` (reached as the
    restore role; `open_target` opens a session there); return the rows counted on
    both sides (`source_counts`, `copied_counts`) and the tables only known to exist
    (`uncounted_tables`: rows as INSERT statements).

    `arriving`: the archive is still downloading (its table of contents, `contents`, is
    on disk): the schema is restored at once, each streamed table's rows once they are
    on disk, and whatever else reads data (pg_restore's own share of the data section,
    the rest of post-data) once the whole archive is."""
    arriving = arriving or OnDisk()
    facts = context.job.facts
    encoding = recorded(facts.dump_encoding, "dump_encoding")
    entries = toc.read(tools, archive, encoding=encoding)
    precreated = set(facts.extensions.values()) - {"public"}
    skipped = facts.restore_skip if facts.restore_skip is not None else facts.rehearsal_skipped
    plan = toc.plan(entries, precreated_schemas=precreated, skip=skip_map(skipped))
    list_file = _write_list(folder, "restore.list", plan.keep)
    context.progress({"step": "schema", "phase": "creating the schema"})
    context.check_cancelled()
    restore_section(tools, target, archive, "pre-data", list_file=list_file)
    post_data = toc.render(
        tools,
        archive,
        plan.keep,
        folder,
        "post-data",
        encoding=encoding,
        options=[*PgRestore.AS_RESTORED, "--section=post-data"],
    )
    rendered = split(post_data, plan.keep)
    contents = contents or readable_toc(archive)
    archive_plan = plan_archive(
        contents, plan.keep, encoding=encoding, plain_tables=_plain_tables(open_target)
    )
    # pg_restore only reads the file here; its runs are not the job's "tool process"
    # (they end with the stage's pipes) and not recorded one by one.
    readers = dataclasses.replace(tools, observer=None, on_start=None)
    source = ArchiveSource(
        archive, archive_plan, readers, folder, settings.concurrency, settings.command_stall_seconds, arriving
    )
    copy_plan = plan_copy(source, plan.keep, rendered)

    counter = RowCounter()
    rest_data = [e for e in archive_plan.rest if e.desc == "TABLE DATA"]
    if rest_data:
        context.progress({"step": "data", "phase": "counting the rows pg_restore loads"})
        arriving.wait_for(None)
        try:
            count_archive_rows(
                tools,
                archive,
                counter,
                encoding=encoding,
                list_file=_write_list(folder, "counted.list", rest_data),
            )
        except ScriptError as err:
            raise PermanentError(
                f"the archive's table data cannot be read as pg_restore restores it ({err}): its table of contents "
                "was changed after pg_dump wrote it; run pg_dump again and upload the new file"
            ) from err
    rest_list = _write_list(folder, "data.list", archive_plan.rest) if archive_plan.rest else None

    def restore_data_section() -> None:
        if rest_list is not None:
            arriving.wait_for(None)
            restore_section(tools, target, archive, "data", list_file=rest_list)

    def restore_rest(rest: list[toc.TocEntry]) -> None:
        if rest:
            arriving.wait_for(None)
            restore_section(
                tools,
                target,
                archive,
                "post-data",
                list_file=_write_list(folder, "rest.list", rest),
                jobs=settings.concurrency,
            )

    result = copy_rows(
        source,
        copy_plan,
        lanes=settings.concurrency,
        open_target=open_target,
        restore_rest=restore_rest,
        restore_data_section=restore_data_section,
        maintenance_work_mem=settings.maintenance_work_mem,
        cancellation=context.cancellation,
        on_progress=lambda report: report_progress(context, report),
        on_report_end=close_thread_connection,
        statement_timeout_ms=int(job_deadline(context.job, settings).remaining() * 1000),
    )
    counted, uncounted = counter.result()
    return {
        "source_counts": {**counted, **result.source_counts},
        "copied_counts": result.target_counts,
        "uncounted_tables": uncounted,
    }


def readable_toc(archive: str, *, size: int | None = None) -> ArchiveToc:
    """The archive's table of contents (stages.dumps.archivetoc; `size` as read_toc's),
    or a PermanentError saying it cannot be read (pg_restore --list may accept what it
    cannot)."""
    try:
        return read_toc(archive, size=size)
    except (ValueError, EOFError, End) as err:
        raise PermanentError(
            f"the archive's table of contents cannot be read ({err or 'it ends inside it'}); upload it again"
        ) from err


def _write_list(folder: str, name: str, entries: list[toc.TocEntry]) -> str:
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(e.line for e in entries) + "\n")
    return path


def _plain_tables(open_target: Callable[[], psycopg2.extensions.connection]) -> set[tuple[str, str]]:
    conn = open_target()
    try:
        with conn.cursor() as cur:
            cur.execute(_PLAIN_TABLES)
            return {(schema, name) for schema, name in cur.fetchall()}
    finally:
        conn.close()
