"""HTTP resources. Each parses the request, calls one core function, and answers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import falcon

from app import schemas
from app.body import read_body
from app.edge import IDEMPOTENCY_KEY, LIMIT
from app.openapi import operation
from pipeline import audit, cancellation
from pipeline.config import Settings
from pipeline.errors import Forbidden, InvalidRequest, NotFound
from pipeline.import_steps import ImportSteps
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, Project
from pipeline.preflights import run_preflight
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.serialize import audit_json, job_json
from pipeline.uploads import Uploads
from stages.connections.pgurl import SourceURL
from stages.errors import CapyError


def _principal(req: falcon.Request) -> Principal:
    principal: Principal = req.context.principal
    return principal


def _source_request(
    req: falcon.Request,
    project: Project,
    uploads: Uploads,
    settings: Settings,
    schema: type[schemas.SourceRequest],
) -> ImportRequest:
    """The request's source, validated: the body by its schema, a source URL by the
    source rules, an upload key as one of this project's that exists."""
    body = read_body(req, schema, max_bytes=settings.max_body_bytes)
    try:
        if "upload_key" not in body.model_fields_set:  # the schema allows exactly one source
            return ImportRequest(recreate=body.recreate, source=SourceURL.parse_source(body.source_url))
        key = uploads.validate_key(body.upload_key, project)
    except CapyError as err:
        raise InvalidRequest(err.message) from err
    uploads.require_object(key, project)
    return ImportRequest(recreate=body.recreate, upload_key=key)


