"""Audit events: who asked for what, recorded when the request is accepted."""

from __future__ import annotations

from typing import Any

from pipeline.ids import new_id
from pipeline.models import AuditEvent, Project

IMPORT_STARTED = "project.import_started"
IMPORT_PREFLIGHT = "project.import_preflight"
IMPORT_UPLOAD_CREATED = "project.import_upload_created"


def record(
    project: Project,
    action: str,
    actor: str,
    *,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit event. `details` must already be free of secrets."""
    return AuditEvent.create(
        id=new_id("aud"),
        organization=project.organization_id,
        project=project.id,
        action=action,
        actor=actor,
        target_id=target_id,
        details=details or {},
    )


def for_project(project: Project, limit: int) -> list[AuditEvent]:
    return list(
        AuditEvent.select()
        .where(AuditEvent.project == project.id)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit)
    )
