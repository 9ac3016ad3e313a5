"""The published JSON shapes of jobs and audit events."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pipeline.models import AuditEvent, Job

JOB_FIELDS = (
    "attempts",
    "claimed_at",
    "claimed_by",
    "cluster_id",
    "completed_at",
    "created_at",
    "error",
    "id",
    "last_exit_code",
    "last_stderr",
    "last_stdout",
    "locked_resource",
    "max_attempts",
    "organization_id",
    "preview_database_id",
    "project_id",
    "retry_classification",
    "started_at",
    "state",
    "type",
    "updated_at",
)


def timestamp(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _value(job: Job, name: str) -> Any:
    if name.endswith("_id") and name != "preview_database_id":
        return getattr(job, name)  # the raw foreign key, no query
    value = getattr(job, name)
    return timestamp(value) if isinstance(value, dt.datetime) else value


def job_json(job: Job) -> dict[str, Any]:
    """The published job object, plus `stage`, `progress` and (when done) `report`."""
    out = {name: _value(job, name) for name in JOB_FIELDS}
    out["stage"] = job.stage
    out["progress"] = job.progress or {}
    out["source"] = (
        {"kind": "upload", "upload_key": job.upload_key}
        if job.upload_key
        else {
            "kind": "live",
            "url": job.source_url_redacted,
        }
    )
    out["recreate"] = job.recreate
    # Set when a cancel was asked for; the state turns `cancelled` when the worker stops.
    out["cancel_requested_at"] = timestamp(job.cancel_requested_at)
    if job.facts is not None and job.facts.report is not None:
        out["report"] = job.facts.report
    return out


def audit_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "action": event.action,
        "actor": event.actor,
        "organization_id": event.organization_id,
        "project_id": event.project_id,
        "target_id": event.target_id,
        "details": event.details,
        "created_at": timestamp(event.created_at),
    }
