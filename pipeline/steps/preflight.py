"""The preflight stage: the checks of POST …/imports/preflight, as the job's gate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models import Project
from pipeline.preflights import preflight_source, preflight_upload
from pipeline.steps.results import PreflightResult

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext


def run(steps: ImportSteps, context: StageContext) -> PreflightResult:
    """The same checks as POST …/imports/preflight; a failing one fails the job as
    permanent with its detail, before anything is dumped or dropped."""
    job = context.job
    context.progress({"phase": "checking the source and the target"})
    project = Project.get_by_id(job.project_id)
    if job.upload_key:
        checked = preflight_upload(
            project,
            job.upload_key,
            steps.settings,
            steps.sealer,
            steps.store,
            recreate=job.recreate,
            full=True,
            cancellation=context.cancellation,
        )
    else:
        checked = preflight_source(
            project,
            steps._source(job),
            steps.settings,
            steps.sealer,
            recreate=job.recreate,
            full=True,
            cancellation=context.cancellation,
        )
    context.check_cancelled()  # a cancel that interrupted the checks is not their failure
    checked.report.raise_for_failure()
    # What the schema rehearsal found the project cannot hold: the restore plan leaves it out.
    result = PreflightResult(preflight=checked.response(), rehearsal_skipped=checked.report.skipped)
    if checked.report.pinned is not None:
        # Later stages connect to exactly the address that was checked.
        result.source_address = checked.report.pinned.params["hostaddr"]
    return result
