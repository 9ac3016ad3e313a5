"""Operators' CLI for stuck and failed work: cancel, retry, stuck jobs, dead letters
(real control database, cluster and RabbitMQ, with queues of this test run's prefix)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pika
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from pipeline import cancellation, jobs
from pipeline.cli import main
from pipeline.imports import ImportRequest, start_import
from pipeline.models import AuditEvent, Job
from pipeline.operator_actions import operator_actor
from pipeline.principals import Principal
from pipeline.queue import StageQueue
from pipeline.sealing import Sealer
from pipeline.steps.registry import STAGE_NAMES
from pipeline.steps.results import StageResult
from stages.connections.pgurl import SourceURL
from tests.support import pg
from tests.support.broker import delete_queues
from tests.support.cli import run
from tests.support.inline import InlineQueue
from tests.support.world import make_world

ACTOR = operator_actor()
STAGES = (*STAGE_NAMES, "exhausted")

LEASE = dt.timedelta(seconds=90)


@pytest.fixture
def world(control_db):
    return make_world(control_db)


@pytest.fixture
def own_queues(control_db):
    """Settings whose queue names are this test's own (derived from the run's prefix)."""
    settings = control_db.replace(
        queue_prefix=f"{control_db.queue_prefix}_{uuid.uuid4().hex[:6]}",
    )
    yield settings
    delete_queues(settings.broker_url, [settings.queue_prefix])


def new_job(settings, world, url="postgres://u:pw@db.example.com/app", wake=None):
    job, _ = start_import(
        world.project,
        Principal(world.org.id, None, "test"),
        ImportRequest(recreate=False, source=SourceURL.parse_source(url)),
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=wake or (lambda job_id, stage: None),
    )
    return job


def audit_of(job_id):
    return [
        (e.action, e.actor)
        for e in AuditEvent.select().where(AuditEvent.target_id == job_id).order_by(AuditEvent.created_at)
    ]


def test_jobs_cancel(control_db, capsys, world):
    job = new_job(control_db, world)
    code, out = run(control_db, capsys, "jobs", "cancel", job.id)
    assert code == 0 and out["cancelled_now"] is True
    assert (out["state"], out["retry_classification"], out["locked_resource"]) == (
        "cancelled",
        "permanent",
        None,
    )
    assert out["error"] == f"cancelled by {ACTOR}; the project's database was not changed"
    assert ACTOR.startswith("operator:")
    assert jobs.events(job.id)[-1].actor == ACTOR
    assert audit_of(job.id)[-1] == ("project.import_cancelled", ACTOR)
    code, out = run(control_db, capsys, "jobs", "cancel", job.id)
    assert code == 1 and out["error"] == (
        f"job {job.id} is already cancelled; only a pending or running import can be cancelled"
    )
    assert main(["jobs", "cancel", new_job(control_db, world).id], control_db) == 0
    assert capsys.readouterr().out.startswith("cancelled job job_")


def test_jobs_cancel_of_a_running_stage_asks_its_worker(control_db, capsys, world):
    job = new_job(control_db, world)
    jobs.claim(job.id, "preflight", "host:1:2", lease=LEASE)
    assert main(["jobs", "cancel", job.id], control_db) == 0
    assert capsys.readouterr().out.strip() == (
        f"asked host:1:2, which runs the preflight stage of job {job.id}, to stop it; "
        f"the job ends cancelled within seconds (capy-imports jobs show {job.id})"
    )
    jobs.fail(job.id, "test", "done", classification="permanent")


def take_message(settings, stage):
    """The next message on a stage queue of `settings` (acknowledged), or None."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        for _ in range(50):
            method, _properties, body = channel.basic_get(f"{settings.queue_prefix}.{stage}", auto_ack=True)
            if method is not None:
                return json.loads(body)
            time.sleep(0.1)
        return None
    finally:
        connection.close()


