"""A job's time is bounded: a dump that sleeps on the server cannot hold a worker."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import time

import pytest

from pipeline import jobs
from pipeline.import_steps import ImportSteps
from pipeline.lease import Heartbeat
from pipeline.models import Job
from pipeline.runner import Runner
from pipeline.sealing import Sealer
from stages.errors import PermanentCommandTimeout, TransientError
from stages.tools.commands import PgTools
from stages.tools.timelimit import Limit
from tests.support import pg
from tests.support.imports import unwoken_job, upload_and_import
from tests.support.world import make_world


def sessions_running(marker: str, wait: float = 5.0) -> list[tuple]:
    """Backends whose query holds `marker`, once they had `wait` seconds to go."""
    until = time.monotonic() + wait
    while True:
        rows = pg.admin(
            "SELECT pid, datname, state FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        )
        if not rows or time.monotonic() > until:
            return rows
        time.sleep(0.2)


def test_psql_past_its_deadline_is_stopped_and_its_query_ends(control_db):
    marker = "capy-deadline-" + secrets.token_hex(4)
    tools = PgTools.for_major(
        15, control_db.pg_bin_dir_template, limit=Limit(2, "CAPY_COMMAND_TIMEOUT_SECONDS", "raise it")
    )
    began = time.monotonic()
    try:
        tools.psql.run(
            [
                "--no-psqlrc",
                f"--dbname={pg.url_for('postgres')}",
                f"--command=SELECT pg_sleep(60), '{marker}'",
            ],
            what="psql",
        )
    except PermanentCommandTimeout as err:
        assert err.message == "psql did not finish within 2 s (CAPY_COMMAND_TIMEOUT_SECONDS); raise it"
    else:
        raise AssertionError("psql was not stopped")
    assert time.monotonic() - began < 10
    assert sessions_running(marker) == []


def test_a_sleeping_plain_dump_fails_the_job_at_its_time_limit(control_db, store):
    marker = "capy-sleep-" + secrets.token_hex(4)
    settings = control_db.replace(job_time_limit_seconds=8)
    world = make_world(settings)
    script = (
        f"SET statement_timeout = 0;\nCREATE TABLE t (id int);\nSELECT pg_sleep(3600), '{marker}';\n".encode()
    )
    began = time.monotonic()
    job = upload_and_import(settings, store, world, script)
    # The worker thread is free again soon after the limit, not after an hour.
    assert time.monotonic() - began < 8 + 20
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert job.stage == "restore"
    assert job.error == (
        "psql restoring the plain SQL dump did not finish within the import's time limit of 8 s "
        "(CAPY_JOB_TIME_LIMIT_SECONDS); split the import into smaller dumps (by schema or by table), "
        "or ask the operator to raise CAPY_JOB_TIME_LIMIT_SECONDS"
    )
    assert job.last_stderr.endswith("stopped: " + job.error)
    # Nothing of it keeps running on the server, and its preview is gone.
    assert sessions_running(marker) == []
    assert not pg.database_exists(job.preview_database_id)
    assert pg.row_counts(world.project.database_name) == {}


def test_a_job_past_its_time_limit_fails_at_its_next_stage(control_db, store):
    settings = control_db.replace(job_time_limit_seconds=3600)
    world = make_world(settings)
    job = unwoken_job(settings, world)
    Job.update(started_at=jobs.utcnow() - dt.timedelta(hours=2)).where(Job.id == job.id).execute()
    woken = []
    runner = Runner(
        settings, ImportSteps(settings, Sealer(settings.secret_key), store), lambda *a, **k: woken.append(a)
    )
    runner.run(job.id, "preflight")
    failed = Job.get_by_id(job.id)
    assert (failed.state, failed.retry_classification, woken) == ("failed", "permanent", [])
    assert failed.error == (
        "the import ran longer than its time limit of 3600 s (CAPY_JOB_TIME_LIMIT_SECONDS) before its "
        "preflight stage; split the import into smaller dumps (by schema or by table), or ask the "
        "operator to raise CAPY_JOB_TIME_LIMIT_SECONDS"
    )


class RestoreLosingItsConnection(ImportSteps):
    """A restore attempt that leaves a statement running in the preview, then fails
    transiently, as a killed pg_restore whose backend has not noticed yet."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker
        self.sleeper: subprocess.Popen | None = None

    def run(self, stage, context):
        preview = "capy_preview_" + context.job.id.removeprefix("job_")
        pg.create_db(preview)
        context.set_preview(preview)
        self.sleeper = subprocess.Popen(
            ["psql", "-X", "-q", "-d", pg.url_for(preview), "-c", f"SELECT pg_sleep(600), '{self.marker}'"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until = time.monotonic() + 10
        while not pg.admin(
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE %s AND datname = %s",
            (f"%{self.marker}%", preview),
        ):
            assert time.monotonic() < until, "the sleeping session never started"
            time.sleep(0.1)
        raise TransientError("lost the connection to the project's cluster")


def test_a_transient_failure_ends_what_the_attempt_left_running_in_the_preview(control_db, store):
    marker = "capy-left-" + secrets.token_hex(4)
    world = make_world(control_db)
    job = unwoken_job(control_db, world)
    Job.update(stage="restore").where(Job.id == job.id).execute()
    steps = RestoreLosingItsConnection(control_db, Sealer(control_db.secret_key), store, marker=marker)
    runner = Runner(control_db, steps, lambda *a, **k: None)
    with pytest.raises(TransientError):
        runner.run(job.id, "restore")
    assert steps.sleeper is not None and steps.sleeper.wait(10) != 0
    assert sessions_running(marker) == []
    released = Job.get_by_id(job.id)
    assert (released.state, released.claimed_by, released.retry_classification) == (
        "running",
        None,
        "transient",
    )
    # The retry starts from an empty preview: the restore drops it WITH (FORCE) first.
    assert pg.database_exists(released.preview_database_id)
    jobs.fail(job.id, "test", "done", classification="permanent")
    pg.drop_db(released.preview_database_id)


def test_heartbeats_stop_keeping_a_claim_fresh_past_the_time_limit(control_db):
    world = make_world(control_db)
    job = unwoken_job(control_db, world)
    jobs.claim(job.id, "preflight", "w1", lease=dt.timedelta(seconds=60))
    old = jobs.utcnow() - dt.timedelta(minutes=10)

    def beats(until: dt.datetime) -> bool:
        Job.update(heartbeat_at=old).where(Job.id == job.id).execute()
        with Heartbeat(job.id, "w1", 0.1, until=until):
            time.sleep(0.6)
        return Job.get_by_id(job.id).heartbeat_at > old

    assert beats(jobs.utcnow() + dt.timedelta(hours=1))
    assert not beats(jobs.utcnow() - dt.timedelta(seconds=1))
    jobs.fail(job.id, "test", "done", classification="permanent")
