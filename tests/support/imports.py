"""Running whole imports in-process (real Runner, stages, Postgres and S3)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from stages.connections.pgurl import SourceURL
from stages.storage import ObjectStore
from tests.support import pg
from tests.support.inline import InlineQueue
from tests.support.uploading import upload_file
from tests.support.world import World, make_world


def unwoken_job(settings: Settings, world: World) -> Job:
    """A pending live import of a source nobody connects to, whose wake-ups go nowhere:
    the test drives (or fakes) its stages itself."""
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, source=SourceURL.parse("postgres://u:pw@db.example.com/app")),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=lambda job_id, stage: None,
    )
    return job


def run_import(settings: Settings, world: World, source_url: str, *, recreate: bool = False) -> Job:
    return _run(settings, world, ImportRequest(recreate=recreate, source=SourceURL.parse_source(source_url)))


def import_database(
    settings: Settings, store: ObjectStore, world: World, source: str, way: str, folder: Path
) -> Job:
    """Import the local database `source` into the world's project, in-process: live
    from its URL (`way` "live"), or as a dump of format `way` (see `pg.make_dump`) made
    in `folder` and uploaded."""
    if way == "live":
        return run_import(settings, world, pg.url_for(source, sslmode="disable"))
    dump = pg.make_dump(source, way, folder / f"source.{way}")
    return upload_and_import(settings, store, world, dump)


def import_in_new_project(
    settings: Settings, store: ObjectStore, source: str, way: str, folder: Path
) -> tuple[World, Job]:
    """`import_database` into a new world's project: the world, and the job."""
    world = make_world(settings)
    return world, import_database(settings, store, world, source, way, folder)


def create_upload(
    store: ObjectStore, world: World, *, expiry: dt.timedelta = dt.timedelta(hours=1)
) -> dict[str, Any]:
    """An upload form for the world's project, as POST …/imports/uploads answers it."""
    return Uploads(store, expiry=expiry).create(world.project, Principal(world.org.id, None, "test"))


def upload_and_import(
    settings: Settings, store: ObjectStore, world: World, data: Path | bytes, *, recreate: bool = False
) -> Job:
    upload = create_upload(store, world)
    upload_file(upload, data)
    return import_upload(settings, world, upload["object_key"], recreate=recreate)


def import_upload(settings: Settings, world: World, key: str, *, recreate: bool = False) -> Job:
    """Run a whole import of an uploaded key, in-process."""
    return _run(settings, world, ImportRequest(recreate=recreate, upload_key=key))


def _run(settings: Settings, world: World, request: ImportRequest) -> Job:
    queue = InlineQueue(settings)
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        request,
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=queue.wake,
    )
    queue.drain()
    return Job.get_by_id(job.id)
