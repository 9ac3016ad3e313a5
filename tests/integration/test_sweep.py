"""`capy-imports sweep` against real Postgres and S3."""

import dataclasses
import datetime as dt

import pytest

from pipeline.models import Job, RetiredDatabase, utcnow
from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from stages.errors import ObjectMissing
from tests.support import pg
from tests.support.imports import upload_and_import
from tests.support.world import make_world


def test_sweep_deletes_expired_uploads_and_replaced_databases(control_db, store, corpus_source, tmp_path):
    keeping = dataclasses.replace(control_db, upload_retention_seconds=3600)
    world = make_world(keeping)
    dump = pg.make_dump(corpus_source("chinook"), "custom", tmp_path / "chinook.dump")
    job = upload_and_import(keeping, store, world, dump)
    assert job.state == "completed"
    assert store.size(job.upload_key) > 0  # kept for the retention
    sealer = Sealer(keeping.secret_key)

    assert sweep(keeping, sealer, store)["uploads_deleted"] == []
    retired = RetiredDatabase.get(RetiredDatabase.job == job.id)
    assert pg.database_exists(retired.database_name)

    later = utcnow() + dt.timedelta(days=8)
    done = sweep(keeping, sealer, store, clock=lambda: later)
    assert job.upload_key in done["uploads_deleted"]
    assert retired.database_name in done["replaced_databases_dropped"]
    assert done["errors"] == []
    with pytest.raises(ObjectMissing):
        store.size(job.upload_key)
    assert not pg.database_exists(retired.database_name)
    assert RetiredDatabase.get_by_id(retired.id).dropped_at is not None
    # Idempotent: nothing left to do.
    again = sweep(keeping, sealer, store, clock=lambda: later)
    assert job.upload_key not in again["uploads_deleted"] and retired.database_name not in again["replaced_databases_dropped"]


def test_sweep_drops_previews_left_by_failed_jobs(control_db, store):
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, b"CREATE TABLE a (id int);\nSELECT 1/0;\n")
    assert job.state == "failed"
    # A worker that died while cleaning up would leave the preview behind.
    pg.create_db(job.preview_database_id)
    done = sweep(control_db, Sealer(control_db.secret_key), store)
    assert job.preview_database_id in done["previews_dropped"]
    assert not pg.database_exists(job.preview_database_id)
    assert Job.get_by_id(job.id).state == "failed"
