"""The job state machine. The job table is the source of truth; messages are wake-ups.

`transition()` is the only way a job's state, stage or claim changes: a guarded UPDATE
(`... WHERE id = ? AND <guard>`) that writes its job event in the same transaction. A
guard that matches no row means someone else already moved the job, and the caller
does nothing. What a stage writes while it runs (progress, facts, the last command's
output, its preview) is guarded by its claim (`claimed_by = actor AND state =
'running'`): a worker whose claim was taken over changes nothing, and learns so
(`ClaimLost`). Facts are merged in the statement (jsonb `||`), never read, modified
and written back.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import peewee

from pipeline.db import database
from pipeline.models import (
    ACTIVE_STATES,
    Job,
    JobEvent,
    Stage,
    State,
)
from pipeline.models import utcnow as utcnow  # re-exported: the lease's and the runner's clock
from pipeline.steps.registry import STAGE_NAMES
from pipeline.steps.results import JobFacts, StageFacts, ToolProcess
from pipeline.webhooks import events as webhook_events
from stages.errors import CapyError
from stages.tools.workpaths import scrub_work_paths

OUTPUT_TAIL_CHARS = 4000


def worker_id() -> str:
    """host:pid:thread, as shown in `claimed_by`."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def next_stage(stage: str) -> str | None:
    """The stage after `stage` in the registry (pipeline.steps.registry); None after the last."""
    index = STAGE_NAMES.index(stage)
    return STAGE_NAMES[index + 1] if index + 1 < len(STAGE_NAMES) else None


def _guarded(job_id: str, where: peewee.Expression, **values: Any) -> Job | None:
    values.setdefault("updated_at", utcnow())
    rows = list(Job.update(**values).where((Job.id == job_id) & where).returning(Job).execute())
    return rows[0] if rows else None


Reason = str | Callable[[Job, Job], str]


def transition(
    job_id: str, actor: str, reason: Reason, *, where: peewee.Expression, **values: Any
) -> Job | None:
    """Change the job (state, stage, claim and what goes with them) if `where` still
    holds, and record the change as a job event in the same transaction; None when the
    guard matched nothing (someone else moved the job: do nothing).

    `reason` is the event's text, or a function of (the row before, the row after).
    The row is locked first, so the event's `from_*` are what the update changed.
    A change that ends the job also records its webhook events in the same transaction
    (pipeline.webhooks.events), sent once it has committed.
    """
    with database.atomic():
        before = Job.select().where(Job.id == job_id).for_update().first()
        if before is None:
            return None
        job = _guarded(job_id, where, **values)
        if job is None:
            return None
        JobEvent.create(
            job=job.id,
            actor=actor,
            reason=reason if isinstance(reason, str) else reason(before, job),
            from_state=before.state,
            to_state=job.state,
            from_stage=before.stage,
            to_stage=job.stage,
        )
        deliveries = webhook_events.record(before, job)
    webhook_events.notify(deliveries)
    return job


def held_by(actor: str) -> peewee.Expression:
    """The guard of every write a running stage makes: it still holds the job."""
    return (Job.claimed_by == actor) & (Job.state == State.RUNNING.value)


class ClaimLost(CapyError):
    """This worker's claim of the job was taken over, or the job ended meanwhile; the
    stage stops and changes nothing more (whoever holds the job now owns its preview)."""


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

        displaced: list[str | None] = []

        def claimed(prior: Job, job: Job) -> str:
            displaced.append(prior.claimed_by)
            reason = f"{stage} claimed (attempt {job.attempts} of {job.max_attempts})"
            if prior.claimed_by and prior.claimed_by != actor:
                reason += f", taking over the stale claim of {prior.claimed_by}"
            return reason

        job = transition(
            job_id,
            actor,
            claimed,
            where=where,
            state=State.RUNNING.value,
            claimed_by=actor,
            claimed_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=peewee.fn.COALESCE(Job.started_at, now),
        )
        if job is not None:
            job.displaced_claim = displaced[0] if displaced else None
            return job
        if org_limit is None or not Job.select().where((Job.id == job_id) & claimable).exists():
            return None
        active = _org_claims(before.organization_id, job_id, now - lease).scalar()
        refused = OrganizationAtLimit(active, org_limit)
        # Only progress: the job stays unclaimed, in its state and stage.
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
    raise refused


def _org_claims(organization_id: str, job_id: str, fresh_since: dt.datetime) -> peewee.SelectBase:
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


def set_progress(job_id: str, actor: str, progress: dict[str, Any]) -> bool:
    """Replace the progress of a job this actor holds; False if it no longer does."""
    return _guarded(job_id, held_by(actor), progress=progress, heartbeat_at=utcnow()) is not None


def set_preview(job_id: str, actor: str, preview: str) -> bool:
    """Record the preview database a stage of a job this actor holds is making."""
    return _guarded(job_id, held_by(actor), preview_database_id=preview) is not None


def merge_facts(job_id: str, actor: str, facts: StageFacts) -> bool:
    """Merge the fields set in `facts` into the facts of a job this actor holds, in one
    statement (jsonb `||`: what another writer merged meanwhile stays); False if it no
    longer holds it."""
    return _guarded(job_id, held_by(actor), facts=Job.facts.concat(facts)) is not None


def mark_upload_deleted(job_id: str) -> None:
    """Note in an ended job's facts that its upload was deleted (cleanup, sweep)."""
    Job.update(facts=Job.facts.concat(JobFacts(upload_deleted=True))).where(
        (Job.id == job_id) & ~Job.state.in_(ACTIVE_STATES)
    ).execute()


