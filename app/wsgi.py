"""What gunicorn runs: `gunicorn 'app.wsgi:get_app()'`. Reads the environment, once."""

from __future__ import annotations

import datetime as dt
import logging

import falcon
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from app.api import Services, create_app
from app.auth import Authenticator, api_key_authenticator
from app.clerk import ClerkAuthenticator, JwksCache
from pipeline import logs, scrape, services
from pipeline.config import ConfigError, Settings
from pipeline.db import database
from pipeline.dispatcher import Dispatcher
from pipeline.ratelimit import RateLimiter
from pipeline.uploads import Uploads

log = logging.getLogger("app")


def authenticators(settings: Settings) -> tuple[Authenticator, ...]:
    """API keys always; Clerk session tokens when CAPY_CLERK_JWKS_URL is set."""
    if not settings.clerk_jwks_url:
        return (api_key_authenticator,)
    if not settings.clerk_issuer:
        raise ConfigError(
            "CAPY_CLERK_ISSUER must be set when CAPY_CLERK_JWKS_URL is (Clerk's Frontend API URL)"
        )
    if not settings.dev_mode and not settings.clerk_jwks_url.startswith("https://"):
        raise ConfigError("CAPY_CLERK_JWKS_URL must be an https:// URL outside development mode")
    clerk = ClerkAuthenticator(
        JwksCache(settings.clerk_jwks_url),
        issuer=settings.clerk_issuer,
        authorized_parties=settings.clerk_authorized_parties,
    )
    return (api_key_authenticator, clerk)


# gunicorn halts ("Worker failed to boot.") when a worker exits with this code.
GUNICORN_WORKER_BOOT_ERROR = 3


def get_app(settings: Settings | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    """The API, its services built by the composition root (`pipeline.services`).

    Given `settings`, a setting it cannot run with raises ConfigError. Without (gunicorn's
    call) the environment is read here, and such a setting ends the worker with one log
    line and gunicorn's boot-error exit code: the server stops, with no traceback.
    """
    logs.configure()
    from_env = settings is None
    try:
        settings = settings or Settings.from_env()
        logs.configure(settings.log_format, settings.log_level)
        sealer = services.sealer(settings)  # refuses to start without CAPY_SECRET_KEY
        auth = authenticators(settings)
        shared_metrics = scrape.check_multiprocess_dir()
    except ConfigError as err:
        log.critical("the API cannot start: %s", err)
        if from_env:
            raise SystemExit(GUNICORN_WORKER_BOOT_ERROR) from None
        raise
    services.control_database(settings)
    queues = services.stage_queue(settings, publisher=True)
    assert isinstance(queues.broker, RabbitmqBroker)  # what services.broker makes
    # Request threads hand wake-ups to one thread that owns the broker connection.
    dispatcher = Dispatcher(queues.broker, queues.actors, deadline=settings.publish_deadline_seconds)
    if shared_metrics is None:
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: /metrics shows this web process's own counters, "
            "not the workers' (see README, Metrics)"
        )
    if settings.uses_dev_secret:
        log.warning("development mode: stored secrets use the public development key (never in production)")

    def database_ready() -> None:
        # A connection of this request's own (DatabaseSession closes it at the response).
        database.execute_sql("SELECT 1")

    uploads = Uploads(
        services.object_store(settings),
        expiry=dt.timedelta(seconds=settings.upload_url_expiry_seconds),
        max_active=settings.max_active_uploads_per_project,
        unused_grace=dt.timedelta(seconds=settings.upload_unused_grace_seconds),
    )
    return create_app(
        Services(
            settings=settings,
            sealer=sealer,
            wake=dispatcher.wake,
            uploads=uploads,
            readiness={
                "database": database_ready,
                "broker": dispatcher.check,
                "storage": uploads.check_storage,
            },
            authenticators=auth,
            gauges=(scrape.JobGauges(), scrape.QueueGauges(settings.broker_url, queues.queue_names())),
            rate_limiter=RateLimiter(settings.rate_limit_per_minute),
            unknown_token_message=(
                "the token is neither a CapyDB API key (capy_live_…) nor a Clerk session token"
                if len(auth) > 1
                else "the token is not a CapyDB API key (capy_live_…)"
            ),
        )
    )