def test_jobs_retry_reruns_a_failed_job_once_its_cause_is_fixed(own_queues, capsys, world):
    settings = own_queues
    name = pg.scratch_name("capysrc_later")
    queue = InlineQueue(settings)
    job = new_job(settings, world, url=pg.url_for(name, sslmode="disable"), wake=queue.wake)
    queue.drain()
    failed = Job.get_by_id(job.id)
    assert (failed.state, failed.stage, failed.retry_classification) == ("failed", "preflight", "permanent")
    assert f"has no database {name!r}" in failed.error

    # Another import holds the project: the retry is refused, naming it.
    other = new_job(settings, world)
    code, out = run(settings, capsys, "jobs", "retry", job.id)
    assert code == 1 and out["error"] == (
        f"project {world.project.id} has another active import, job {other.id}; "
        f"wait for it to end or cancel it, then retry job {job.id}"
    )
    assert Job.get_by_id(job.id).state == "failed"
    run(settings, capsys, "jobs", "cancel", other.id)

    # The cause is fixed: the source database now exists.
    pg.create_db(name)
    try:
        pg.psql(name, text="CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 5);")
        code, out = run(settings, capsys, "jobs", "retry", job.id)
        assert code == 0, out
        assert (out["state"], out["stage"], out["attempts"], out["error"], out["locked_resource"]) == (
            "pending",
            "preflight",
            0,
            None,
            f"project:{world.project.id}",
        )
        # The stage was woken through RabbitMQ; a worker (here in-process) runs it.
        message = take_message(settings, "preflight")
        assert message is not None and message["args"] == [job.id]
        queue.wake(job.id, "preflight")
        queue.drain()
    finally:
        pg.drop_db(name)
    done = Job.get_by_id(job.id)
    assert done.state == "completed", done.error
    assert pg.row_counts(world.project.database_name) == {"public.t": 5}
    retried = [e for e in jobs.events(job.id) if e.reason.startswith("retried by")]
    assert len(retried) == 1 and retried[0].actor == ACTOR
    assert retried[0].reason.startswith(
        f"retried by {ACTOR} from the preflight stage (it was failed at preflight: "
    )
    assert ("project.import_retried", ACTOR) in audit_of(job.id)

    code, out = run(settings, capsys, "jobs", "retry", job.id)
    assert code == 1 and "only a failed or cancelled import can be retried" in out["error"]


def test_jobs_retry_after_restore_starts_again_from_fetch(control_db, capsys, world):
    job = new_job(control_db, world)
    Job.update(stage="restore", facts={"preflight": {}}).where(Job.id == job.id).execute()
    jobs.fail(job.id, "test", "pg_restore failed", classification="permanent")
    # A live import's restore copies from the source again, but needs the address preflight pinned.
    code, out = run(control_db, capsys, "jobs", "retry", job.id, "--from-stage", "restore")
    assert code == 1 and out["error"].endswith("retry with --from-stage preflight")
    code, out = run(control_db, capsys, "jobs", "retry", job.id, "--from-stage", "finalize")
    assert code == 1 and out["error"] == (
        f"job {job.id}'s preview database no longer exists (it is dropped when a job ends); "
        "retry with --from-stage fetch"
    )
    code, out = run(control_db, capsys, "jobs", "retry", job.id)
    assert code == 0 and out["stage"] == "fetch" and out["state"] == "pending"
    assert out["note"].endswith("so it starts again from fetch")
    jobs.fail(job.id, "test", "done", classification="permanent")


def test_a_live_import_may_be_retried_from_restore(control_db, capsys, world):
    job = new_job(control_db, world)
    Job.update(stage="restore", facts={"preflight": {}, "source_address": "127.0.0.1"}).where(
        Job.id == job.id
    ).execute()
    jobs.fail(job.id, "test", "the copy failed", classification="permanent")
    code, out = run(control_db, capsys, "jobs", "retry", job.id, "--from-stage", "restore")
    assert code == 0 and out["stage"] == "restore" and out["state"] == "pending"
    jobs.fail(job.id, "test", "done", classification="permanent")


def test_jobs_list_stuck_shows_stale_leases_and_unclaimed_jobs(control_db, capsys, world):
    stale = new_job(control_db, world)
    jobs.claim(stale.id, "preflight", "dead-host:42:1", lease=LEASE)
    old = jobs.utcnow() - dt.timedelta(minutes=10)
    Job.update(heartbeat_at=old).where(Job.id == stale.id).execute()
    other_world = make_world(control_db)
    forgotten = new_job(control_db, other_world)
    Job.update(updated_at=old).where(Job.id == forgotten.id).execute()
    fresh = new_job(control_db, make_world(control_db))

    found = {}
    for project in (world.project.id, other_world.project.id, fresh.project_id):
        code, out = run(control_db, capsys, "jobs", "list", "--stuck", "--project", project)
        assert code == 0
        found.update({j["id"]: j for j in out["jobs"]})
    assert set(found) == {stale.id, forgotten.id}
    assert found[stale.id]["claimed_by"] == "dead-host:42:1"
    assert found[stale.id]["heartbeat_at"] is not None
    assert found[stale.id]["stuck"].startswith("its holder dead-host:42:1 last beat 6")
    assert found[forgotten.id]["stuck"].startswith("nobody has claimed its preflight stage for 6")

    assert main(["jobs", "list", "--project", world.project.id], control_db) == 0
    assert "held by dead-host:42:1, heartbeat 20" in capsys.readouterr().out
    code, shown = run(control_db, capsys, "jobs", "show", stale.id)
    assert shown["claimed_by"] == "dead-host:42:1" and shown["heartbeat_at"].endswith("Z")
    for job in (stale, forgotten, fresh):
        jobs.fail(job.id, "test", "done", classification="permanent")


