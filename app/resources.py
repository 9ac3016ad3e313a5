"""HTTP resources. Each parses the request, calls one core function, and answers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import falcon

from app.body import read_json
from app.edge import idempotency_key, query_int
from pipeline import audit, cancellation
from pipeline.config import Settings
from pipeline.errors import Forbidden, NotFound
from pipeline.import_steps import ImportSteps
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, Project
from pipeline.preflights import run_preflight
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.serialize import audit_json, job_json
from pipeline.uploads import Uploads
from stages.errors import CapyError


def _limit(req: falcon.Request, default: int = 25, maximum: int = 100) -> int:
    return query_int(req, "limit", default=default, minimum=1, maximum=maximum)


def _principal(req: falcon.Request) -> Principal:
    principal: Principal = req.context.principal
    return principal


def _source_request(
    req: falcon.Request,
    project: Project,
    uploads: Uploads,
    settings: Settings,
    parse: Callable[..., ImportRequest],
) -> ImportRequest:
    """The request's source, validated: an upload key must be this project's and exist."""
    body = read_json(req, max_bytes=settings.max_body_bytes)
    request = parse(body, validate_key=lambda key: uploads.validate_key(key, project))
    if request.upload_key:
        uploads.require_object(request.upload_key, project)
    return request


class ImportsResource:
    def __init__(
        self, settings: Settings, sealer: Sealer, wake: Callable[[str, str], None], uploads: Uploads
    ) -> None:
        self.settings = settings
        self.sealer = sealer
        self.wake = wake
        self.uploads = uploads

    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        request = _source_request(req, project, self.uploads, self.settings, ImportRequest.parse)
        job, created = start_import(
            project,
            _principal(req),
            request,
            settings=self.settings,
            sealer=self.sealer,
            wake=self.wake,
            idempotency_key=idempotency_key(req),
        )
        resp.status = falcon.HTTP_202 if created else falcon.HTTP_200
        resp.location = f"/v1/jobs/{job.id}"
        resp.media = {"job": job_json(job)}


class PreflightResource:
    """Synchronous preflight: reads the source or the upload's head, changes nothing."""

    def __init__(self, settings: Settings, sealer: Sealer, uploads: Uploads) -> None:
        self.settings = settings
        self.sealer = sealer
        self.uploads = uploads

    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        request = _source_request(req, project, self.uploads, self.settings, ImportRequest.parse_preflight)
        result = run_preflight(project, _principal(req), request, self.settings, self.sealer, self.uploads.store)
        resp.media = {"preflight": result.response()}


class UploadsResource:
    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    def on_post(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        resp.status = falcon.HTTP_201
        resp.media = {"upload": self.uploads.create(project, _principal(req))}


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
    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        resp.media = {"job": job_json(_job(req, job_id))}


class CancelResource:
    """202 with the job: `cancelled` when nobody was running it, else as it is with
    `cancel_requested_at` set (the worker ends it `cancelled` within seconds)."""

    def __init__(self, steps: ImportSteps) -> None:
        self.steps = steps

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
        resp.media = {"job": job_json(outcome.job)}


class ProjectJobsResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        jobs = (
            Job.select()
            .where(Job.project == project.id)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(_limit(req))
        )
        resp.media = {"jobs": [job_json(job) for job in jobs]}


class AuditEventsResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response, project_id: str) -> None:
        project = _principal(req).project(project_id)
        resp.media = {"audit_events": [audit_json(e) for e in audit.for_project(project, _limit(req))]}


class HealthResource:
    auth_required = False

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
