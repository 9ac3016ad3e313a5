"""Metrics and log lines of real imports (the real Runner and stages, in-process), and
the scrape-time gauges against the real control database and RabbitMQ."""

from __future__ import annotations

import io
import json
import logging

import pika
import psycopg2
import pytest
from prometheus_client import REGISTRY

from pipeline import logs, scrape
from pipeline.models import STAGE_ORDER, Job
from pipeline.queue import StageQueue, make_broker
from tests.support import pg
from tests.support.imports import run_import
from tests.support.world import make_world

STAGES = [s.value for s in STAGE_ORDER]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def json_lines():
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_an_import_is_timed_by_stage_counted_and_logged_with_its_job(control_db, corpus_source, json_lines):
    runs = {
        stage: value("capy_stage_duration_seconds_count", stage=stage, outcome="succeeded")
        for stage in STAGES
    }
    rows, size = (
        value("capy_copied_rows_total", source="live"),
        value("capy_copied_bytes_total", source="live"),
    )
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(corpus_source("chinook"), sslmode="disable"))
    assert job.state == "completed", job.error

    for stage in STAGES:
        assert value("capy_stage_duration_seconds_count", stage=stage, outcome="succeeded") == runs[stage] + 1
    assert value("capy_copied_rows_total", source="live") == rows + job.facts.report["row_count"] > rows
    assert value("capy_copied_bytes_total", source="live") == size + job.facts.dump_bytes > size

    lines = [line for line in json_lines() if line.get("job_id") == job.id]
    # Each stage's lines carry it and its attempt, from its start to its end.
    for stage in STAGES:
        started = [line for line in lines if "started by" in line["message"] and line["stage"] == stage]
        assert len(started) == 1 and started[0]["attempt"] == 1, started
    # Every line the runner logs about the job is bound to it.
    about = [line for line in json_lines() if f"job {job.id}:" in line["message"]]
    assert about and all(line.get("job_id") == job.id and line.get("stage") in STAGES for line in about)
    # The tools ran for the job (pg_dump, pg_restore), and their lines say which tool and stage.
    tools = [line for line in lines if "tool" in line]
    assert {"pg_dump", "pg_restore"} <= {line["tool"] for line in tools}, tools
    assert all(line["stage"] in STAGES and line["attempt"] == 1 for line in tools)
    assert "restore" in {line["stage"] for line in tools}

    got = {
        (s.labels["state"], s.labels["stage"]): s.value
        for family in scrape.JobGauges().collect()
        if family.name == "capy_jobs"
        for s in family.samples
    }
    completed = Job.select().where((Job.state == "completed") & (Job.stage == "finalize")).count()
    assert got[("completed", "finalize")] == completed >= 1


def test_a_permanent_failure_is_counted_by_stage_and_classification(control_db, password_source, json_lines):
    failed = value("capy_jobs_failed_total", stage="preflight", classification="permanent")
    attempts = value("capy_stage_failures_total", stage="preflight", classification="permanent")
    world = make_world(control_db)
    job = run_import(control_db, world, password_source.url("chinook", password="wrong-password"))
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert value("capy_jobs_failed_total", stage="preflight", classification="permanent") == failed + 1
    assert value("capy_stage_failures_total", stage="preflight", classification="permanent") == attempts + 1
    logged = [
        line
        for line in json_lines()
        if line.get("job_id") == job.id and "failed (permanent)" in line["message"]
    ]
    assert logged and logged[0]["stage"] == "preflight" and logged[0]["attempt"] == 1
    assert all("wrong-password" not in json.dumps(line) for line in json_lines())


def test_queue_depths_are_read_from_rabbitmq(control_db):
    # Queues of its own (tests/conftest.py deletes them): a worker another test left
    # consuming the session's queues would take the message before it is counted.
    settings = control_db.replace(queue_prefix=control_db.queue_prefix + "_probe")
    broker = make_broker(settings, publisher=True)
    queue = StageQueue(broker, settings)
    # A wake-up for a job that does not exist: a worker that takes it ignores it.
    queue.wake("job_metricsprobe0000000000", "finalize")
    stage_queue = f"{settings.queue_prefix}.finalize"
    try:
        families = {f.name: f for f in scrape.QueueGauges(settings.broker_url, queue.queue_names()).collect()}
        depths = {s.labels["queue"]: s.value for s in families["capy_queue_messages"].samples}
        dead = {s.labels["queue"]: s.value for s in families["capy_dead_letter_messages"].samples}
        assert depths[stage_queue] >= 1
        assert f"{stage_queue}.XQ" in dead
        (up,) = families["capy_metrics_source_up"].samples
        assert up.labels == {"source": "broker"} and up.value == 1
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        connection.channel().queue_purge(stage_queue)
        connection.close()
        broker.close()


def test_a_locked_jobs_table_leaves_the_job_gauges_out_instead_of_holding_the_scrape(control_db):
    # A migration's ALTER TABLE holds ACCESS EXCLUSIVE on jobs; /metrics waited behind it
    # until gunicorn killed the worker (and every request it was serving). The lock here
    # ends after 60 s (Postgres ends the idle transaction), so without the scrape's own
    # timeout this test fails, counting the jobs then, rather than hangs.
    locker = psycopg2.connect(control_db.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("SET idle_in_transaction_session_timeout = '60s'")
            cur.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        families = list(scrape.JobGauges().collect())
        assert [f.name for f in families] == ["capy_metrics_source_up"]
        (up,) = families[0].samples
        assert up.labels == {"source": "database"} and up.value == 0
    finally:
        locker.close()  # ends its transaction, and the lock, if Postgres has not
    families = {f.name: f for f in scrape.JobGauges().collect()}
    assert families["capy_metrics_source_up"].samples[0].value == 1  # the lock gone, counted again
