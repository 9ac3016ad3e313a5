"""The composition root: every service the processes share, built from `Settings`.

The web app (`app.wsgi`), the worker (`pipeline.worker`) and the operators' CLI
(`pipeline.cli`) build their database, broker, object store, sealer and queues here
and nowhere else, so a setting means the same thing in each. Nothing here runs at
import: each function builds when called, and connects lazily (Peewee and Dramatiq
connect on first use).
"""

from __future__ import annotations

import logging

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from playhouse.postgres_ext import PostgresqlExtDatabase

from pipeline import logs, scrape
from pipeline.config import Settings
from pipeline.db import CloseDatabase, init_database
from pipeline.import_steps import ImportSteps
from pipeline.queue import StageQueue, make_broker
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from pipeline.steps.registry import load_stages
from pipeline.webhooks import events as webhook_events
from pipeline.webhooks.delivery import Deliverer, backoff_schedule
from pipeline.webhooks.queue import WebhookQueue
from stages.storage import ObjectStore

log = logging.getLogger("pipeline.worker")


def sealer(settings: Settings) -> Sealer:
    """The sealer of stored secrets; ConfigError (no usable CAPY_SECRET_KEY) stops the process."""
    return Sealer(settings.secret_keys())


def control_database(settings: Settings) -> PostgresqlExtDatabase:
    """Point `pipeline.db.database` at CAPY_DATABASE_URL (no connection is opened here)."""
    return init_database(settings.database_url)


def object_store(settings: Settings) -> ObjectStore:
    """The object store of uploads (the only place CAPY_S3_* values are used)."""
    return ObjectStore.from_settings(
        endpoint=settings.s3_endpoint,
        public_endpoint=settings.s3_public_endpoint,
        region=settings.s3_region,
        bucket=settings.s3_bucket,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=False,
    )


def broker(settings: Settings, *, publisher: bool = False) -> RabbitmqBroker:
    """The RabbitMQ broker, set as Dramatiq's (see `pipeline.queue.make_broker`)."""
    return make_broker(settings, publisher=publisher)


def stage_queue(settings: Settings, *, publisher: bool = False) -> StageQueue:
    """The stage actors on a new broker of their own; the caller closes `queue.broker`."""
    return StageQueue(broker(settings, publisher=publisher), settings)


def import_steps(
    settings: Settings, seal: Sealer | None = None, store: ObjectStore | None = None
) -> ImportSteps:
    """The stages' work, with this process's sealer and store (built if not given)."""
    return ImportSteps(settings, seal or sealer(settings), store or object_store(settings))


def worker(settings: Settings) -> StageQueue:
    """Everything a worker process runs: the stage queue with its runner, and the
    webhook deliveries on the same broker. ConfigError if the settings cannot run."""
    logs.configure(settings.log_format, settings.log_level)
    scrape.check_multiprocess_dir()  # a metric that cannot be written is a start-up error
    seal = sealer(settings)  # refuses to start without CAPY_SECRET_KEY
    control_database(settings)
    stage_broker = broker(settings)
    stage_broker.add_middleware(CloseDatabase())
    queue = StageQueue(stage_broker, settings)
    steps = import_steps(settings, seal)
    runner = Runner(settings, steps, queue.wake)
    load_stages()
    queue.handler = runner.run
    queue.on_exhausted = runner.exhausted
    # Webhook deliveries, on this broker's `<prefix>.webhooks` queue (consumed with the stages').
    webhooks = WebhookQueue(stage_broker, settings)
    webhooks.deliverer = Deliverer(
        seal,
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
