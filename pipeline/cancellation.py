"""Cancelling an import: `POST /v1/jobs/{id}/cancel` and `capy-imports jobs cancel`.

A job nobody is working on (pending, between stages, or held by a claim whose
heartbeat went stale) is cancelled at once by the caller: one guarded update, then its
preview and restore role are dropped. A job whose stage a worker is running gets a
marker (`cancel_requested_at`): that worker's heartbeat thread reads it within a
second, stops the stage's tools (their whole process groups), and the worker cancels
the job itself, then drops what it made (`Runner`). Either way the job ends
`cancelled`, `permanent`, with an `error` naming who cancelled it, and the project is
free for a new import. The swap is the one step a cancel does not interrupt: a cancel
that arrives once it has begun finds the import completed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

import peewee

from pipeline import audit, jobs
from pipeline.db import database
from pipeline.errors import Conflict, NotFound
from pipeline.models import ACTIVE_STATES, Job, JobEvent, Project, State, utcnow

log = logging.getLogger(__name__)

IMPORT_CANCELLED = "project.import_cancelled"
NOT_CHANGED = "the project's database was not changed"


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    # True: cancelled now, by the caller. False: the worker running the stage was asked
    # to stop it and ends the job `cancelled` within seconds.
    done: bool


def _audit(job: Job, actor: str, outcome: str, before: Job) -> None:
    audit.record(
        Project.get_by_id(job.project_id),
        IMPORT_CANCELLED,
        actor,
        target_id=job.id,
        details={
            "outcome": outcome,
            "state": before.state,
            "stage": before.stage,
            "claimed_by": before.claimed_by,
        },
    )


def request_cancel(
    job_id: str,
    actor: str,
    *,
    lease: dt.timedelta,
    cleanup: Callable[[Job], None],
    now: Callable[[], dt.datetime] = utcnow,
) -> CancelOutcome:
    """Cancel the job, or ask the worker running it to. NotFound for an unknown job;
    Conflict naming its state for one that already ended. `cleanup(job)` drops what
    a job cancelled here had made (preview, restore role, files)."""
    for _attempt in range(5):
        before = Job.get_or_none(Job.id == job_id)
        if before is None:
            raise NotFound(f"job {job_id} does not exist")
        if before.state not in ACTIVE_STATES:
            raise Conflict(
                f"job {job_id} is already {before.state}; only a pending or running import can be cancelled"
            )
        at = now()
        unattended = Job.claimed_by.is_null() | Job.heartbeat_at.is_null() | (Job.heartbeat_at < at - lease)
        with database.atomic():
            job = jobs.transition(
                job_id,
                actor,
                lambda prior, job: (
                    f"cancelled by {actor} at the {job.stage} stage"
                    + (f" (its stale claim by {prior.claimed_by} was dropped)" if prior.claimed_by else "")
                ),
                where=Job.state.in_(ACTIVE_STATES) & unattended,
                state=State.CANCELLED.value,
                completed_at=at,
                claimed_by=None,
                heartbeat_at=None,
                locked_resource=None,
                error=f"cancelled by {actor}; {NOT_CHANGED}",
                retry_classification="permanent",
                progress={"stage": before.stage, "phase": "cancelled"},
                cancel_requested_at=peewee.fn.COALESCE(Job.cancel_requested_at, at),
                cancel_requested_by=peewee.fn.COALESCE(Job.cancel_requested_by, actor),
            )
            if job is not None:
                _audit(job, actor, "cancelled", before)
        if job is not None:
            log.info("job %s: cancelled by %s", job_id, actor)
            cleanup(job)
            return CancelOutcome(job, done=True)
        with database.atomic():
            job = jobs.transition(
                job_id,
                actor,
                lambda prior, job: (
                    f"cancel requested by {actor}; {job.claimed_by} stops the {job.stage} stage"
                ),
                where=Job.state.in_(ACTIVE_STATES) & ~unattended,
                cancel_requested_at=peewee.fn.COALESCE(Job.cancel_requested_at, at),
                cancel_requested_by=peewee.fn.COALESCE(Job.cancel_requested_by, actor),
            )
            if job is not None:
                _audit(job, actor, "requested", before)
        if job is not None:
            log.info("job %s: cancel requested by %s; %s stops it", job_id, actor, job.claimed_by)
            return CancelOutcome(job, done=False)
        # The job moved between the two updates (claimed, released, ended): look again.
    raise Conflict(f"job {job_id} kept changing while it was being cancelled; try again")


def finish(job_id: str, actor: str) -> Job | None:
    """The worker holding the stage ends the cancelled job (None if it no longer holds it)."""
    before = Job.get_or_none(Job.id == job_id)
    if before is None or before.cancel_requested_at is None:
        return None
    by = before.cancel_requested_by or "an operator"
    return jobs.transition(
        job_id,
        actor,
        f"cancelled by {by}: the {before.stage} stage was stopped",
        where=Job.state.in_(ACTIVE_STATES) & (Job.claimed_by == actor) & (Job.stage == before.stage),
        state=State.CANCELLED.value,
        completed_at=utcnow(),
        claimed_by=None,
        heartbeat_at=None,
        locked_resource=None,
        error=f"cancelled by {by} during the {before.stage} stage; {NOT_CHANGED}",
        retry_classification="permanent",
        progress={"stage": before.stage, "phase": "cancelled"},
    )


def note_completed_anyway(job_id: str, actor: str) -> None:
    """A cancel that came once the swap had begun: the import completed; say so."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None or job.cancel_requested_at is None:
        return
    JobEvent.create(
        job=job.id,
        actor=actor,
        reason=(
            f"the cancel requested by {job.cancel_requested_by} came after the swap had begun; "
            "the import completed instead (a swap is never interrupted)"
        ),
        from_state=job.state,
        to_state=job.state,
        from_stage=job.stage,
        to_stage=job.stage,
    )
