"""Peewee models of the control database. The schema itself is in `migrations`."""

from __future__ import annotations

import datetime as dt
import enum
import logging
from typing import TYPE_CHECKING, Any

import peewee
import pydantic
from playhouse.postgres_ext import BinaryJSONField

from pipeline.db import database
from pipeline.steps.registry import STAGE_NAMES
from pipeline.steps.results import JobFacts, StageFacts

log = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


if TYPE_CHECKING:
    # To the type checker a DateTimeField: a datetime, or None where the column is null=True.
    TZField = peewee.DateTimeField
else:

    class TZField(peewee.DateTimeField):
        field_type = "TIMESTAMPTZ"


class State(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES = (State.PENDING.value, State.RUNNING.value)
FINAL_STATES = (State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value)


# The stages, in order, as the registry lists them (Stage.PREFLIGHT == "preflight"...).
if TYPE_CHECKING:
    # mypy cannot see the members of an enum built from a list at run time; this mirror
    # names them for it (tests/unit/test_stage_registry.py checks the real one has them).
    class Stage(enum.StrEnum):
        PREFLIGHT = "preflight"
        FETCH = "fetch"
        RESTORE = "restore"
        FINALIZE = "finalize"
else:
    Stage = enum.StrEnum("Stage", [(name.upper(), name) for name in STAGE_NAMES])

STAGE_ORDER = list(Stage)


class FactsField(BinaryJSONField):
    """The job's facts: JSON in the row, a `JobFacts` in code (parsed on read). Written
    as a stage result or JobFacts (what was set: `StageFacts.stored`) or plain JSON."""

    def db_value(self, value: Any) -> Any:
        return super().db_value(_stored(value))

    def concat(self, value: Any) -> Any:
        return super().concat(_stored(value))

    def concat_without(self, key: str, value: Any) -> Any:
        """`facts - key || value`: as `concat`, with `key` gone from the facts first."""
        return self.remove(key).concat(self.db_value(value))

    def python_value(self, value: Any) -> JobFacts | None:
        if value is None:
            return None
        if isinstance(value, JobFacts):
            return value
        try:
            return JobFacts.model_validate(value)
        except pydantic.ValidationError as err:
            # A row no version of the service wrote: shown as it is (the API, the CLI)
            # rather than not at all; a stage that reads the odd fact fails there.
            log.warning("job facts that do not match their types: %s", err)
            return JobFacts.model_construct(**value)


def _stored(value: Any) -> Any:
    return value.stored() if isinstance(value, StageFacts) else value


class BaseModel(peewee.Model):
    """A row of the control database. Each foreign key `x` also reads as `x_id`, the key
    itself (peewee's ObjectIdAccessor); the models declare those for the type checker."""

    class Meta:
        database = database
        legacy_table_names = False


class Organization(BaseModel):
    id = peewee.TextField(primary_key=True)
    name = peewee.TextField()
    clerk_org_id = peewee.TextField(null=True, unique=True)
    plan = peewee.TextField(default="free")
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "organizations"


class Cluster(BaseModel):
    id = peewee.TextField(primary_key=True)
    name = peewee.TextField(unique=True)
    admin_url_encrypted = peewee.TextField()
    server_major = peewee.IntegerField()
    created_at = TZField(default=utcnow)
    # Restores into this cluster at once; None follows CAPY_CLUSTER_RESTORE_LIMIT.
    restore_limit = peewee.IntegerField(null=True)

    class Meta:
        table_name = "clusters"


class Project(BaseModel):
    id = peewee.TextField(primary_key=True)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    cluster = peewee.ForeignKeyField(Cluster, column_name="cluster_id")
    cluster_id: str
    name = peewee.TextField()
    database_name = peewee.TextField(unique=True)
    storage_limit_bytes = peewee.BigIntegerField()
    role_name = peewee.TextField(null=True, unique=True)
    role_password_encrypted = peewee.TextField(null=True)
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "projects"


class ApiKey(BaseModel):
    id = peewee.TextField(primary_key=True)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    project = peewee.ForeignKeyField(Project, column_name="project_id", null=True)
    project_id: str | None
    key_prefix = peewee.TextField(unique=True)
    key_hash = peewee.TextField()
    name = peewee.TextField(default="")
    scopes = BinaryJSONField(default=list)
    expires_at = TZField(null=True)
    revoked_at = TZField(null=True)
    last_used_at = TZField(null=True)
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "api_keys"


class Job(BaseModel):
    id = peewee.TextField(primary_key=True)
    type = peewee.TextField(default="project.import")
    state = peewee.TextField(default=State.PENDING.value)
    stage = peewee.TextField(default=Stage.PREFLIGHT.value)
    progress = BinaryJSONField(default=dict)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    project = peewee.ForeignKeyField(Project, column_name="project_id")
    project_id: str
    cluster = peewee.ForeignKeyField(Cluster, column_name="cluster_id")
    cluster_id: str
    locked_resource = peewee.TextField(null=True)
    preview_database_id = peewee.TextField(null=True)
    attempts = peewee.IntegerField(default=0)
    max_attempts = peewee.IntegerField(default=3)
    claimed_by = peewee.TextField(null=True)
    claimed_at = TZField(null=True)
    heartbeat_at = TZField(null=True)
    started_at = TZField(null=True)
    completed_at = TZField(null=True)
    error = peewee.TextField(null=True)
    retry_classification = peewee.TextField(null=True)
    last_exit_code = peewee.IntegerField(null=True)
    last_stdout = peewee.TextField(null=True)
    last_stderr = peewee.TextField(null=True)
    # The request, as accepted: the source URL only ever encrypted.
    source_url_encrypted = peewee.TextField(null=True)
    source_url_redacted = peewee.TextField(null=True)
    upload_key = peewee.TextField(null=True)
    recreate = peewee.BooleanField(default=False)
    idempotency_key = peewee.TextField(null=True)
    # What stages hand to later stages (pipeline.steps.results).
    facts = FactsField(default=JobFacts)
    created_at = TZField(default=utcnow)
    updated_at = TZField(default=utcnow)
    # Keyed digest of the request an Idempotency-Key was first used with.
    request_hash = peewee.TextField(null=True)
    # A cancel asked for while a worker held the stage (pipeline.cancellation).
    cancel_requested_at = TZField(null=True)
    cancel_requested_by = peewee.TextField(null=True)
    # Not a column: on the row jobs.claim returns, the worker whose stale claim this
    # claim took over (None when the job was unclaimed).
    displaced_claim: str | None = None

    class Meta:
        table_name = "jobs"


class JobEvent(BaseModel):
    id = peewee.BigAutoField()
    job = peewee.ForeignKeyField(Job, column_name="job_id")
    job_id: str
    at = TZField(default=utcnow)
    actor = peewee.TextField()
    from_state = peewee.TextField(null=True)
    to_state = peewee.TextField(null=True)
    from_stage = peewee.TextField(null=True)
    to_stage = peewee.TextField(null=True)
    reason = peewee.TextField()

    class Meta:
        table_name = "job_events"


class AuditEvent(BaseModel):
    id = peewee.TextField(primary_key=True)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    project = peewee.ForeignKeyField(Project, column_name="project_id", null=True)
    project_id: str | None
    action = peewee.TextField()
    actor = peewee.TextField()
    target_id = peewee.TextField(null=True)
    details = BinaryJSONField(default=dict)
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "audit_events"


class RetiredDatabase(BaseModel):
    """A project database replaced by an import, kept until `drop_after`."""

    id = peewee.BigAutoField()
    cluster = peewee.ForeignKeyField(Cluster, column_name="cluster_id")
    cluster_id: str
    project = peewee.ForeignKeyField(Project, column_name="project_id")
    project_id: str
    job = peewee.ForeignKeyField(Job, column_name="job_id")
    job_id: str
    database_name = peewee.TextField()
    drop_after = TZField()
    dropped_at = TZField(null=True)
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "retired_databases"


class Upload(BaseModel):
    """An upload form issued for a project (see pipeline.uploads)."""

    id = peewee.TextField(primary_key=True)
    project = peewee.ForeignKeyField(Project, column_name="project_id")
    project_id: str
    object_key = peewee.TextField(unique=True)
    max_bytes = peewee.BigIntegerField()
    expires_at = TZField()
    created_at = TZField(default=utcnow)
    job = peewee.ForeignKeyField(Job, column_name="job_id", null=True)
    job_id: str | None
    deleted_at = TZField(null=True)

    class Meta:
        table_name = "uploads"


class RestoreSlot(BaseModel):
    """One claim of a job's restore stage holding one of its cluster's restore slots, or
    waiting for one (pipeline.restore_slots): it counts only while that claim holds the job."""

    job = peewee.ForeignKeyField(Job, column_name="job_id", primary_key=True)
    job_id: str
    cluster = peewee.ForeignKeyField(Cluster, column_name="cluster_id")
    cluster_id: str
    claimed_by = peewee.TextField()
    claimed_at = TZField()
    # When the job began to wait for a slot (its place in the cluster's queue)...
    queued_at = TZField()
    # ...and when it got one; None while it waits.
    acquired_at = TZField(null=True)

    class Meta:
        table_name = "restore_slots"


class WebhookEndpoint(BaseModel):
    """Where an organization's webhook events go (pipeline.webhooks)."""

    id = peewee.TextField(primary_key=True)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    url = peewee.TextField()
    description = peewee.TextField(default="")
    # The `whsec_…` signing secret, sealed (pipeline.sealing); shown once, at creation.
    secret_encrypted = peewee.TextField()
    created_at = TZField(default=utcnow)
    removed_at = TZField(null=True)

    class Meta:
        table_name = "webhook_endpoints"


class WebhookEvent(BaseModel):
    """An event recorded with the job state change it tells of; `payload` is the body sent."""

    id = peewee.TextField(primary_key=True)
    organization = peewee.ForeignKeyField(Organization, column_name="organization_id")
    organization_id: str
    type = peewee.TextField()
    job = peewee.ForeignKeyField(Job, column_name="job_id", null=True)
    job_id: str | None
    payload = peewee.TextField()
    created_at = TZField(default=utcnow)

    class Meta:
        table_name = "webhook_events"


class WebhookDelivery(BaseModel):
    """One event to one endpoint, until delivered or its attempts run out."""

    id = peewee.TextField(primary_key=True)
    event = peewee.ForeignKeyField(WebhookEvent, column_name="event_id")
    event_id: str
    endpoint = peewee.ForeignKeyField(WebhookEndpoint, column_name="endpoint_id")
    endpoint_id: str
    state = peewee.TextField(default="pending")
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = TZField(default=utcnow)
    locked_until = TZField(null=True)
    last_status_code = peewee.IntegerField(null=True)
    last_error = peewee.TextField(null=True)
    created_at = TZField(default=utcnow)
    updated_at = TZField(default=utcnow)
    completed_at = TZField(null=True)

    class Meta:
        table_name = "webhook_deliveries"


class WebhookAttempt(BaseModel):
    """One HTTP attempt of a delivery: what the endpoint answered, or why it did not."""

    id = peewee.BigAutoField()
    delivery = peewee.ForeignKeyField(WebhookDelivery, column_name="delivery_id")
    delivery_id: str
    attempt = peewee.IntegerField()
    at = TZField()
    status_code = peewee.IntegerField(null=True)
    error = peewee.TextField(null=True)
    duration_ms = peewee.IntegerField()

    class Meta:
        table_name = "webhook_attempts"
