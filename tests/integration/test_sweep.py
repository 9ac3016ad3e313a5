"""`capy-imports sweep` against real Postgres and S3."""

import datetime as dt

import pytest

from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job, RetiredDatabase, Upload, utcnow
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from stages.errors import ObjectMissing
from stages.storage import new_object_key
from tests.support import pg
from tests.support.imports import create_upload, import_upload, upload_and_import
from tests.support.uploading import upload_file
from tests.support.world import make_world

SCRIPT = b"CREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\n"


def test_sweep_deletes_expired_uploads_and_replaced_databases(control_db, store, corpus_source, tmp_path):
    keeping = control_db.replace(upload_retention_seconds=3600)
    world = make_world(keeping)
    dump = pg.make_dump(corpus_source("chinook"), "custom", tmp_path / "chinook.dump")
    job = upload_and_import(keeping, store, world, dump)
    assert job.state == "completed"
    assert store.size(job.upload_key) > 0  # kept for the retention
    sealer = Sealer(keeping.secret_key)

    assert job.upload_key not in sweep(keeping, sealer, store)["uploads_deleted"]
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
    assert (
        job.upload_key not in again["uploads_deleted"]
        and retired.database_name not in again["replaced_databases_dropped"]
    )


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


def test_sweep_deletes_unused_expired_uploads_and_objects_no_job_or_upload_holds(control_db, store, tmp_path):
    world = make_world(control_db)
    sealer = Sealer(control_db.secret_key)
    # Unused, its form expires in 1 h: swept once the grace (1 h) after that has passed.
    unused = create_upload(store, world)
    upload_file(unused, SCRIPT)
    # Unused, expires in 5 h: left alone.
    fresh = create_upload(store, world, expiry=dt.timedelta(hours=5))
    upload_file(fresh, SCRIPT)
    # Unused, expired 31 min before the sweep below: still within the grace.
    late = create_upload(store, world, expiry=dt.timedelta(minutes=90))
    upload_file(late, SCRIPT)
    # Imported (its job completed and deleted it), then uploaded again with the same form.
    finished = create_upload(store, world)
    upload_file(finished, SCRIPT)
    job = import_upload(control_db, world, finished["object_key"], recreate=True)
    assert job.state == "completed"
    with pytest.raises(ObjectMissing):
        store.size(finished["object_key"])
    upload_file(finished, SCRIPT)
    # Held by an active (pending) job of another project.
    other = make_world(control_db)
    held = create_upload(store, other)
    upload_file(held, SCRIPT)
    active, _ = start_import(
        other.project,
        Principal(other.org.id, None, "test"),
        ImportRequest(recreate=True, upload_key=held["object_key"]),
        settings=control_db,
        sealer=sealer,
        wake=lambda job_id, stage: None,
    )
    # Stored under the project's prefix without any upload having been issued.
    stray = new_object_key(world.project.id, "5" * 16)
    path = tmp_path / "stray"
    path.write_bytes(SCRIPT)
    store.put_file(stray, path)

    # Now: what no unused upload or active job holds goes at once.
    now = sweep(control_db, sealer, store)["uploads_deleted"]
    assert {stray, finished["object_key"]} <= set(now)
    assert not {unused["object_key"], fresh["object_key"], late["object_key"], held["object_key"]} & set(now)
    assert Upload.get(Upload.object_key == finished["object_key"]).deleted_at is not None

    later = utcnow() + dt.timedelta(hours=2, minutes=1)
    done = sweep(control_db, sealer, store, clock=lambda: later)
    assert done["errors"] == []
    gone = {unused["object_key"]}
    assert (
        set(done["uploads_deleted"])
        & {unused["object_key"], fresh["object_key"], late["object_key"], held["object_key"]}
        == gone
    )
    for key in gone | {stray, finished["object_key"]}:
        with pytest.raises(ObjectMissing):
            store.size(key)
    for key in (fresh["object_key"], late["object_key"], held["object_key"]):
        assert store.size(key) == len(SCRIPT), key
    assert Upload.get(Upload.object_key == unused["object_key"]).deleted_at == later
    assert Upload.get(Upload.object_key == fresh["object_key"]).deleted_at is None
    assert Job.get_by_id(active.id).state == "pending"
    again = sweep(control_db, sealer, store, clock=lambda: later)
    assert not gone & set(again["uploads_deleted"])


def test_a_sweep_before_the_bucket_exists_finds_nothing_to_report(control_db, store):
    """A deployment's first clock round can come before the bucket is made."""
    import copy

    early = copy.copy(store)
    early.bucket = "capy-no-bucket-yet"
    done = sweep(control_db, Sealer(control_db.secret_key), early)
    assert not [error for error in done["errors"] if "imports/" in error], done["errors"]
