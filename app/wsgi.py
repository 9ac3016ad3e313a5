"""What gunicorn runs: `gunicorn 'app.wsgi:get_app()'`. Reads the environment, once."""

from __future__ import annotations

import datetime as dt
import logging

import falcon

from app.api import Services, create_app
from app.auth import Authenticator, api_key_authenticator
from app.clerk import ClerkAuthenticator, JwksCache
from pipeline import logs, scrape
from pipeline.config import ConfigError, Settings
from pipeline.db import database, init_database
from pipeline.dispatcher import Dispatcher
from pipeline.queue import StageQueue, make_broker
from pipeline.ratelimit import RateLimiter
from pipeline.sealing import Sealer
from pipeline.storage import object_store
from pipeline.uploads import Uploads

log = logging.getLogger("app")


def authenticators(settings: Settings) -> tuple[Authenticator, ...]:
    """API keys always; Clerk session tokens when CAPY_CLERK_JWKS_URL is set."""
    if not settings.clerk_jwks_url:
        return (api_key_authenticator,)
    if not settings.clerk_issuer:
        raise ConfigError("CAPY_CLERK_ISSUER must be set when CAPY_CLERK_JWKS_URL is (Clerk's Frontend API URL)")
    if not settings.dev_mode and not settings.clerk_jwks_url.startswith("https://"):
        raise ConfigError("CAPY_CLERK_JWKS_URL must be an https:// URL outside development mode")
    clerk = ClerkAuthenticator(
        JwksCache(settings.clerk_jwks_url),
        issuer=settings.clerk_issuer,
        authorized_parties=settings.clerk_authorized_parties,
    )
    return (api_key_authenticator, clerk)


def get_app(settings: Settings | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    logs.configure()
    try:
        settings = settings or Settings.from_env()
        logs.configure(settings.log_format)
        sealer = Sealer(settings.secret_keys())  # refuses to start without CAPY_SECRET_KEY
        auth = authenticators(settings)
        shared_metrics = scrape.check_multiprocess_dir()
    except ConfigError as err:
        log.critical("the API cannot start: %s", err)
        raise
    init_database(settings.database_url)
    broker = make_broker(settings, publisher=True)
    queues = StageQueue(broker, settings)
    # Request threads hand wake-ups to one thread that owns the broker connection.
    dispatcher = Dispatcher(broker, queues.actors, deadline=settings.publish_deadline_seconds)
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
        object_store(settings),
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
            readiness={"database": database_ready, "broker": dispatcher.check, "storage": uploads.check_storage},
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
