"""The job state machine. The job table is the source of truth; messages are wake-ups.

Every change is a guarded UPDATE (`... WHERE id = ? AND state IN (...)`) that writes a
job event in the same transaction. A guard that matches no row means someone else
already moved the job, and the caller does nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from typing import Any

import peewee

from pipeline.db import database
from pipeline.models import (
    ACTIVE_STATES,
    STAGE_ORDER,
    Job,
    JobEvent,
    Stage,
    State,
    utcnow,
)
from stages.errors import CapyError
from stages.workpaths import scrub_work_paths

OUTPUT_TAIL_CHARS = 4000


def worker_id() -> str:
    """host:pid:thread, as shown in `claimed_by`."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def next_stage(stage: str) -> str | None:
    order = [s.value for s in STAGE_ORDER]
    index = order.index(stage)
    return order[index + 1] if index + 1 < len(order) else None


def _event(job: Job, actor: str, reason: str, **changes: Any) -> None:
    JobEvent.create(job=job.id, actor=actor, reason=reason, **changes)


def _guarded(job_id: str, where: peewee.Expression, **values: Any) -> Job | None:
    values.setdefault("updated_at", utcnow())
    rows = list(Job.update(**values).where((Job.id == job_id) & where).returning(Job).execute())
    return rows[0] if rows else None


class OrganizationAtLimit(CapyError):
    """The job's organization already runs as many imports as it may; the job waits."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(
            f"{active} other imports of this organization are running; at most {limit} run at once "
            "(CAPY_ORG_MAX_ACTIVE_JOBS)"
        )
        self.active = active
        self.limit = limit


WAITING_FOR_ORGANIZATION = "waiting for other imports of the organization to finish"
# Namespace (first key) of the per-organization advisory locks that serialise claims.
_FAIR_SHARE_LOCK = 7_314_005


def claim(
    job_id: str, stage: str, actor: str, *, lease: dt.timedelta, org_limit: int | None = None
) -> Job | None:
    """Claim `stage` of the job for `actor`, or None when it is not ours to run.

    A job can be claimed when it is active, at this stage, and either unclaimed or
    held by a claim whose heartbeat is older than `lease` (its worker died). With
    `org_limit`, also only while fewer than that many other jobs of its organization
    hold a fresh claim; otherwise the job's progress says it waits and
    OrganizationAtLimit is raised (no attempt is used).
    """
    now = utcnow()
    refused: OrganizationAtLimit | None = None
    with database.atomic():
        before = Job.get_or_none(Job.id == job_id)
        if before is None:
            return None
        claimable = (
            (Job.state.in_(ACTIVE_STATES))
            & (Job.stage == stage)
            & (Job.claimed_by.is_null() | (Job.heartbeat_at < now - lease))
            & (Job.attempts < Job.max_attempts)
        )
        where = claimable
        if org_limit is not None:
            # Claims of one organization take turns, so two workers cannot both see a
            # free slot; the lock ends with this transaction.
            database.execute_sql(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_FAIR_SHARE_LOCK, before.organization_id)
            )
            where &= _org_claims(before.organization_id, job_id, now - lease) < org_limit
        job = _guarded(
            job_id,
            where,
            state=State.RUNNING.value,
            claimed_by=actor,
            claimed_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=peewee.fn.COALESCE(Job.started_at, now),
        )
        if job is None:
            if org_limit is None or not Job.select().where((Job.id == job_id) & claimable).exists():
                return None
            active = _org_claims(before.organization_id, job_id, now - lease).scalar()
            refused = OrganizationAtLimit(active, org_limit)
            Job.update(
                progress={
                    "stage": stage,
                    "phase": WAITING_FOR_ORGANIZATION,
                    "active_imports": active,
                    "limit": org_limit,
                    "detail": refused.message,
                },
                updated_at=now,
            ).where((Job.id == job_id) & claimable).execute()
        else:
            reason = f"{stage} claimed (attempt {job.attempts} of {job.max_attempts})"
            if before.claimed_by and before.claimed_by != actor:
                reason += f", taking over the stale claim of {before.claimed_by}"
            _event(
                job,
                actor,
                reason,
                from_state=before.state,
                to_state=job.state,
                from_stage=stage,
                to_stage=stage,
            )
            return job
    raise refused


def _org_claims(organization_id: str, job_id: str, fresh_since: dt.datetime) -> peewee.SelectQuery:
    """How many other jobs of the organization hold a claim with a fresh heartbeat."""
    other = Job.alias()
    return other.select(peewee.fn.COUNT(other.id)).where(
        (other.organization == organization_id)
        & (other.id != job_id)
        & other.state.in_(ACTIVE_STATES)
        & other.claimed_by.is_null(False)
        & (other.heartbeat_at >= fresh_since)
    )


def heartbeat(job_id: str, actor: str) -> bool:
    """Extend the claim; False if the claim was lost (taken over or job ended)."""
    return (
        _guarded(
            job_id,
            (Job.claimed_by == actor) & Job.state.in_(ACTIVE_STATES),
            heartbeat_at=utcnow(),
            updated_at=Job.updated_at,
        )
        is not None
    )


def set_progress(job_id: str, actor: str, progress: dict[str, Any]) -> None:
    _guarded(
        job_id,
        (Job.claimed_by == actor) & Job.state.in_(ACTIVE_STATES),
        progress=progress,
        heartbeat_at=utcnow(),
    )


def update_fields(job_id: str, actor: str, **values: Any) -> None:
    """Set fields of a job this actor holds (e.g. preview_database_id)."""
    _guarded(job_id, (Job.claimed_by == actor) & Job.state.in_(ACTIVE_STATES), **values)


def advance(job_id: str, actor: str, stage: str, *, facts: dict[str, Any]) -> Job | None:
    """Commit `stage`'s result and move to the next stage, unclaimed, for a wake-up."""
    to_stage = next_stage(stage)
    assert to_stage is not None, "the last stage completes the job instead"
    with database.atomic():
        current = Job.get_by_id(job_id)
        job = _guarded(
            job_id,
            (Job.state == State.RUNNING.value) & (Job.stage == stage) & (Job.claimed_by == actor),
            stage=to_stage,
            claimed_by=None,
            claimed_at=None,
            heartbeat_at=None,
            attempts=0,
            error=None,
            retry_classification=None,
            facts={**current.facts, **facts},
        )
        if job:
            _event(
                job,
                actor,
                f"{stage} done",
                from_state=job.state,
                to_state=job.state,
                from_stage=stage,
                to_stage=to_stage,
            )
        return job