def advance(job_id: str, actor: str, stage: str, *, facts: StageFacts) -> Job | None:
    """Commit `stage`'s result (merged into the job's facts) and move to the next stage,
    unclaimed, for a wake-up."""
    to_stage = next_stage(stage)
    if to_stage is None:
        raise ValueError(f"{stage} is the last stage: complete the job instead")
    return transition(
        job_id,
        actor,
        f"{stage} done",
        where=held_by(actor) & (Job.stage == stage),
        stage=to_stage,
        claimed_by=None,
        claimed_at=None,
        heartbeat_at=None,
        attempts=0,
        error=None,
        retry_classification=None,
        facts=_ended(facts),
    )


def _ended(facts: StageFacts) -> Any:
    """The job's facts once a stage ends well, its result merged: every tool it started
    has exited, so the record of the last one (`tool_process`) goes, and the next claim
    has no earlier claim's tool to look for (ImportSteps.take_over)."""
    return Job.facts.concat_without("tool_process", facts)


def complete(
    job_id: str, actor: str, stage: str, *, facts: StageFacts, progress: dict[str, Any]
) -> Job | None:
    """Complete a job this actor holds at its last stage, `stage`, its result merged
    into the job's facts."""
    if next_stage(stage) is not None:
        raise ValueError(f"a job completes only at its last stage, not at {stage}")
    return transition(
        job_id,
        actor,
        "import completed",
        where=held_by(actor) & (Job.stage == stage),
        state=State.COMPLETED.value,
        completed_at=utcnow(),
        claimed_by=None,
        heartbeat_at=None,
        error=None,
        retry_classification=None,
        progress=progress,
        facts=Job.facts.concat(facts),
    )


def fail(
    job_id: str,
    actor: str,
    error: str,
    *,
    classification: str,
    holder: str | None = None,
    stale_before: dt.datetime | None = None,
) -> Job | None:
    """Fail an active job. With `holder`, only if that claim still holds it; with
    `stale_before`, only if nobody holds it with a heartbeat since then. Worker file
    paths in `error` are replaced by neutral names (stages.tools.workpaths)."""
    error = scrub_work_paths(error)
    where = Job.state.in_(ACTIVE_STATES)
    if holder is not None:
        where &= Job.claimed_by == holder
    if stale_before is not None:
        where &= Job.claimed_by.is_null() | Job.heartbeat_at.is_null() | (Job.heartbeat_at < stale_before)
    return transition(
        job_id,
        actor,
        f"failed ({classification}): {error}",
        where=where,
        state=State.FAILED.value,
        completed_at=utcnow(),
        claimed_by=None,
        heartbeat_at=None,
        error=error,
        retry_classification=classification,
    )


def release(job_id: str, actor: str, error: str, *, refund_attempt: bool = False) -> Job | None:
    """Give up the claim after a transient failure so a retry can claim again. With
    `refund_attempt` (a worker's shutdown, not a failure) the claim's attempt is not counted."""
    error = scrub_work_paths(error)
    return transition(
        job_id,
        actor,
        lambda before, job: (
            f"{job.stage} will be retried: {error}"
            + (" (this attempt is not counted)" if refund_attempt else "")
        ),
        where=held_by(actor),
        claimed_by=None,
        heartbeat_at=None,
        error=error,
        retry_classification="transient",
        **({"attempts": peewee.fn.GREATEST(Job.attempts - 1, 0)} if refund_attempt else {}),
    )


def hand_back(job_id: str, actor: str, reason: str) -> Job | None:
    """Give up the claim without a failure, the claim's attempt not counted: the stage
    waits for something outside the job (a restore slot) and is claimed again later.
    The job's `error` and progress are left as they are."""
    return transition(
        job_id,
        actor,
        reason,
        where=held_by(actor),
        claimed_by=None,
        heartbeat_at=None,
        attempts=peewee.fn.GREATEST(Job.attempts - 1, 0),
    )


def record_command(job_id: str, actor: str, *, exit_code: int, stdout: str, stderr: str) -> bool:
    """Store the last external command's result (already redacted) on a job this actor
    holds, with worker file paths replaced by neutral names (stages.tools.workpaths)."""
    return (
        _guarded(
            job_id,
            held_by(actor),
            last_exit_code=exit_code,
            last_stdout=scrub_work_paths(stdout)[-OUTPUT_TAIL_CHARS:] or None,
            last_stderr=scrub_work_paths(stderr)[-OUTPUT_TAIL_CHARS:] or None,
        )
        is not None
    )


def cancel_reason(job_id: str) -> str | None:
    """The reason ("cancelled by <actor>") once a cancel of the job was requested, else None."""
    row = Job.select(Job.cancel_requested_at, Job.cancel_requested_by).where(Job.id == job_id).first()
    if row is None or row.cancel_requested_at is None:
        return None
    return f"cancelled by {row.cancel_requested_by or 'an operator'}"


def record_tool_process(job_id: str, actor: str, process: ToolProcess) -> bool:
    """Note the external tool a claim just started (host, process group, program) in the
    job's facts, so whoever takes the stage over can make sure it is gone."""
    return merge_facts(job_id, actor, JobFacts(tool_process=process))


def events(job_id: str) -> list[JobEvent]:
    return list(JobEvent.select().where(JobEvent.job == job_id).order_by(JobEvent.id))


__all__ = [
    "ClaimLost",
    "OrganizationAtLimit",
    "Stage",
    "advance",
    "claim",
    "complete",
    "fail",
    "hand_back",
    "heartbeat",
    "merge_facts",
    "record_command",
    "release",
    "set_preview",
    "set_progress",
    "transition",
]
