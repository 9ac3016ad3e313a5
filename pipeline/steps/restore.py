"""The restore stage: a fresh preview owned by the import's restore role, filled as
that role (the dump's SQL can reach nothing but this preview): a live source copied
from one snapshot (pipeline.steps.live), or an upload restored from object storage
(pipeline.steps.upload)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models import Project
from pipeline.restore_slots import wait_for_restore_slot
from pipeline.steps import live
from pipeline.steps import upload as upload_steps
from pipeline.steps.results import RestoreResult

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext


def run(steps: ImportSteps, context: StageContext) -> RestoreResult:
    """Restore into a fresh preview owned by the import's restore role, as that role:
    the dump's SQL can reach nothing but this preview."""
    wait_for_restore_slot(context, steps.settings)  # held until this claim of the stage ends
    result = _restore(steps, context)
    # The preview was filled without waiting for the disk at each commit: it is on disk
    # before the stage says it is done (and finalize trusts its counts).
    steps._admin(context.job).flush_wal()
    return result


def _restore(steps: ImportSteps, context: StageContext) -> RestoreResult:
    job = context.job
    if not job.upload_key:
        return live.restore(steps, context)
    facts = job.facts
    project = Project.get_by_id(job.project_id)
    # Projects created before the service revoked PUBLIC's access get it revoked now.
    steps._admin(job).lock_down(project.database_name)
    with upload_steps.restore_folder(context, settings=steps.settings, store=steps.store) as prepared:
        target, restorer, preview = steps._new_preview(context, facts.extensions, facts.extension_comments)
        context.progress({"phase": "restoring", "tables_total": len(facts.source_counts or {})})
        steps._hold(context, "restore", steps._tools(context, cancellable=False), target)
        context.check_cancelled()
        admin = steps._admin(job)
        # From object storage, on whichever worker runs this stage.
        restored = upload_steps.restore_upload(
            context,
            prepared,
            settings=steps.settings,
            store=steps.store,
            tools=steps._tools(context),
            target=target,
            open_target=lambda: admin.open_role_connection(preview, restorer, readonly=False),
        )
    # A verification of an earlier preview (a restore retried by an operator) is void.
    return RestoreResult(**restored, preview_database=preview, verification=None)
