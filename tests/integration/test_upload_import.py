"""Upload imports through the real Runner, stages and S3 server, in-process."""

import os
import random

import pytest

from pipeline import jobs
from pipeline.models import Project
from stages.errors import ObjectMissing
from tests.support import pg
from tests.support.imports import create_upload, import_upload, upload_and_import
from tests.support.uploading import post_file, upload_file
from tests.support.world import make_world


@pytest.fixture(scope="module")
def pagila_dumps(corpus_source, tmp_path_factory):
    source = corpus_source("pagila")
    folder = tmp_path_factory.mktemp("dumps")
    return source, {
        fmt: pg.make_dump(source, fmt, folder / f"pagila.{fmt}")
        for fmt in ("custom", "tar", "plain", "gzip-plain")
    }


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "gzip-plain"])
def test_every_pg_dump_format_restores_pagila(control_db, store, pagila_dumps, fmt):
    source, dumps = pagila_dumps
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dumps[fmt])
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    assert job.facts.dump_format == fmt
    assert (
        job.facts.report["tables"]["public.rental"]["source_rows"] == pg.row_counts(source)["public.rental"]
    )
    assert job.facts.dump_info.dumped_by.startswith("15.")
    # The upload is deleted when the job ends; temporary files are gone.
    with pytest.raises(ObjectMissing):
        store.size(job.upload_key)
    assert not os.path.exists(os.path.join(control_db.work_dir, job.id))


def test_truncated_archive_fails_and_touches_nothing(control_db, store, pagila_dumps):
    data = pagila_dumps[1]["custom"].read_bytes()
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data[: len(data) // 2])
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "the file is cut short: upload it again" in job.error
    assert pg.row_counts(world.project.database_name) == {}
    assert not os.path.exists(os.path.join(control_db.work_dir, job.id))
    with pytest.raises(ObjectMissing):
        store.size(job.upload_key)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            random.Random(7).randbytes(64 * 1024),
            "that are not a pg_dump format; upload a file made by pg_dump -Fc, -Ft or plain SQL",
        ),
        (b"PK\x03\x04" + bytes(100), "zip archive"),
    ],
)
def test_unrecognized_uploads_fail_naming_what_was_found(control_db, store, data, message):
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert message in job.error
    assert pg.row_counts(world.project.database_name) == {}


def test_empty_upload_fails_in_preflight(control_db, store):
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, b"")
    assert job.state == "failed"
    assert (
        job.error
        == "preflight check upload_not_empty failed: the uploaded object is empty; upload the pg_dump output again"
    )


def test_upload_over_the_storage_limit_is_refused_by_storage(control_db, store, pagila_dumps):
    world = make_world(control_db, storage_limit_bytes=100_000)
    upload = create_upload(store, world)
    refused = post_file(upload, pagila_dumps[1]["custom"])
    assert 400 <= refused.status_code < 500 and "EntityTooLarge" in refused.text
    with pytest.raises(ObjectMissing):
        store.size(upload["object_key"])


def test_storage_limit_lowered_after_the_upload_fails_the_import(control_db, store, pagila_dumps):
    world = make_world(control_db)
    upload = create_upload(store, world)
    upload_file(upload, pagila_dumps[1]["custom"])
    Project.update(storage_limit_bytes=100_000).where(Project.id == world.project.id).execute()
    job = import_upload(control_db, world, upload["object_key"])
    assert job.state == "failed"
    assert "preflight check source_size_within_plan failed: the upload is" in job.error
    assert "raise the project's storage limit" in job.error
    assert Project.get_by_id(world.project.id).storage_limit_bytes == 100_000


def test_plain_sql_failing_half_way_leaves_the_live_database_alone(control_db, store):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE mine (id int); INSERT INTO mine VALUES (42);")
    script = b"CREATE TABLE a (id int);\nINSERT INTO a VALUES (1);\nCREATE TABLE b (id int REFERENCES nowhere(id));\nCREATE TABLE c (id int);\n"
    job = upload_and_import(control_db, store, world, script, recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert 'relation "nowhere" does not exist' in job.error
    assert job.last_exit_code == 3 and "nowhere" in job.last_stderr
    # psql names the file it runs; users see a neutral name, not the worker's path.
    for shown in (job.error, job.last_stderr, *(event.reason for event in jobs.events(job.id))):
        assert control_db.work_dir not in shown and job.id + "/" not in shown
    assert "line 3 of your dump: ERROR:" in job.error and "psql:<dump>:3: ERROR:" in job.last_stderr
    assert pg.row_counts(live) == {"public.mine": 1}
    assert not pg.database_exists(job.preview_database_id)


def test_plain_sql_cannot_run_psql_meta_commands(control_db, store, tmp_path):
    marker = tmp_path / "pwned"
    script = f"CREATE TABLE a (id int);\n\\! touch {marker}\n".encode()
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "failed"
    assert "backslash commands are restricted" in job.error
    assert not marker.exists()


def test_archive_from_a_newer_pg_dump_says_which_version_to_use(control_db, store, pagila_dumps):
    data = bytearray(pagila_dumps[1]["custom"].read_bytes())
    data[6] = 16  # archive format 1.16, as written by pg_dump 17
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, bytes(data))
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "dump the database again with pg_dump 15" in job.error


def test_plain_dump_from_a_newer_pg_dump_says_which_version_to_use(control_db, store):
    script = b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped from database version 17.2\n-- Dumped by pg_dump version 17.2\n\nCREATE TABLE a (id int);\n"
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "failed"
    assert "the dump comes from a PostgreSQL 17 database, newer than the project's PostgreSQL 15" in job.error