class ImportsResource:
    def __init__(
        self, settings: Settings, sealer: Sealer, wake: Callable[[str, str], None], uploads: Uploads
    ) -> None:
        self.settings = settings
        self.sealer = sealer
        self.wake = wake
        self.uploads = uploads

    @operation(
        "Start an import into the project (replaces its database once the import is verified).",
        body=schemas.ImportBody,
        responses={202: schemas.JobEnvelope, 200: schemas.JobEnvelope},
        located=(202, 200),
        headers=(IDEMPOTENCY_KEY,),
        errors=(404, 409, 413, 415, 422),
        notes={
            202: "The job, pending.",
            200: "A retried request with the same Idempotency-Key and body: the job it made.",
            404: "Unknown project, or nothing was uploaded at upload_key.",
            409: "Another import holds the project (the message names its job), or the upload was imported already.",
        },
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        request = _source_request(req, project, self.uploads, self.settings, schemas.ImportBody)
        job, created = start_import(
            project,
            _principal(req),
            request,
            settings=self.settings,
            sealer=self.sealer,
            wake=self.wake,
            idempotency_key=IDEMPOTENCY_KEY.read(req),
        )
        resp.status = falcon.HTTP_202 if created else falcon.HTTP_200
        resp.location = f"/v1/jobs/{job.id}"
        resp.media = schemas.dump(schemas.JobEnvelope, {"job": job_json(job)})


class PreflightResource:
    """Synchronous preflight: reads the source or the upload's head, changes nothing."""

    def __init__(self, settings: Settings, sealer: Sealer, uploads: Uploads) -> None:
        self.settings = settings
        self.sealer = sealer
        self.uploads = uploads

    @operation(
        "Check a source or an uploaded dump against the project, changing nothing.",
        body=schemas.PreflightBody,
        responses={200: schemas.PreflightEnvelope},
        errors=(404, 413, 415),
        notes={
            200: "The checks; ok is false if and only if some check fails.",
            404: "Unknown project, or nothing was uploaded at upload_key.",
            429: "Rate limited, or the organization already runs its allowed preflights at once.",
        },
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        request = _source_request(req, project, self.uploads, self.settings, schemas.PreflightBody)
        result = run_preflight(
            project, _principal(req), request, self.settings, self.sealer, self.uploads.store
        )
        resp.media = schemas.dump(schemas.PreflightEnvelope, {"preflight": result.response()})


class UploadsResource:
    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    @operation(
        "Create a presigned form to upload a dump to (no body).",
        responses={201: schemas.UploadEnvelope},
        errors=(404,),
        notes={429: "Rate limited, or the project has as many unused upload forms as it may."},
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        resp.status = falcon.HTTP_201
        resp.media = schemas.dump(
            schemas.UploadEnvelope, {"upload": self.uploads.create(project, _principal(req))}
        )


def _job(req: falcon.Request, job_id: str, *, hidden: tuple[type[Exception], ...] = (NotFound,)) -> Job:
    """The job, if the caller may see its project; another organization's job is 404
    (and so are those whose refusal is in `hidden`)."""
    job = Job.get_or_none(Job.id == job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    try:
        _principal(req).project(job.project_id)
    except hidden:
        raise NotFound(f"job {job_id} does not exist") from None
    return job


class JobResource:
    @operation("A job.", responses={200: schemas.JobEnvelope}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = schemas.dump(schemas.JobEnvelope, {"job": job_json(_job(req, job_id))})


class CancelResource:
    """202 with the job: `cancelled` when nobody was running it, else as it is with
    `cancel_requested_at` set (the worker ends it `cancelled` within seconds)."""

    def __init__(self, steps: ImportSteps) -> None:
        self.steps = steps

    @operation(
        "Cancel a job.",
        responses={202: schemas.JobEnvelope},
        located=(202,),
        errors=(404, 409),
        notes={
            202: "The job: cancelled, or with cancel_requested_at set while its worker stops.",
            409: "The job has ended already, or kept changing while it was being cancelled.",
        },
    )
    def on_post(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        # A key scoped to another project of the organization may not act on the job: 404.
        job = _job(req, job_id, hidden=(NotFound, Forbidden))
        outcome = cancellation.request_cancel(
            job.id,
            _principal(req).actor,
            lease=dt.timedelta(seconds=self.steps.settings.lease_seconds),
            cleanup=lambda done: self.steps.cleanup(done, succeeded=False),
        )
        resp.status = falcon.HTTP_202
        resp.location = f"/v1/jobs/{job.id}"
        resp.media = schemas.dump(schemas.JobEnvelope, {"job": job_json(outcome.job)})


class ProjectJobsResource:
    @operation(
        "The project's jobs, newest first.", responses={200: schemas.JobList}, query=(LIMIT,), errors=(404,)
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        jobs = (
            Job.select()
            .where(Job.project == project.id)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(LIMIT.read(req))
        )
        resp.media = schemas.dump(schemas.JobList, {"jobs": [job_json(job) for job in jobs]})


class AuditEventsResource:
    @operation(
        "The project's audit events, newest first.",
        responses={200: schemas.AuditEventList},
        query=(LIMIT,),
        errors=(404,),
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        events = [audit_json(e) for e in audit.for_project(project, LIMIT.read(req))]
        resp.media = schemas.dump(schemas.AuditEventList, {"audit_events": events})


class HealthResource:
    auth_required = False

    @operation("Liveness: the web process answers.", responses={200: schemas.Health}, authenticated=False)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """Ready when every dependency answers now; 503 naming the ones that do not.

    Each check asks its dependency afresh, within a few seconds: the database on this
    request's own connection, the broker through the dispatcher that publishes (a
    round trip on its connection, reopened if it was lost), storage with short timeouts.
    """

    auth_required = False

    def __init__(self, checks: dict[str, Callable[[], Any]]) -> None:
        self.checks = checks

    @operation(
        "Readiness: the database, broker and storage answer now.",
        responses={200: schemas.Ready, 503: schemas.NotReady},
        authenticated=False,
        notes={503: "Not ready: the checks name the dependencies that did not answer."},
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        results: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                check()
                results[name] = "ok"
            except CapyError as err:  # ours say what is wrong, without secrets
                results[name] = f"unavailable: {err.message}"
            except Exception as err:  # any other failure means "not ready"; say which
                results[name] = f"unavailable: {type(err).__name__}"
        down = [name for name, state in results.items() if state != "ok"]
        if down:
            resp.status = falcon.HTTP_503
            resp.media = {"error": f"not ready: {', '.join(down)} unavailable", "checks": results}
        else:
            resp.media = {"status": "ready", "checks": results}
