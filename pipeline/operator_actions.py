"""What operators do to jobs from `capy-imports`: retry a failed or cancelled import,
find stuck ones. Every action is a guarded update with a job event and an audit event
(actor `operator:<unix user>`)."""

from __future__ import annotations

import datetime as dt
import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass

import peewee

from pipeline import audit, jobs
from pipeline.db import database
from pipeline.errors import Conflict, InvalidRequest, NotFound
from pipeline.imports import active_job
from pipeline.models import ACTIVE_STATES, STAGE_ORDER, Job, Project, Stage, State, utcnow
from stages.errors import CapyError

IMPORT_RETRIED = "project.import_retried"
RETRYABLE_STATES = (State.FAILED.value, State.CANCELLED.value)
# What a stage needs that an ended job no longer has: its work files are removed and its
# preview dropped when it ends, so a retry of these stages starts at fetch by default.
AFTER_CLEANUP = (Stage.RESTORE.value, Stage.FINALIZE.value)


def operator_actor() -> str:
    """`operator:<unix user>`, as job and audit events name the operator."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"operator:{user}"


@dataclass(frozen=True)
class RetryOutcome:
    job: Job
    from_state: str
    from_stage: str
    note: str | None
    # False when the wake-up could not be sent (the broker is down): sweep sends it.
    woken: bool = True


def retry_job(
    job_id: str,
    actor: str,
    *,
    from_stage: str | None,
    wake: Callable[[str, str], None],
    upload_exists: Callable[[str], bool],
    preview_exists: Callable[[Job], bool],
) -> RetryOutcome:
    """Run a failed or cancelled job again from its failed stage (or `from_stage`):
    back to `pending` at that stage, attempts and time limit reset, the project's lock
    taken again (Conflict if another import holds it), and the stage woken."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    if job.state not in RETRYABLE_STATES:
        what = (
            "is still active; cancel it first or let it finish" if job.state in ACTIVE_STATES else "completed"
        )
        raise Conflict(
            f"job {job_id} is {job.state}: only a failed or cancelled import can be retried; it {what}"
        )
    newer = (
        Job.select()
        .where(
            (Job.project == job.project_id) & (Job.state == "completed") & (Job.created_at > job.created_at)
        )
        .order_by(Job.completed_at.desc())
        .first()
    )
    if newer is not None:
        # Its swap would replace what the newer import brought in, without a word.
        raise Conflict(
            f"job {newer.id}, started after job {job_id}, has since completed an import of project "
            f"{job.project_id}; retrying job {job_id} would replace that data. Start a new import instead"
        )
    stage, note = _stage_to_run(job, from_stage, upload_exists, preview_exists)
    project = Project.get_by_id(job.project_id)
    try:
        with database.atomic():
            retried = _retry_update(job, stage, actor)
            if retried is None:
                raise Conflict(f"job {job_id} changed while it was being retried; look at it again")
            audit.record(
                project,
                IMPORT_RETRIED,
                actor,
                target_id=job.id,
                details={"from_state": job.state, "from_stage": job.stage, "stage": stage},
            )
    except peewee.IntegrityError as err:  # the partial unique index on locked_resource
        holder = active_job(project)
        raise Conflict(
            f"project {project.id} has another active import, job {holder.id if holder else '?'}; "
            f"wait for it to end or cancel it, then retry job {job_id}"
        ) from err
    try:
        wake(job.id, stage)
    except CapyError:
        # The job row is the outbox: pending and unclaimed, it is woken by
        # `capy-imports sweep` (the clock) once it has waited a minute.
        queued = (
            "the job queue is unavailable: `capy-imports sweep` (the clock) starts it once RabbitMQ is back"
        )
        note = f"{note}; {queued}" if note else queued
        return RetryOutcome(retried, job.state, job.stage, note, woken=False)
    return RetryOutcome(retried, job.state, job.stage, note)


