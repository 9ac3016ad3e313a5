"""The worker process: `dramatiq pipeline.worker` (see Procfile).

Dramatiq imports this module and uses the broker it sets; that is why the environment
is read here, at import, and nowhere else in the worker.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from pipeline import logs, scrape
from pipeline.config import ConfigError, Settings
from pipeline.db import database, init_database
from pipeline.import_steps import ImportSteps
from pipeline.queue import StageQueue, make_broker
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.storage import object_store
from pipeline.webhooks import events as webhook_events
from pipeline.webhooks.delivery import Deliverer, backoff_schedule
from pipeline.webhooks.queue import WebhookQueue

log = logging.getLogger("pipeline.worker")


class CloseDatabase(dramatiq.Middleware):
    """Return each worker thread's control-database connection after every message,
    so a restarted Postgres never leaves a thread holding a dead connection."""

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if not database.is_closed():
            database.close()

    after_skip_message = after_process_message


def build(settings: Settings) -> StageQueue:
    logs.configure(settings.log_format)
    scrape.check_multiprocess_dir()  # a metric that cannot be written is a start-up error
    sealer = Sealer(settings.secret_keys())  # refuses to start without CAPY_SECRET_KEY
    init_database(settings.database_url)
    broker = make_broker(settings)
    broker.add_middleware(CloseDatabase())
    queue = StageQueue(broker, settings)
    steps = ImportSteps(settings, sealer, object_store(settings))
    runner = Runner(settings, steps, queue.wake)
    queue.handler = runner.run
    queue.on_exhausted = runner.exhausted
    # Webhook deliveries, on this broker's `<prefix>.webhooks` queue (consumed with the stages').
    webhooks = WebhookQueue(broker, settings)
    webhooks.deliverer = Deliverer(
        sealer,
        webhooks.send,
        dev_mode=settings.dev_mode,
        allow_private=settings.allow_private_sources,
        backoff=backoff_schedule(settings.webhook_retry_seconds),
    )
    webhook_events.install(webhooks.send_first)
    if settings.uses_dev_secret:
        log.warning("development mode: stored secrets use the public development key (never in production)")
    if settings.allow_private_sources:
        log.warning(
            "CAPY_ALLOW_PRIVATE_SOURCES is on: loopback and private sources are allowed (development only)"
        )
    return queue


def _build_from_env() -> StageQueue:
    try:
        return build(Settings.from_env())
    except ConfigError as err:
        # One readable line instead of a traceback; dramatiq then stops its other processes.
        logs.configure()
        log.critical("the worker cannot start: %s", err)
        raise SystemExit(2) from None


queue = _build_from_env()
broker = queue.broker
