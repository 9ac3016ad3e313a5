"""Builds the Falcon app from its collaborators; reads no environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import falcon
from prometheus_client.registry import Collector

from app import errors
from app.auth import Authenticator, AuthMiddleware, api_key_authenticator
from app.dbsession import DatabaseSession
from app.edge import InputValidation
from app.observability import MetricsResource, RequestObservation
from app.openapi import OpenAPIResource
from app.resources import (
    AuditEventsResource,
    CancelResource,
    HealthResource,
    ImportsResource,
    JobResource,
    PreflightResource,
    ProjectJobsResource,
    ReadyResource,
    UploadsResource,
)
from pipeline.config import Settings
from pipeline.import_steps import ImportSteps
from pipeline.ratelimit import RateLimiter
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads


@dataclass
class Services:
    settings: Settings
    sealer: Sealer
    wake: Callable[[str, str], None]
    uploads: Uploads
    readiness: dict[str, Callable[[], Any]]
    authenticators: tuple[Authenticator, ...] = (api_key_authenticator,)
    rate_limiter: RateLimiter | None = None
    unknown_token_message: str = "the token is not a CapyDB API key (capy_live_…)"
    # What /metrics reads when scraped besides the processes' counters (pipeline.scrape).
    gauges: tuple[Collector, ...] = ()


def create_app(services: Services) -> falcon.App[falcon.Request, falcon.Response]:
    # Inputs are checked before credentials are looked up, and both before any resource.
    auth = AuthMiddleware(
        services.authenticators, services.rate_limiter, unknown_token_message=services.unknown_token_message
    )
    # Observation first, so it times and logs everything (errors of the others too);
    # then the database session, so every other component's queries are in it.
    app = falcon.App()
    app.add_middleware([RequestObservation(), DatabaseSession(), InputValidation(), auth])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(services.readiness))
    app.add_route(
        "/metrics",
        MetricsResource(
            services.gauges,
            token=services.settings.metrics_token,
            open_without_token=services.settings.dev_mode,
        ),
    )
    app.add_route(
        "/v1/projects/{project_id}/imports",
        ImportsResource(services.settings, services.sealer, services.wake, services.uploads),
    )
    app.add_route("/v1/projects/{project_id}/imports/uploads", UploadsResource(services.uploads))
    app.add_route(
        "/v1/projects/{project_id}/imports/preflight",
        PreflightResource(services.settings, services.sealer, services.uploads),
    )
    app.add_route("/v1/projects/{project_id}/jobs", ProjectJobsResource())
    app.add_route("/v1/projects/{project_id}/audit-events", AuditEventsResource())
    app.add_route("/v1/jobs/{job_id}", JobResource())
    app.add_route(
        "/v1/jobs/{job_id}/cancel",
        CancelResource(ImportSteps(services.settings, services.sealer, services.uploads.store)),
    )
    app.add_route("/v1/openapi.json", OpenAPIResource(app))  # documents every route of `app`
    return app