def dead_letter(
    settings, stage: str, job_id: str, *, retries: int = 2, actor_name: str | None = None, failure: str = ""
) -> str:
    """Dead-letter a stage message as Dramatiq does: a message that went through its
    retries (options set by the Retries middleware) is rejected without requeue, and
    RabbitMQ moves it to `<queue>.XQ`."""
    broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
    try:
        queue = StageQueue(broker, settings)
        broker.declare_queue(queue.actors[stage].queue_name, ensure=True)
    finally:
        broker.close()
    message_id = str(uuid.uuid4())
    body = {
        "queue_name": f"{settings.queue_prefix}.{stage}",
        "actor_name": actor_name or f"{settings.queue_prefix}_{stage}",
        "args": [job_id],
        "kwargs": {},
        "options": {
            "retries": retries,
            "requeue_timestamp": int(time.time() * 1000),
            "traceback": (
                'Traceback (most recent call last):\n  File "pipeline/runner.py", line 80, in run\n'
                + (failure or f"stages.errors.TransientError: could not reach the source during {stage}")
                + "\n"
            ),
        },
        "message_id": message_id,
        "message_timestamp": int(time.time() * 1000),
    }
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.basic_publish("", f"{settings.queue_prefix}.{stage}", json.dumps(body).encode())
        method, _props, _body = channel.basic_get(f"{settings.queue_prefix}.{stage}")
        channel.basic_nack(method.delivery_tag, requeue=False)
    finally:
        connection.close()
    return message_id


