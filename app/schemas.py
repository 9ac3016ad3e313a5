"""The API's request and response bodies as pydantic models: one source of truth.

Request models validate what a client sends (app.body.read_body); response models
shape what the API answers (`dump`); app.openapi builds the OpenAPI document from both.
A field that is left out when it has no value (rather than sent as null) is declared
with `absent()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator

from pipeline.models import Stage, State

# Timestamps are produced by pipeline.serialize.timestamp (ISO 8601, UTC, "Z").
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
if TYPE_CHECKING:  # the values come from the enums at run time; a type checker sees text
    JobState = str
    JobStage = str
else:
    JobState = Literal[tuple(s.value for s in State)]
    JobStage = Literal[tuple(s.value for s in Stage)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def absent(description: str = "") -> Any:
    """A field that is left out, never null, when it has no value."""
    return Field(default=None, description=description or None, json_schema_extra=_no_default)


class Request(BaseModel):
    """Exactly the declared fields, with their JSON types (no "true" for true)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Response(BaseModel):
    """Exactly the declared fields: the document and the answers cannot drift apart."""

    model_config = ConfigDict(extra="forbid")


def dump(model: type[Response], data: Any) -> dict[str, Any]:
    """`data` shaped by `model`: validated, and without fields it left out."""
    return model.model_validate(data).model_dump(mode="json", exclude_unset=True)


# Requests ---------------------------------------------------------------------------

SOURCE_URL = "A live Postgres source: postgres://user:password@host:5432/dbname."
UPLOAD_KEY = "The object_key of an upload of this project (POST …/imports/uploads)."
EXACTLY_ONE = (
    'send exactly one of "source_url" (a live postgres:// URL) or "upload_key" (the object_key of an upload)'
)


def _must_be_true(value: bool) -> bool:
    if value is not True:
        raise ValueError("must be true")
    return value


# The JSON Schema of `_one_source`.
ONE_SOURCE: list[JsonValue] = [{"required": ["source_url"]}, {"required": ["upload_key"]}]


class SourceRequest(Request):
    recreate: bool = Field(
        default=False, description="Replace a project database that already holds objects (default false)."
    )
    source_url: str = absent(SOURCE_URL)
    upload_key: str = absent(UPLOAD_KEY)

    @model_validator(mode="after")
    def _one_source(self) -> SourceRequest:
        if ("source_url" in self.model_fields_set) == ("upload_key" in self.model_fields_set):
            raise ValueError(EXACTLY_ONE)
        return self


class ImportBody(SourceRequest):
    """POST /v1/projects/{project_id}/imports."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": ONE_SOURCE,
            "examples": [
                {"confirm": True, "source_url": "postgres://app:secret@db.example.com:5432/shop"},
                {"confirm": True, "recreate": True, "upload_key": "imports/prj_example/upl_example/dump"},
            ],
        }
    )

    confirm: Annotated[bool, AfterValidator(_must_be_true)] = Field(
        json_schema_extra={"const": True},
        description="Must be true: an import replaces the project's database.",
    )


class PreflightBody(SourceRequest):
    """POST /v1/projects/{project_id}/imports/preflight."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": ONE_SOURCE,
            "examples": [{"source_url": "postgres://app:secret@db.example.com:5432/shop"}],
        }
    )

    confirm: bool = absent("Accepted (so an import's body can be sent as it is), not needed.")


# Responses --------------------------------------------------------------------------


class ErrorBody(Response):
    """Every error: a message a person can act on."""

    error: str


class UploadSource(Response):
    kind: Literal["upload"]
    upload_key: str


class LiveSource(Response):
    kind: Literal["live"]
    url: str | None = Field(description="The source URL with its password redacted.")


class Job(Response):
    attempts: int
    cancel_requested_at: Timestamp | None
    claimed_at: Timestamp | None
    claimed_by: str | None
    cluster_id: str
    completed_at: Timestamp | None
    created_at: Timestamp
    error: str | None
    id: str
    last_exit_code: int | None
    last_stderr: str | None
    last_stdout: str | None
    locked_resource: str | None
    max_attempts: int
    organization_id: str
    preview_database_id: str | None
    progress: dict[str, Any] = Field(description="Phase, bytes and tables done of total, ETA.")
    project_id: str
    recreate: bool
    report: dict[str, Any] = absent("What the import copied, once it completed.")
    retry_classification: Literal["transient", "permanent"] | None
    source: UploadSource | LiveSource = Field(discriminator="kind")
    stage: JobStage
    started_at: Timestamp | None
    state: JobState
    type: Literal["project.import"]
    updated_at: Timestamp


class JobEnvelope(Response):
    job: Job


class JobList(Response):
    jobs: list[Job] = Field(description="Newest first.")


class Upload(Response):
    """A presigned form: POST `fields` and the dump (as `file`) to `upload_url`."""

    object_key: str
    upload_url: str
    fields: dict[str, str]
    method: Literal["POST"]
    max_bytes: int
    expires_at: Timestamp


class UploadEnvelope(Response):
    upload: Upload


class PreflightCheck(Response):
    name: str
    status: Literal["pass", "warn", "fail"]
    detail: str


class PreflightReport(Response):
    checks: list[PreflightCheck]
    ok: bool = Field(description="False if and only if some check fails.")
    source: dict[str, Any] = Field(description="What was learnt of the source or the dump.")
    storage_limit_bytes: int
    target_version: str


class PreflightEnvelope(Response):
    preflight: PreflightReport


class AuditEvent(Response):
    id: str
    action: str
    actor: str
    organization_id: str
    project_id: str | None
    target_id: str | None
    details: dict[str, Any] | None
    created_at: Timestamp


class AuditEventList(Response):
    audit_events: list[AuditEvent] = Field(description="Newest first.")


class Health(Response):
    status: Literal["ok"]


class Ready(Response):
    status: Literal["ready"]
    checks: dict[str, str]


class NotReady(Response):
    error: str
    checks: dict[str, str] = Field(description='Each dependency: "ok" or "unavailable: <why>".')


class OpenAPIDocument(BaseModel):
    """The OpenAPI 3.1 document of this API."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]