def _stage_to_run(
    job: Job,
    requested: str | None,
    upload_exists: Callable[[str], bool],
    preview_exists: Callable[[Job], bool],
) -> tuple[str, str | None]:
    if job.upload_key and (job.facts.upload_deleted or not upload_exists(job.upload_key)):
        raise InvalidRequest(
            f"job {job.id}'s upload {job.upload_key} was deleted when the job ended "
            "(CAPY_UPLOAD_RETENTION_SECONDS keeps uploads longer); upload the dump again and start a new import"
        )
    if job.upload_key is None and job.source_url_encrypted is None:
        raise InvalidRequest(f"job {job.id} holds no source to import from; start a new import")
    stage = requested or job.stage
    note = None
    if requested is None and stage in AFTER_CLEANUP:
        note = (
            f"it failed at {stage}, but the dump and the preview of that run were removed when it ended, "
            "so it starts again from fetch"
        )
        stage = Stage.FETCH.value
    if stage != Stage.PREFLIGHT.value and job.facts.preflight is None:
        raise InvalidRequest(
            f"job {job.id} never passed its preflight stage; retry it with --from-stage preflight"
        )
    if stage == Stage.RESTORE.value and job.upload_key and job.facts.source_counts is None:
        # An upload's restore reads the upload and the facts fetch recorded, on any worker;
        # a live import's restore copies from the source again.
        raise InvalidRequest(f"job {job.id} never passed its fetch stage; retry with --from-stage fetch")
    if stage == Stage.RESTORE.value and not job.upload_key and job.facts.source_address is None:
        raise InvalidRequest(
            f"job {job.id} has no source address its preflight pinned; retry with --from-stage preflight"
        )
    if stage == Stage.FINALIZE.value and not preview_exists(job):
        raise InvalidRequest(
            f"job {job.id}'s preview database no longer exists (it is dropped when a job ends); "
            "retry with --from-stage fetch"
        )
    return stage, note


def _retry_update(job: Job, stage: str, actor: str) -> Job | None:
    return jobs.transition(
        job.id,
        actor,
        f"retried by {actor} from the {stage} stage (it was {job.state} at {job.stage}: {job.error})",
        where=Job.state.in_(RETRYABLE_STATES) & (Job.updated_at == job.updated_at),
        state=State.PENDING.value,
        stage=stage,
        attempts=0,
        claimed_by=None,
        claimed_at=None,
        heartbeat_at=None,
        # A fresh time limit (CAPY_JOB_TIME_LIMIT_SECONDS counts from the first claim).
        started_at=None,
        completed_at=None,
        error=None,
        retry_classification=None,
        locked_resource=f"project:{job.project_id}",
        cancel_requested_at=None,
        cancel_requested_by=None,
        progress={"stage": stage, "phase": "queued"},
    )


@dataclass(frozen=True)
class StuckJob:
    job: Job
    why: str


def stuck_jobs(
    *, lease: dt.timedelta, unclaimed_for: dt.timedelta, now: Callable[[], dt.datetime] = utcnow
) -> list[StuckJob]:
    """Active jobs whose holder stopped beating (lease stale), or that nobody has
    claimed for `unclaimed_for` (a lost wake-up, no worker running)."""
    at = now()
    query = (
        Job.select()
        .where(
            Job.state.in_(ACTIVE_STATES)
            & (
                (
                    Job.claimed_by.is_null(False)
                    & (Job.heartbeat_at.is_null() | (Job.heartbeat_at < at - lease))
                )
                | (Job.claimed_by.is_null() & (Job.updated_at < at - unclaimed_for))
            )
        )
        .order_by(Job.updated_at)
    )
    stuck = []
    for job in query:
        if job.claimed_by:
            since = (
                "never"
                if job.heartbeat_at is None
                else f"{int((at - job.heartbeat_at).total_seconds())} s ago"
            )
            why = (
                f"its holder {job.claimed_by} last beat {since} (lease {int(lease.total_seconds())} s): "
                "the worker died or hangs"
            )
        else:
            why = (
                f"nobody has claimed its {job.stage} stage for {int((at - job.updated_at).total_seconds())} s: "
                "is a worker running? (a lost wake-up: capy-imports dlq list)"
            )
        stuck.append(StuckJob(job, why))
    return stuck


def stage_names() -> list[str]:
    return [stage.value for stage in STAGE_ORDER]
