"""Accepting an import request: validate, create the job, record, and wake a worker."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import peewee

from pipeline import audit, uploads
from pipeline.config import Settings
from pipeline.db import database
from pipeline.errors import Conflict, IdempotencyKeyReused
from pipeline.ids import new_id
from pipeline.models import ACTIVE_STATES, Job, JobEvent, Project, Stage, State, utcnow
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.connections.pgurl import SourceURL
from stages.errors import CapyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportRequest:
    """A validated import or preflight request (app.resources reads it from the body,
    validated by app.schemas): a live source or an upload's key."""

    recreate: bool
    source: SourceURL | None = None
    upload_key: str | None = None

    def canonical(self) -> str:
        """The request as one string: equal requests give equal strings (Idempotency-Key)."""
        return json.dumps(
            {
                "recreate": self.recreate,
                "source_url": self.source.url() if self.source else None,
                "upload_key": self.upload_key,
            },
            sort_keys=True,
        )


def active_job(project: Project) -> Job | None:
    job: Job | None = (
        Job.select()
        .where((Job.project == project.id) & Job.state.in_(ACTIVE_STATES))
        .order_by(Job.created_at.desc())
        .first()
    )
    return job


def _replay(project: Project, idempotency_key: str, canonical: str, sealer: Sealer) -> Job | None:
    """The job this Idempotency-Key already made for the same request, if any."""
    existing = Job.get_or_none((Job.project == project.id) & (Job.idempotency_key == idempotency_key))
    if existing is None:
        return None
    # Jobs made before request digests were stored (request_hash NULL) replay as before.
    if existing.request_hash and not sealer.digest_matches(canonical, existing.request_hash):
        raise IdempotencyKeyReused(
            f"this Idempotency-Key was already used for a different request (job {existing.id}); "
            "send a new key for a new request, or resend the original request unchanged"
        )
    return existing


def start_import(
    project: Project,
    principal: Principal,
    request: ImportRequest,
    *,
    settings: Settings,
    sealer: Sealer,
    wake: Callable[[str, str], None],
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Create the job (pending, preflight) and enqueue its first stage.

    `wake` raises CapyError when the broker did not confirm the wake-up; the job is then
    returned all the same, pending and queued for dispatch (see _queued_for_dispatch).
    Returns (job, created). A repeated Idempotency-Key with the same request returns the
    first job with created False; with a different request, IdempotencyKeyReused. A
    second active import on the project raises Conflict.
    """
    canonical = request.canonical()
    if idempotency_key:
        existing = _replay(project, idempotency_key, canonical, sealer)
        if existing:
            return existing, False
    job_id = new_id("job")
    try:
        with database.atomic():
            job = Job.create(
                id=job_id,
                state=State.PENDING.value,
                stage=Stage.PREFLIGHT.value,
                organization=project.organization_id,
                project=project.id,
                cluster=project.cluster_id,
                locked_resource=f"project:{project.id}",
                max_attempts=settings.max_attempts,
                source_url_encrypted=sealer.seal(request.source.url()) if request.source else None,
                source_url_redacted=request.source.redacted() if request.source else None,
                upload_key=request.upload_key,
                recreate=request.recreate,
                idempotency_key=idempotency_key,
                request_hash=sealer.digest(canonical) if idempotency_key else None,
                progress={"phase": "queued"},
            )
            if request.upload_key:
                uploads.mark_used(request.upload_key, job_id)
            audit.record(
                project,
                audit.IMPORT_STARTED,
                principal.actor,
                target_id=job_id,
                details={
                    "source": request.source.redacted() if request.source else None,
                    "upload_key": request.upload_key,
                    "recreate": request.recreate,
                },
            )
            JobEvent.create(
                job=job_id,
                actor=principal.actor,
                to_state=job.state,
                to_stage=job.stage,
                reason="import requested",
            )
    except peewee.IntegrityError as err:
        if idempotency_key:
            existing = _replay(project, idempotency_key, canonical, sealer)
            if existing:
                return existing, False
        holder = active_job(project)
        if holder is None:
            raise
        raise Conflict(
            f"project {project.id} already has an active import, job {holder.id} "
            f"({holder.state}, stage {holder.stage}); wait for it to finish or cancel it"
        ) from err
    try:
        wake(job_id, Stage.PREFLIGHT.value)
    except CapyError as err:
        return _queued_for_dispatch(job, err), True
    return job, True


def _queued_for_dispatch(job: Job, err: CapyError) -> Job:
    """The job is recorded but its wake-up was not confirmed: say so in its progress.

    The job row is the outbox (pipeline/dispatcher.py says why): the web process keeps
    publishing the wake-up, and `capy-imports sweep` re-wakes a pending job never
    picked up. Only a job nobody has claimed yet is touched, and no event is written:
    nothing changed state, and the sweep counts events to find jobs never published.
    """
    log.warning("job %s is recorded but not yet dispatched: %s", job.id, err.message)
    progress = {
        "phase": "queued",
        "detail": (
            "queued for dispatch: the job queue did not accept the job in time; it is recorded and "
            "starts automatically when the queue is back (no need to send the request again)"
        ),
    }
    rows = list(
        Job.update(progress=progress, updated_at=utcnow())
        .where((Job.id == job.id) & (Job.state == State.PENDING.value) & Job.claimed_by.is_null())
        .returning(Job)
        .execute()
    )
    return rows[0] if rows else Job.get_by_id(job.id)