def queue_depth(settings, name: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return connection.channel().queue_declare(name, passive=True).method.message_count
    finally:
        connection.close()


def test_dlq_list_and_replay(own_queues, capsys, world):
    settings = own_queues
    xq = f"{settings.queue_prefix}.fetch.XQ"
    code, out = run(settings, capsys, "dlq", "list")
    assert code == 0 and out == {"messages": []}

    waiting = new_job(settings, world)  # active at fetch, its retries spent, nobody holds it
    Job.update(state="running", stage="fetch", attempts=3, facts={"preflight": {}}).where(
        Job.id == waiting.id
    ).execute()
    finished_world = make_world(settings)
    finished = new_job(settings, finished_world)
    Job.update(stage="finalize").where(Job.id == finished.id).execute()
    jobs.claim(finished.id, "finalize", "w", lease=LEASE)
    jobs.complete(finished.id, "w", "finalize", facts=StageResult(), progress={})
    ids = {
        dead_letter(settings, "fetch", waiting.id): waiting.id,
        dead_letter(settings, "fetch", finished.id): finished.id,
        dead_letter(settings, "fetch", "job_gone"): "job_gone",
    }

    code, out = run(settings, capsys, "dlq", "list")
    assert code == 0
    listed = {m["message_id"]: m for m in out["messages"]}
    assert {m: listed[m]["job_id"] for m in listed} == ids
    for message in listed.values():
        assert (message["stage"], message["queue"], message["retries"]) == ("fetch", xq, 2)
        assert message["failure"] == "stages.errors.TransientError: could not reach the source during fetch"
        assert 0 <= message["age_seconds"] < 60
    assert queue_depth(settings, xq) == 3  # listing consumed nothing
    assert main(["dlq", "list"], settings) == 0
    assert f"{waiting.id}  fetch" in capsys.readouterr().out

    code, out = run(settings, capsys, "dlq", "replay", "--all", "--dry-run")
    decided = {m["job_id"]: (m["action"], m["reason"]) for m in out["messages"]}
    assert decided == {
        waiting.id: ("would replay", "the job is active at this stage and nobody holds it"),
        finished.id: ("skipped", "job completed"),
        "job_gone": ("skipped", "job unknown: no such job in this deployment's control database"),
    }
    assert queue_depth(settings, xq) == 3 and Job.get_by_id(waiting.id).attempts == 3

    code, out = run(settings, capsys, "dlq", "replay", "--job", waiting.id)
    assert code == 0 and [(m["job_id"], m["action"]) for m in out["messages"]] == [(waiting.id, "replayed")]
    assert queue_depth(settings, xq) == 2
    replayed = take_message(settings, "fetch")
    assert replayed["args"] == [waiting.id] and replayed["options"] == {}
    assert replayed["queue_name"] == f"{settings.queue_prefix}.fetch"
    job = Job.get_by_id(waiting.id)
    assert (job.state, job.stage, job.attempts) == ("running", "fetch", 0)
    assert jobs.events(job.id)[-1].reason.startswith("dead-lettered fetch message ")
    assert jobs.events(job.id)[-1].actor == ACTOR
    assert ("project.import_replayed", ACTOR) in audit_of(job.id)

    assert main(["dlq", "replay", "--all"], settings) == 0
    text = capsys.readouterr().out
    assert f"skipped: {finished.id} fetch" in text and ": job completed" in text
    assert "skipped: job_gone fetch" in text
    assert queue_depth(settings, xq) == 2
    code, out = run(settings, capsys, "dlq", "replay")
    assert code == 1 and out["error"] == "say which messages to replay: --job ID, or --all"

    code, out = run(settings, capsys, "dlq", "replay", "--all", "--drop-ended", "--dry-run")
    assert sorted(m["action"] for m in out["messages"]) == ["would drop", "would drop"]
    assert queue_depth(settings, xq) == 2
    code, out = run(settings, capsys, "dlq", "replay", "--all", "--drop-ended")
    assert {m["job_id"]: m["action"] for m in out["messages"]} == {
        finished.id: "dropped",
        "job_gone": "dropped",
    }
    assert queue_depth(settings, xq) == 0
    assert jobs.events(finished.id)[-1].reason.startswith("dead-lettered fetch message ")
    assert jobs.events(finished.id)[-1].reason.endswith(f" dropped by {ACTOR}: job completed")
    assert ("project.import_dead_letter_dropped", ACTOR) in audit_of(finished.id)
    jobs.fail(waiting.id, "test", "done", classification="permanent")


def test_jobs_retry_refuses_to_undo_a_newer_import(control_db, capsys, world):
    """Retrying an old failed job would swap its (older) data over what a newer import
    of the project brought in since: refused, naming the newer job."""
    old = new_job(control_db, world)
    jobs.fail(old.id, "test", "the source was down", classification="transient")
    newer = new_job(control_db, world)
    Job.update(state="completed", completed_at=jobs.utcnow(), locked_resource=None).where(
        Job.id == newer.id
    ).execute()
    code, out = run(control_db, capsys, "jobs", "retry", old.id)
    assert code == 1 and out["error"] == (
        f"job {newer.id}, started after job {old.id}, has since completed an import of project "
        f"{world.project.id}; retrying job {old.id} would replace that data. Start a new import instead"
    )
    assert Job.get_by_id(old.id).state == "failed"


def test_a_retry_while_the_broker_is_down_stays_pending_for_sweep_to_wake(control_db, store, capsys, world):
    """The job row is the outbox: a retry whose wake-up cannot be sent is not turned
    into a failure (the cancel or failure it replaced stays in its events), and sweep
    wakes it once it has waited a minute."""
    from pipeline.sweep import sweep

    down = control_db.replace(broker_url="amqp://guest:guest@127.0.0.1:1/%2F")
    job = new_job(control_db, world)
    cancellation.request_cancel(job.id, "operator:tester", lease=LEASE, cleanup=lambda job: None)
    code, out = run(down, capsys, "jobs", "retry", job.id)
    assert code == 0, out
    assert (out["state"], out["woken"]) == ("pending", False)
    assert (
        out["note"]
        == "the job queue is unavailable: `capy-imports sweep` (the clock) starts it once RabbitMQ is back"
    )
    assert [e.action for e in AuditEvent.select().where(AuditEvent.target_id == job.id)].count(
        "project.import_retried"
    ) == 1
    woken = []
    Job.update(updated_at=jobs.utcnow() - dt.timedelta(minutes=2)).where(Job.id == job.id).execute()
    sweep(
        control_db,
        Sealer(control_db.secret_key),
        store,
        wake=lambda job_id, stage: woken.append((job_id, stage)),
    )
    assert (job.id, "preflight") in woken
    jobs.fail(job.id, "test", "done", classification="permanent")


def test_dlq_replays_only_this_deployments_stage_messages_and_shows_no_terminal_escapes(
    own_queues, capsys, world
):
    settings = own_queues
    job = new_job(settings, world)
    Job.update(state="running", stage="fetch", attempts=3, facts={"preflight": {}}).where(
        Job.id == job.id
    ).execute()
    dead_letter(
        settings,
        "fetch",
        job.id,
        actor_name="otherapp_send_email",
        failure="Boom: \x1b[31mRED\x1b[0m \x1b]0;pwned\x07",
    )
    code, out = run(settings, capsys, "dlq", "list")
    [listed] = out["messages"]
    assert listed["failure"] == "Boom: \\x1b[31mRED\\x1b[0m \\x1b]0;pwned\\x07"
    code, out = run(settings, capsys, "dlq", "replay", "--all")
    [decision] = out["messages"]
    assert decision["action"] == "skipped"
    assert decision["reason"] == (
        f"foreign: the message is for actor 'otherapp_send_email', not this deployment's {settings.queue_prefix}_fetch"
    )
    assert Job.get_by_id(job.id).attempts == 3  # nothing reset
    assert not [e for e in jobs.events(job.id) if "replayed" in e.reason]
    jobs.fail(job.id, "test", "done", classification="permanent")
