"""Upload imports whose stages run on different workers, each with a CAPY_WORK_DIR of
its own: no stage reads a file another stage left on local disk (issue 11, item 4).

Each test runs the stages with the real Runner and steps, in-process; a "worker" is a
Runner over Settings with its own, empty, work directory.
"""

from __future__ import annotations

import os

import pytest

from pipeline import jobs
from pipeline.imports import ImportRequest, start_import
from pipeline.models import Job
from pipeline.operator_actions import retry_job
from pipeline.principals import Principal
from pipeline.sealing import Sealer
from stages.errors import StorageUnavailable
from tests.support import pg
from tests.support.imports import create_upload
from tests.support.inline import InlineQueue
from tests.support.uploading import upload_file
from tests.support.world import World, make_world

FORMATS = ["custom", "tar", "plain", "gzip-plain"]


@pytest.fixture(scope="module")
def pagila_dumps(corpus_source, tmp_path_factory):
    source = corpus_source("pagila")
    folder = tmp_path_factory.mktemp("any-worker-dumps")
    return source, {fmt: pg.make_dump(source, fmt, folder / f"pagila.{fmt}") for fmt in FORMATS}


def worker(settings, tmp_path, name: str, **changes) -> InlineQueue:
    """A worker of its own: the real Runner over `settings` with an empty work directory."""
    work = tmp_path / name
    work.mkdir()
    return InlineQueue(settings.replace(work_dir=str(work), **changes))


def start_upload_import(settings, store, world: World, data, wake) -> Job:
    upload = create_upload(store, world)
    upload_file(upload, data)
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, upload_key=upload["object_key"]),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=wake,
    )
    return job


def run_stage(queue: InlineQueue, job_id: str, stage: str) -> None:
    """Run `stage`, the one the job was woken for, on `queue`'s worker."""
    assert queue.woken.popleft() == (job_id, stage)
    queue.runner.run(job_id, stage)


def left_in(queue: InlineQueue, job_id: str) -> list[str]:
    """What the job has in the worker's work directory (nothing, once a stage ended)."""
    folder = os.path.join(queue.settings.work_dir, job_id)
    return [os.path.join(root, name) for root, _dirs, files in os.walk(folder) for name in files] or (
        [folder] if os.path.exists(folder) else []
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_fetch_on_one_worker_and_restore_on_another(control_db, store, pagila_dumps, tmp_path, fmt):
    source, dumps = pagila_dumps
    world = make_world(control_db)
    first, second = worker(control_db, tmp_path, "first"), worker(control_db, tmp_path, "second")
    job = start_upload_import(control_db, store, world, dumps[fmt], first.wake)
    run_stage(first, job.id, "preflight")
    run_stage(first, job.id, "fetch")
    assert left_in(first, job.id) == []
    assert Job.get_by_id(job.id).facts.dump_format == fmt

    # Every later wake-up goes to the second worker, whose work directory is empty.
    second.woken.extend(first.woken)
    first.woken.clear()
    run_stage(second, job.id, "restore")
    assert left_in(second, job.id) == [] and left_in(first, job.id) == []
    second.drain()

    done = Job.get_by_id(job.id)
    assert done.state == "completed", (done.error, done.last_stderr)
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(source)
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert done.facts.report["row_count"] == sum(pg.row_counts(source).values())
    assert not {"dump_path", "restore_list"} & done.facts.stored().keys()


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_restore_that_fails_leaves_nothing_and_is_retried_elsewhere(
    control_db, store, pagila_dumps, tmp_path, fmt
):
    """A restore stopped by storage going away removes its folder; the retry, on
    another worker, restores the upload whole."""
    source, dumps = pagila_dumps
    world = make_world(control_db)
    first = worker(control_db, tmp_path, "first")
    # Storage that refuses connections: the restore fails (transient) once it reads the upload.
    cut_off = worker(control_db, tmp_path, "cut-off", s3_endpoint="http://127.0.0.1:9")
    second = worker(control_db, tmp_path, "second")
    job = start_upload_import(control_db, store, world, dumps[fmt], first.wake)
    for stage in ("preflight", "fetch"):
        run_stage(first, job.id, stage)
    cut_off.woken.extend(first.woken)
    with pytest.raises(StorageUnavailable):
        run_stage(cut_off, job.id, "restore")
    assert left_in(cut_off, job.id) == []
    assert Job.get_by_id(job.id).claimed_by is None

    second.wake(job.id, "restore")
    run_stage(second, job.id, "restore")
    assert left_in(second, job.id) == []
    second.drain()
    done = Job.get_by_id(job.id)
    assert done.state == "completed", (done.error, done.last_stderr)
    assert pg.row_counts(world.project.database_name) == pg.row_counts(source)


def test_an_upload_replaced_after_fetch_fails_the_restore(control_db, store, tmp_path):
    """The restore reads the version of the upload that fetch checked and counted, or
    none: a file posted again to the same upload form fails the import."""
    world = make_world(control_db)
    first, second = worker(control_db, tmp_path, "first"), worker(control_db, tmp_path, "second")
    upload = create_upload(store, world)
    upload_file(upload, b"CREATE TABLE t (id int);\nINSERT INTO t VALUES (1);\n")
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, upload_key=upload["object_key"]),
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=first.wake,
    )
    for stage in ("preflight", "fetch"):
        run_stage(first, job.id, stage)
    upload_file(upload, b"CREATE TABLE t (id int);\nINSERT INTO t VALUES (1), (2), (3);\n")
    second.woken.extend(first.woken)
    second.drain()
    done = Job.get_by_id(job.id)
    assert done.state == "failed" and done.retry_classification == "permanent"
    assert "was replaced while the import was running" in done.error
    assert pg.row_counts(world.project.database_name) == {}
    assert left_in(second, job.id) == []


