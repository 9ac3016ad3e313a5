"""The fetch and restore stages of a live import.

fetch reads what the copy will move (tables and their size) for progress and the
report; it leaves nothing on disk. restore does the whole copy in one stage, from one
exported snapshot (stages.copy.engine): the schema archive it makes is its own, small,
and removed when the stage ends, so a retry on any worker starts afresh.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import peewee
import psycopg2

from pipeline.db import ControlDatabaseUnavailable, database
from pipeline.limits import job_deadline
from pipeline.models import Project
from pipeline.steps.folders import stage_folder
from pipeline.steps.results import FetchResult, RestoreResult, SourceDescription, recorded
from stages.copy.engine import CopyPlan, copy_rows, plan_copy
from stages.copy.live import Snapshot, SourceSettings, size_up
from stages.copy.postdata import split
from stages.copy.predata import schema_slices
from stages.dumps import toc
from stages.dumps.archivetoc import read_toc
from stages.dumps.rows import dumped_sequences
from stages.dumps.toc import TocEntry
from stages.tools.commands import PgRestore
from stages.tools.restore import restore_section

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext

log = logging.getLogger(__name__)


def report_progress(context: StageContext, report: dict[str, Any]) -> None:
    """Progress from the copy's reporter thread. A control database that blips loses a
    report, not the copy (the heartbeat holds the claim); a lost claim or a cancel
    raised here stops the copy."""
    try:
        context.progress(report)
    except (peewee.PeeweeException, psycopg2.Error, ControlDatabaseUnavailable) as err:
        log.warning("job %s: could not record progress: %s", context.job.id, type(err).__name__)
        close_thread_connection()


def close_thread_connection() -> None:
    """The reporter thread's own control-database connection, if it opened one."""
    if not database.is_closed():
        database.close()


def source_settings(steps: ImportSteps) -> SourceSettings:
    s = steps.settings
    return SourceSettings(
        connect_timeout=s.source_connect_timeout,
        read_timeout=s.source_read_timeout_seconds,
        lock_timeout=s.source_lock_timeout_seconds,
        stall_seconds=s.command_stall_seconds,
    )


def fetch(steps: ImportSteps, context: StageContext) -> FetchResult:
    """Size up the source: how many tables and bytes the copy moves, read without a
    snapshot or locks (the restore stage copies from a snapshot of its own, the one its
    counts come from)."""
    job = context.job
    source = steps._source(job).with_params(hostaddr=recorded(job.facts.source_address, "source_address"))
    context.progress({"step": "schema", "phase": "sizing up the source"})
    tools = steps._tools(context)
    steps._hold(context, "fetch", tools, source)
    size = size_up(source, source_settings(steps), context.cancellation)
    return FetchResult(
        source_server_version=size.server_version,
        source_tables=len(size.tables),
        source_bytes=sum(t.bytes for t in size.tables),
        dump_format="live",
    )


def restore(steps: ImportSteps, context: StageContext) -> RestoreResult:
    """Create the preview as the import's restore role and copy the source into it."""
    job = context.job
    settings = steps.settings
    source = steps._source(job).with_params(hostaddr=recorded(job.facts.source_address, "source_address"))
    admin = steps._admin(job)
    project = Project.get_by_id(job.project_id)
    admin.lock_down(project.database_name)
    with stage_folder(steps.settings, job, "restore") as work:
        tools = steps._tools(context)
        # The preview is made in the background while the schema is dumped and read.
        with (
            steps._preview_started(context) as preview_ready,
            Snapshot.open(source, source_settings(steps), context.cancellation, tools=tools) as snapshot,
        ):
            context.progress({"step": "schema", "phase": "reading the source's schema"})
            archive = os.path.join(work, "schema.dump")
            snapshot.dump_schema(tools, archive, snapshot.catalog.tables)
            archived = read_toc(archive)
            planned, keep = steps._plan_archive(
                tools, archive, work, job.facts.rehearsal_skipped, encoding=archived.encoding
            )
            list_file = planned.pop("restore_list")
            target, restorer, preview = preview_ready(planned["extensions"], planned["extension_comments"])
            context.progress(
                {"step": "schema", "phase": "creating the schema", "preview_database_id": preview}
            )
            steps._hold(context, "restore", steps._tools(context, cancellable=False), target)
            context.check_cancelled()
            post_data = toc.render(
                tools,
                archive,
                keep,
                work,
                "post-data",
                options=[*PgRestore.AS_RESTORED, "--section=post-data"],
            )
            rendered = split(post_data, keep)
            plan: CopyPlan = plan_copy(snapshot, keep, rendered)
            # The pre-data section is restored in slices beside the copy (stages.copy.predata).
            schema = schema_slices(
                tools,
                target,
                archive,
                keep,
                list_file,
                work,
                archived=archived.entries,
                first=plan.referenced,
            )

            def restore_rest(entries: list[TocEntry]) -> None:
                if entries:
                    rest_file = os.path.join(work, "rest.list")
                    with open(rest_file, "w", encoding="utf-8") as fh:
                        fh.write("\n".join(e.line for e in entries) + "\n")
                    restore_section(
                        tools, target, archive, "post-data", list_file=rest_file, jobs=settings.concurrency
                    )

            remaining_ms = int(job_deadline(job, settings).remaining() * 1000)
            result = copy_rows(
                snapshot,
                plan,
                lanes=settings.concurrency,
                open_target=lambda: admin.open_role_connection(preview, restorer, readonly=False),
                restore_rest=restore_rest,
                restore_data_section=lambda: restore_section(
                    tools, target, archive, "data", list_file=list_file
                ),
                maintenance_work_mem=settings.maintenance_work_mem,
                cancellation=context.cancellation,
                on_progress=lambda report: report_progress(context, report),
                on_report_end=close_thread_connection,
                statement_timeout_ms=remaining_ms,
                schema=schema,
            )
            planned.pop("toc_kinds", None)
            return RestoreResult(
                **planned,
                source_counts={**snapshot.configuration_counts, **result.source_counts},
                copied_counts=result.target_counts,
                uncounted_tables=[],
                dump_bytes=result.bytes,
                source_server_version=snapshot.server_version,
                # The sequences' values as pg_dump read them, not as the snapshot's session
                # did: sequences are not transactional, and a source written meanwhile has
                # moved them on (the preview holds what was dumped).
                source_description=SourceDescription.model_validate(
                    {**snapshot.description, "sequences": dumped_sequences(archived)}
                ),
                source_basis="source snapshot",
                preview_database=preview,
                verification=None,
            )
