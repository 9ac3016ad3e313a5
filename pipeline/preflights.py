"""Preflight for a project: the same checks for the API endpoint and the worker's gate.

Reads the source (or the head of an upload) and the project's cluster; changes
nothing anywhere. The API records `project.import_preflight`; the worker runs the
same function before anything is dumped or dropped.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline import audit
from pipeline.accounts import cluster_admin, project_role
from pipeline.config import Settings
from pipeline.imports import ImportRequest
from pipeline.limits import command_limit, preflight_command_limit
from pipeline.models import Cluster, Project
from pipeline.preflight_slots import preflight_slot
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.connections.deadline import Deadline as SourceDeadline
from stages.connections.pgurl import SourceURL
from stages.database.cluster import RoleLogin
from stages.dumps.contents import TAIL_BYTES
from stages.errors import ObjectMissing, PermanentError
from stages.preflight.live import check_live_source
from stages.preflight.rehearsal import RehearsalSetup
from stages.preflight.report import Preflight, Target
from stages.preflight.sandbox import Sandbox
from stages.preflight.targetinfo import describe_target
from stages.preflight.upload import check_upload_head
from stages.storage import ObjectStore
from stages.tools.commands import Cancellation, PgTools
from stages.tools.timelimit import Deadline, Limit
from stages.tools.workpaths import scrub_work_paths


@dataclass(frozen=True)
class PreflightResult:
    report: Preflight
    target: Target

    def response(self) -> dict[str, Any]:
        return self.report.as_response(self.target)


def target_for(project: Project, settings: Settings, sealer: Sealer, *, recreate: bool) -> Target:
    admin = cluster_admin(Cluster.get_by_id(project.cluster_id), sealer)
    return describe_target(
        admin,
        project.database_name,
        owner=RoleLogin(*project_role(project, admin, sealer)),
        recreate=recreate,
        storage_limit_bytes=project.storage_limit_bytes,
        allowlist=settings.extension_allowlist,
    )


def rehearsal_setup(
    project: Project,
    settings: Settings,
    sealer: Sealer,
    work_dir: str,
    *,
    full: bool,
    cancellation: Cancellation | None = None,
) -> RehearsalSetup:
    """Where and how long a preflight rehearses the schema. The API's synchronous
    preflight has what is left of CAPY_PREFLIGHT_DEADLINE_SECONDS (it answers well
    inside gunicorn's timeout, and only warns when the rehearsal did not finish); the
    worker's gate (`full`) has the command limit and fails when it runs out. A cancel of
    `cancellation` (the worker's stage) stops the rehearsal's tools."""
    cluster = Cluster.get_by_id(project.cluster_id)
    if full:
        limit = command_limit(settings)
    else:
        limit = Limit(
            settings.preflight_deadline_seconds,
            "CAPY_PREFLIGHT_DEADLINE_SECONDS",
            "the import rehearses the whole schema before anything is dropped",
            label="the preflight deadline of ",
        )
    tools = PgTools.for_major(
        cluster.server_major,
        settings.pg_bin_dir_template,
        limit=limit,
        stall_seconds=settings.command_stall_seconds,
        cancellation=cancellation,
    )
    return RehearsalSetup(
        sandbox=Sandbox(cluster_admin(cluster, sealer)),
        tools=tools,
        deadline=Deadline.after(limit),
        work_dir=work_dir,
        full=full,
        lock_wait_ms=int(settings.source_lock_timeout_seconds * 1000),
    )


def preflight_source(
    project: Project,
    source: SourceURL,
    settings: Settings,
    sealer: Sealer,
    *,
    recreate: bool,
    full: bool = False,
    cancellation: Cancellation | None = None,
) -> PreflightResult:
    """The live-source checks; `full`: the worker's gate (see `rehearsal_setup`). A
    cancel of `cancellation` (the worker's stage) ends the source session at once
    instead of at the preflight deadline."""
    setup = rehearsal_setup(
        project, settings, sealer, _work_dir(settings), full=full, cancellation=cancellation
    )
    target = target_for(project, settings, sealer, recreate=recreate)
    deadline = SourceDeadline(total=settings.preflight_deadline_seconds, what="the preflight deadline")
    unsubscribe = cancellation.on_cancel(deadline.cancel) if cancellation is not None else None
    try:
        report = check_live_source(
            source,
            target,
            allow_private=settings.allow_private_sources,
            timeout=settings.source_connect_timeout,
            deadline=deadline,
            rehearsal=setup,
        )
    finally:
        if unsubscribe is not None:
            unsubscribe()
    return PreflightResult(report, target)


def _work_dir(settings: Settings) -> str:
    os.makedirs(settings.work_dir, exist_ok=True)
    return settings.work_dir


def preflight_upload(
    project: Project,
    key: str,
    settings: Settings,
    sealer: Sealer,
    store: ObjectStore,
    *,
    recreate: bool,
    full: bool = False,
    cancellation: Cancellation | None = None,
) -> PreflightResult:
    """Checks on the head of the upload (never the whole dump): at most
    `settings.preflight_head_bytes` from storage, and `settings.preflight_text_bytes`
    of SQL decompressed from it, so a gzip bomb costs the web process little.
    `full`: the worker's gate (see `rehearsal_setup`)."""
    setup = rehearsal_setup(
        project, settings, sealer, _work_dir(settings), full=full, cancellation=cancellation
    )
    target = target_for(project, settings, sealer, recreate=recreate)
    cluster = Cluster.get_by_id(project.cluster_id)
    tools = PgTools.for_major(
        cluster.server_major,
        settings.pg_bin_dir_template,
        limit=preflight_command_limit(settings),
        stall_seconds=settings.command_stall_seconds,
    )
    os.makedirs(settings.work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.work_dir, prefix="preflight-") as folder:
        head, tail = os.path.join(folder, "head"), None
        try:
            size = store.size(key)
            store.head(key, head, settings.preflight_head_bytes)
            if size > settings.preflight_head_bytes:  # the end, where pg_dump's footer is
                tail = os.path.join(folder, "tail")
                store.tail(key, tail, TAIL_BYTES)
        except ObjectMissing as err:
            raise PermanentError(f"nothing has been uploaded at {key}; upload the dump again") from err
        # The rehearsal's database is made while the head is checked (once there is one).
        with setup.sandbox.ahead():
            report = check_upload_head(
                head,
                size,
                target,
                tools,
                max_text=settings.preflight_text_bytes,
                rehearsal=setup,
                tail_path=tail,
            )
    # pg_restore's messages may name the scratch copy of the head: keep it out of the details.
    report.checks = [
        dataclasses.replace(check, detail=scrub_work_paths(check.detail)) for check in report.checks
    ]
    return PreflightResult(report, target)


def run_preflight(
    project: Project,
    principal: Principal,
    request: ImportRequest,
    settings: Settings,
    sealer: Sealer,
    store: ObjectStore,
) -> PreflightResult:
    """The synchronous preflight of POST …/imports/preflight, audited; RateLimited when
    the organization already runs CAPY_ORG_MAX_CONCURRENT_PREFLIGHTS of them."""
    with preflight_slot(
        project.organization_id,
        slots=settings.org_max_concurrent_preflights,
        retry_after=settings.preflight_deadline_seconds,
    ):
        if request.upload_key:
            result = preflight_upload(
                project, request.upload_key, settings, sealer, store, recreate=request.recreate
            )
        else:
            assert request.source is not None
            result = preflight_source(project, request.source, settings, sealer, recreate=request.recreate)
    audit.record(
        project,
        audit.IMPORT_PREFLIGHT,
        principal.actor,
        details={
            "source": request.source.redacted() if request.source else None,
            "upload_key": request.upload_key,
            "ok": result.report.ok,
            "failed": [check.name for check in result.report.checks if check.status == "fail"],
        },
    )
    return result
