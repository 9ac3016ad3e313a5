"""The finalize stage: verify the preview, hand it over to the project's role, swap it
in for the project's database (kept as `<name>_replaced_<time>` until its retention
ends), and report what was imported."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from pipeline.accounts import project_role
from pipeline.import_steps import restore_role_name
from pipeline.models import Project, RetiredDatabase
from pipeline.steps.results import FinalizeResult, Verification, recorded
from stages.database import dbsettings
from stages.database.cluster import ClusterAdmin, RoleLogin
from stages.errors import PermanentError
from stages.finalize import build_report, verify_preview

if TYPE_CHECKING:
    from pipeline.import_steps import ImportSteps, StageContext


def run(steps: ImportSteps, context: StageContext) -> FinalizeResult:
    job = context.job
    facts = job.facts
    admin = steps._admin(job)
    project = Project.get_by_id(job.project_id)
    preview = recorded(facts.preview_database, "preview_database")
    retired = RetiredDatabase.get_or_none(RetiredDatabase.job == job.id)
    if retired and not admin.database_exists(preview):
        # A previous attempt swapped and then lost its commit: the swap is done.
        return FinalizeResult(report=facts.report or {}, replaced_database=retired.database_name)
    if not admin.database_exists(preview):
        raise PermanentError(
            f"the preview database {preview!r} no longer exists (a failed import drops it); "
            "retry the import from the restore stage"
        )
    # A swap that crashed before swaps were one transaction left the live database
    # refusing connections; it must accept them again (and the is_empty gate below
    # must be able to connect).
    admin.reopen_disabled([project.database_name])
    source = recorded(facts.source_description, "source_description")
    verified = facts.verification or _verify(steps, context, admin, preview)
    context.progress({"phase": "handing the preview over to the project's role"})
    owner = RoleLogin(*project_role(project, admin, steps.sealer))
    admin.hand_over(preview, from_role=restore_role_name(job), to_role=owner.name)
    # As the owner, on the preview: they belong to the database, so the swap keeps them.
    database = dbsettings.apply(
        admin, preview, owner, dbsettings.DatabaseProperties.from_facts(facts.database_properties)
    )
    # The gate again, just before the destructive step: the project's database
    # may have received data since preflight.
    if not job.recreate and not admin.is_empty(project.database_name, owner):
        raise PermanentError(
            "the project's database is no longer empty; it received objects after the "
            'import started. Send "recreate": true to replace them'
        )
    if retired is None:
        replaced = f"{project.database_name}_replaced_{steps.clock():%Y%m%d%H%M%S}"
        if admin.database_exists(replaced):  # two imports of the project within a second
            replaced += "_" + job.id.removeprefix("job_")[:6]
        retired = RetiredDatabase.create(
            cluster=job.cluster_id,
            project=project.id,
            job=job.id,
            database_name=replaced,
            drop_after=steps.clock()
            + dt.timedelta(seconds=steps.settings.replaced_database_retention_seconds),
        )
    context.progress({"phase": "swapping the preview in"})
    hold = steps._hold_seconds(job, "swap")
    # The last cancellation point: once the swap has committed, the import completes.
    context.check_cancelled()
    context.confirm_claim()
    admin.swap(
        live=project.database_name,
        preview=preview,
        replaced=retired.database_name,
        hold=(lambda: steps._hold(context, "swap")) if hold else None,
    )
    report = build_report(
        source_counts=recorded(facts.source_counts, "source_counts"),
        target_counts=verified.target_counts,
        source=source.model_dump(),
        target=verified.target,
        source_basis=recorded(facts.source_basis, "source_basis"),
        skipped=facts.skipped + database["skipped"],
        uncounted=facts.uncounted_tables,
    )
    report["database"] = {"settings": database["settings"], "comment": database["comment"]}
    report["replaced_database"] = retired.database_name
    return FinalizeResult(report=report, replaced_database=retired.database_name, verification=None)


def _verify(steps: ImportSteps, context: StageContext, admin: ClusterAdmin, preview: str) -> Verification:
    """Verify the preview as its restore role and record the result on the job before
    the hand-over: a finalize retried after it cannot connect as that role again."""
    job = context.job
    facts = job.facts
    role = restore_role_name(job)
    if not admin.role_exists(role):
        raise PermanentError(
            f"the preview database {preview!r} can no longer be verified (its restore role is gone); "
            "retry the import from the restore stage"
        )
    context.progress({"step": "verify", "phase": "verifying tables, rows and sequences"})
    # A new password (none is ever stored; the dump may have set its own) and no
    # members, then nobody else in the preview: what is verified is what is swapped in.
    restorer = admin.ensure_restore_role(role)
    admin.terminate_sessions(preview)
    admin.reopen(preview)  # the dump may have set its connection limit to 0
    target_counts, target = verify_preview(
        admin,
        preview,
        restorer,
        recorded(facts.source_counts, "source_counts"),
        facts.uncounted_tables,
        recorded(facts.source_description, "source_description").sequences,
        allowlist=steps.settings.extension_allowlist,
        copied=facts.copied_counts,
        extension_rows=facts.extension_rows,
    )
    verified = Verification(target_counts=target_counts, target=target)
    context.merge_facts(FinalizeResult(verification=verified))
    return verified
