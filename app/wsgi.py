"""What gunicorn runs: `gunicorn 'app.wsgi:get_app()'`. Reads the environment, once."""

from __future__ import annotations

import datetime as dt
import logging

import falcon

from app.api import Services, create_app
from pipeline import logs
from pipeline.config import Settings
from pipeline.db import database, init_database
from pipeline.queue import StageQueue, make_broker
from pipeline.sealing import Sealer
from pipeline.storage import object_store
from pipeline.uploads import Uploads

log = logging.getLogger("app")


def get_app(settings: Settings | None = None) -> falcon.App:
    settings = settings or Settings.from_env()
    logs.configure()
    init_database(settings.database_url)
    broker = make_broker(settings)
    queue = StageQueue(broker, settings)
    if settings.uses_dev_secret:
        log.warning("CAPY_SECRET_KEY is not set: using the development key (never in production)")

    def database_ready() -> None:
        database.execute_sql("SELECT 1")

    def broker_ready() -> None:
        broker.channel.connection.process_data_events(0)

    uploads = Uploads(
        object_store(settings),
        expiry=dt.timedelta(seconds=settings.upload_url_expiry_seconds),
        max_active=settings.max_active_uploads_per_project,
        unused_grace=dt.timedelta(seconds=settings.upload_unused_grace_seconds),
    )
    return create_app(
        Services(
            settings=settings,
            sealer=Sealer(settings.secret_key),
            wake=queue.wake,
            uploads=uploads,
            # Creating the bucket if missing doubles as the storage check.
            readiness={"database": database_ready, "broker": broker_ready, "storage": uploads.ensure_bucket},
        )
    )
