"""Live imports through the real Runner and stages, in-process, against real Postgres."""

import pytest

from pipeline import jobs
from pipeline.models import Job, RetiredDatabase
from tests.support import pg
from tests.support.imports import run_import
from tests.support.world import make_world


def test_pagila_import_matches_the_source(control_db, corpus_source):
    source = corpus_source("pagila")
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", job.error
    assert (job.stage, job.error, job.claimed_by) == ("finalize", None, None)
    live = world.project.database_name
    assert pg.schema_dump(live) == pg.schema_dump(source)
    source_counts = pg.row_counts(source)
    assert pg.row_counts(live) == source_counts
    assert source_counts["public.rental"] > 16000 and source_counts["public.payment_p2022_01"] > 0
    report = job.facts.report
    assert report["table_count"] == len(source_counts)
    assert report["tables"]["public.film"] == {"source_rows": 1000, "target_rows": 1000}
    # The unpopulated materialized view stays unpopulated.
    assert pg.admin(
        "SELECT ispopulated FROM pg_matviews WHERE matviewname = 'rental_by_category'", dbname=live
    ) == [(False,)]
    # The replaced (empty) database is kept, recorded for cleanup; the preview is gone.
    retired = RetiredDatabase.get(RetiredDatabase.job == job.id)
    assert pg.database_exists(retired.database_name)
    assert not pg.database_exists(job.preview_database_id)


def test_wrong_password_fails_and_leaves_the_live_database_alone(control_db, password_source):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    before = pg.schema_dump(live)
    job = run_import(
        control_db, world, password_source.url("chinook", password="wrong-password"), recreate=True
    )
    assert job.state == "failed"
    assert job.retry_classification == "permanent"
    assert job.error == (
        f"preflight check source_reachable failed: the source database at 127.0.0.1:{password_source.port} "
        "refused the login for user 'capy_admin': password authentication failed; check the user name and password"
    )
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    assert Job.get_by_id(job.id).preview_database_id is None


def test_right_password_imports_from_a_password_protected_source(control_db, password_source):
    world = make_world(control_db)
    job = run_import(control_db, world, password_source.url("chinook"))
    assert job.state == "completed", job.error
    assert sum(pg.row_counts(world.project.database_name).values()) == 15607


def test_source_user_that_cannot_read_a_table_fails_clearly(control_db, corpus_source):
    role = pg.scratch_name("capy_reader")
    source = corpus_source("chinook")
    pg.admin(f'CREATE ROLE "{role}" LOGIN')
    try:
        world = make_world(control_db)
        job = run_import(
            control_db, world, pg.url_for(source, sslmode="disable").replace("postgres@", f"{role}@")
        )
        assert job.state == "failed" and job.retry_classification == "permanent"
        assert f"the source user '{role}' cannot read every table (permission denied for table" in job.error
        assert "grant it SELECT on all tables" in job.error
        assert pg.row_counts(world.project.database_name) == {}
    finally:
        pg.admin(f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda url: url.replace(":5432/", ":1/"), "connection refused"),
        (
            lambda url: url.rsplit("/", 1)[0] + "/capy_no_such_db?sslmode=disable",
            "has no database 'capy_no_such_db'",
        ),
        (lambda url: url.replace("?sslmode=disable", ""), "does not accept SSL connections"),
    ],
)
def test_unusable_sources_fail_with_actionable_errors(control_db, corpus_source, mangle, fragment):
    world = make_world(control_db)
    job = run_import(
        control_db, world, mangle(pg.url_for(corpus_source("chinook"), sslmode="disable")), recreate=True
    )
    assert job.state == "failed"
    assert fragment in job.error
    assert pg.row_counts(world.project.database_name) == {}


def test_recreate_false_refuses_a_non_empty_project(control_db, corpus_source):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE existing (id int); INSERT INTO existing VALUES (7);")
    job = run_import(
        control_db, world, pg.url_for(corpus_source("chinook"), sslmode="disable"), recreate=False
    )
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "target_database_empty" in job.error and '"recreate": true' in job.error
    assert pg.row_counts(live) == {"public.existing": 1}


def test_recreate_true_replaces_and_keeps_the_old_database(control_db, corpus_source):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE existing (id int); INSERT INTO existing VALUES (7);")
    source = corpus_source("chinook")
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"), recreate=True)
    assert job.state == "completed", job.error
    assert pg.row_counts(live) == pg.row_counts(source)
    retired = RetiredDatabase.get(RetiredDatabase.job == job.id)
    assert pg.row_counts(retired.database_name) == {"public.existing": 1}


def test_loopback_source_refused_when_private_sources_are_not_allowed(control_db, corpus_source):
    strict = control_db.replace(allow_private_sources=False)
    world = make_world(strict)
    job = run_import(strict, world, pg.url_for(corpus_source("chinook"), sslmode="disable"))
    assert job.state == "failed"
    assert "resolves to 127.0.0.1, a loopback address" in job.error


def test_worker_gate_fails_on_an_extension_outside_the_allowlist(control_db, scratch_db):
    source = scratch_db("capysrc_cube")
    pg.psql(
        source, text="CREATE EXTENSION cube; CREATE TABLE boxes (b cube); INSERT INTO boxes VALUES ('(1,2)');"
    )
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert job.error.startswith("preflight check extensions_available_on_target failed:")
    assert "cube" in job.error
    assert job.stage == "preflight" and job.preview_database_id is None
    assert pg.row_counts(world.project.database_name) == {}


def test_a_source_that_never_answers_is_retried_then_given_up(control_db):
    from tests.support.pgproxy import silent_listener

    quick = control_db.replace(source_connect_timeout=1)
    world = make_world(quick)
    with silent_listener() as listener:
        job = run_import(quick, world, f"postgresql://u:pw@127.0.0.1:{listener.port}/db?sslmode=disable")
    assert job.state == "failed" and job.retry_classification == "transient"
    assert job.attempts == job.max_attempts == 3
    assert job.error.startswith(
        "gave up on the preflight stage after 3 attempts; last error: preflight check source_reachable failed:"
    )
    assert "did not answer" in job.error
    reasons = [e.reason for e in jobs.events(job.id)]
    # The third (last) attempt fails the job itself: it promises no retry it will not get.
    assert sum("preflight will be retried" in r for r in reasons) == 2
    assert reasons[-1].startswith("failed (transient): gave up on the preflight stage after 3 attempts")


def test_the_restore_stage_flushes_the_wal_after_the_copy(control_db, corpus_source, monkeypatch):
    # The preview is filled with synchronous_commit off: the stage ends with one commit
    # that waits for the disk, after everything else it did (ClusterAdmin.flush_wal).
    from stages.database.cluster import ClusterAdmin
    from stages.tools import restore as restore_tools

    calls: list[str] = []
    flush, section = ClusterAdmin.flush_wal, restore_tools.restore_section

    def spy_flush(self):
        calls.append("flush")
        return flush(self)

    def spy_section(*args, **kwargs):
        calls.append("restore " + args[3])
        return section(*args, **kwargs)

    monkeypatch.setattr(ClusterAdmin, "flush_wal", spy_flush)
    monkeypatch.setattr("pipeline.steps.live.restore_section", spy_section)
    monkeypatch.setattr("stages.copy.predata.restore_section", spy_section)  # the schema's slices
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(corpus_source("chinook"), sslmode="disable"))
    assert job.state == "completed", job.error
    assert calls[-1] == "flush" and calls.count("flush") == 1, calls
    assert "restore pre-data" in calls