def test_an_operator_retries_an_upload_import_from_its_restore_stage(
    control_db, store, pagila_dumps, tmp_path
):
    """A kept upload (CAPY_UPLOAD_RETENTION_SECONDS) and fetch's facts are all a restore
    needs: `jobs retry --from-stage restore` runs it on any worker."""
    source, dumps = pagila_dumps
    kept = control_db.replace(upload_retention_seconds=3600)
    world = make_world(kept)
    first, second = worker(kept, tmp_path, "first"), worker(kept, tmp_path, "second")
    job = start_upload_import(kept, store, world, dumps["tar"], first.wake)
    for stage in ("preflight", "fetch"):
        run_stage(first, job.id, stage)
    jobs.fail(job.id, "test", "the restore failed", classification="permanent")
    outcome = retry_job(
        job.id,
        "operator:tester",
        from_stage="restore",
        wake=second.wake,
        upload_exists=lambda key: store.size(key) > 0,
        preview_exists=lambda _job: False,
    )
    assert outcome.job.stage == "restore"
    second.drain()
    done = Job.get_by_id(job.id)
    assert done.state == "completed", (done.error, done.last_stderr)
    assert pg.row_counts(world.project.database_name) == pg.row_counts(source)
    store.delete(job.upload_key)


def test_what_a_killed_worker_left_is_removed_by_the_next_stage_on_its_host(control_db, store, tmp_path):
    """A worker killed mid-stage leaves its stage folder; whichever stage of the job
    runs next on that host removes it."""
    world = make_world(control_db)
    first = worker(control_db, tmp_path, "first")
    job = start_upload_import(control_db, store, world, b"CREATE TABLE t (id int);\n", first.wake)
    left = os.path.join(first.settings.work_dir, job.id, "fetch-k1lled")
    os.makedirs(left)
    with open(os.path.join(left, "upload"), "wb") as fh:
        fh.write(b"half a download")
    run_stage(first, job.id, "preflight")
    run_stage(first, job.id, "fetch")
    assert left_in(first, job.id) == []