def complete(job_id: str, actor: str, *, facts: dict[str, Any], progress: dict[str, Any]) -> Job | None:
    now = utcnow()
    with database.atomic():
        current = Job.get_by_id(job_id)
        job = _guarded(
            job_id,
            (Job.state == State.RUNNING.value) & (Job.claimed_by == actor),
            state=State.COMPLETED.value,
            completed_at=now,
            claimed_by=None,
            heartbeat_at=None,
            error=None,
            retry_classification=None,
            progress=progress,
            facts={**current.facts, **facts},
        )
        if job:
            _event(
                job,
                actor,
                "import completed",
                from_state=State.RUNNING.value,
                to_state=job.state,
                from_stage=job.stage,
                to_stage=job.stage,
            )
        return job


def fail(
    job_id: str, actor: str, error: str, *, classification: str, holder: str | None = None
) -> Job | None:
    """Fail an active job. With `holder`, only if that claim still holds it. Worker file
    paths in `error` are replaced by neutral names (stages.workpaths)."""
    error = scrub_work_paths(error)
    where = Job.state.in_(ACTIVE_STATES)
    if holder is not None:
        where &= Job.claimed_by == holder
    with database.atomic():
        before = Job.get_or_none(Job.id == job_id)
        job = _guarded(
            job_id,
            where,
            state=State.FAILED.value,
            completed_at=utcnow(),
            claimed_by=None,
            heartbeat_at=None,
            error=error,
            retry_classification=classification,
        )
        if job and before:
            _event(
                job,
                actor,
                f"failed ({classification}): {error}",
                from_state=before.state,
                to_state=job.state,
                from_stage=job.stage,
                to_stage=job.stage,
            )
        return job


def release(job_id: str, actor: str, error: str, *, refund_attempt: bool = False) -> Job | None:
    """Give up the claim after a transient failure so a retry can claim again. With
    `refund_attempt` (a worker's shutdown, not a failure) the claim's attempt is not counted."""
    error = scrub_work_paths(error)
    with database.atomic():
        job = _guarded(
            job_id,
            (Job.state == State.RUNNING.value) & (Job.claimed_by == actor),
            claimed_by=None,
            heartbeat_at=None,
            error=error,
            retry_classification="transient",
            **({"attempts": peewee.fn.GREATEST(Job.attempts - 1, 0)} if refund_attempt else {}),
        )
        if job:
            _event(
                job,
                actor,
                f"{job.stage} will be retried: {error}" + (" (this attempt is not counted)" if refund_attempt else ""),
                from_state=job.state,
                to_state=job.state,
                from_stage=job.stage,
                to_stage=job.stage,
            )
        return job


def record_command(job_id: str, *, exit_code: int, stdout: str, stderr: str) -> None:
    """Store the last external command's result (already redacted) on the job, with
    worker file paths replaced by neutral names (stages.workpaths)."""
    Job.update(
        last_exit_code=exit_code,
        last_stdout=scrub_work_paths(stdout)[-OUTPUT_TAIL_CHARS:] or None,
        last_stderr=scrub_work_paths(stderr)[-OUTPUT_TAIL_CHARS:] or None,
        updated_at=utcnow(),
    ).where(Job.id == job_id).execute()


def cancel_reason(job_id: str) -> str | None:
    """The reason ("cancelled by <actor>") once a cancel of the job was requested, else None."""
    row = Job.select(Job.cancel_requested_at, Job.cancel_requested_by).where(Job.id == job_id).first()
    if row is None or row.cancel_requested_at is None:
        return None
    return f"cancelled by {row.cancel_requested_by or 'an operator'}"


def record_tool_process(job_id: str, actor: str, process: dict[str, Any]) -> None:
    """Note the external tool a claim just started (host, process group, program) in the
    job's facts, so whoever takes the stage over can make sure it is gone."""
    Job.update(facts=Job.facts.concat({"tool_process": process})).where(
        (Job.id == job_id) & (Job.claimed_by == actor) & Job.state.in_(ACTIVE_STATES)
    ).execute()


def events(job_id: str) -> list[JobEvent]:
    return list(JobEvent.select().where(JobEvent.job == job_id).order_by(JobEvent.id))


__all__ = [
    "OrganizationAtLimit",
    "Stage",
    "advance",
    "claim",
    "complete",
    "fail",
    "heartbeat",
    "release",
    "set_progress",
]
