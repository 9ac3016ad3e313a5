"""Webhooks against the real control database and a loopback HTTP receiver (dev mode)."""

from __future__ import annotations

import json
import time

import pika
import pytest

from pipeline import jobs
from pipeline.cli import main
from pipeline.db import database
from pipeline.errors import InvalidRequest
from pipeline.models import Job, State, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent
from pipeline.sealing import Sealer
from pipeline.webhooks import signing
from pipeline.webhooks.delivery import MAX_ATTEMPTS, Deliverer, backoff_schedule
from pipeline.webhooks.endpoints import add_endpoint
from pipeline.webhooks.queue import RELAY_AFTER, relay
from pipeline.webhooks.transport import Answer
from tests.support.cli import run
from tests.support.imports import unwoken_job
from tests.support.webhook_receiver import receiver
from tests.support.world import make_world


@pytest.fixture
def world(control_db):
    return make_world(control_db)


class Queue:
    """The webhook queue in-process: attempts sent are run in order, at once (the
    backoff given to the Deliverer is 0, so every attempt is due)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, float]] = []

    def send(self, delivery_id: str, attempt: int, delay: float = 0) -> None:
        self.sent.append((delivery_id, attempt, delay))

    def drain(self, deliverer: Deliverer) -> list[str]:
        actions = []
        while self.sent:
            delivery_id, attempt, _ = self.sent.pop(0)
            actions.append(deliverer.deliver(delivery_id, attempt).action)
        return actions


def deliverer(settings, queue: Queue, **options) -> Deliverer:
    return Deliverer(
        Sealer(settings.secret_key),
        queue.send,
        dev_mode=settings.dev_mode,
        allow_private=settings.allow_private_sources,
        backoff=options.pop("backoff", backoff_schedule([0])),
        **options,
    )


def endpoint(settings, world, url):
    return add_endpoint(
        world.org,
        url,
        Sealer(settings.secret_key),
        dev_mode=True,
        allow_private=settings.allow_private_sources,
    )


def end(job_id: str, state: str) -> Job | None:
    """Move an active job to an end, as the runner's complete/fail and cancellation do."""
    return jobs.transition(
        job_id,
        "test",
        f"test: {state}",
        where=Job.state.in_(("pending", "running")),
        state=state,
        stage="finalize",
        completed_at=jobs.utcnow(),
        error=None if state == State.COMPLETED.value else f"test {state}",
    )


def waiting_in(broker_url: str, queue: str) -> int:
    """How many messages `queue` holds."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def deliveries_of(job_id: str) -> list[WebhookDelivery]:
    return list(
        WebhookDelivery.select()
        .join(WebhookEvent)
        .where(WebhookEvent.job == job_id)
        .order_by(WebhookEvent.type)
    )


def test_a_completed_import_is_delivered_signed_to_a_loopback_receiver(control_db, world):
    with receiver() as hook:
        created = endpoint(control_db, world, hook.url)
        assert created.secret.startswith("whsec_")
        stored = WebhookEndpoint.get_by_id(created.record.id).secret_encrypted
        assert created.secret not in stored and Sealer(control_db.secret_key).open(stored) == created.secret
        job = unwoken_job(control_db, world)
        assert end(job.id, "completed") is not None
        pending = deliveries_of(job.id)
        assert [d.state for d in pending] == ["pending", "pending"]
        queue = Queue()
        queue.sent = [(d.id, 1, 0) for d in pending]
        before = time.time()
        assert queue.drain(deliverer(control_db, queue)) == ["delivered", "delivered"]
        got = hook.wait_for(2)
    assert len(got) == 2
    assert {r.path for r in got} == {"/hooks/capy?source=test"}
    bodies = {r.headers["X-CapyDB-Event"]: r for r in got}
    assert set(bodies) == {"job.completed", "import.completed"}
    for event_type, request in bodies.items():
        assert signing.verify(
            created.secret, request.headers["X-CapyDB-Signature"], request.body, now=time.time()
        )
        stamp = int(request.headers["X-CapyDB-Signature"].split(",")[0].removeprefix("t="))
        assert before - 2 <= stamp <= time.time() + 2
        envelope = json.loads(request.body)
        assert set(envelope) == {"id", "type", "created_at", "data"}
        assert envelope["type"] == event_type and envelope["id"].startswith("evt_")
        assert envelope["data"]["id"] == job.id and envelope["data"]["state"] == "completed"
        assert envelope["data"]["source"] == {"kind": "live", "url": job.source_url_redacted}
        assert "pw@" not in request.body.decode()
        assert request.headers["X-CapyDB-Delivery"] in {d.id for d in pending}
        assert request.headers["Content-Type"] == "application/json"
    for delivery in deliveries_of(job.id):
        assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
        [attempt] = WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id)
        assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 200, None)
        assert attempt.duration_ms >= 0 and attempt.at is not None


def test_failed_and_cancelled_jobs_are_job_failed(control_db, world):
    endpoint(control_db, world, "http://127.0.0.1:9/unused")
    failed = unwoken_job(control_db, world)
    end(failed.id, "failed")
    cancelled = unwoken_job(control_db, world)
    end(cancelled.id, "cancelled")
    for job_id, state in ((failed.id, "failed"), (cancelled.id, "cancelled")):
        [event] = WebhookEvent.select().where(WebhookEvent.job == job_id)
        payload = json.loads(event.payload)
        assert (event.type, payload["type"], payload["data"]["state"]) == ("job.failed", "job.failed", state)


def test_no_event_for_a_change_that_did_not_happen(control_db, world):
    endpoint(control_db, world, "http://127.0.0.1:9/unused")
    job = unwoken_job(control_db, world)
    # A guard that matches nothing (someone else moved the job): no change, no event.
    assert jobs.transition(job.id, "test", "x", where=Job.state == "running", state="failed") is None
    # A change rolled back with its transaction: its event goes with it.
    with database.atomic() as tx:
        assert end(job.id, "completed") is not None
        assert WebhookEvent.select().where(WebhookEvent.job == job.id).count() == 2
        tx.rollback()
    assert WebhookEvent.select().where(WebhookEvent.job == job.id).count() == 0
    # Changes that end nothing are not events either.
    jobs.transition(job.id, "test", "claimed", where=Job.id == job.id, state="running")
    assert WebhookEvent.select().where(WebhookEvent.job == job.id).count() == 0
    end(job.id, "failed")
    assert [e.type for e in WebhookEvent.select().where(WebhookEvent.job == job.id)] == ["job.failed"]
    # Moving an ended job again (an operator's retry, then its end) is a new end.
    jobs.transition(job.id, "test", "retried", where=Job.id == job.id, state="pending")
    assert WebhookEvent.select().where(WebhookEvent.job == job.id).count() == 1


def test_an_organization_without_endpoints_records_nothing(control_db, world):
    job = unwoken_job(control_db, world)
    end(job.id, "completed")
    assert WebhookEvent.select().where(WebhookEvent.job == job.id).count() == 0


def test_a_500_is_retried_up_to_eight_attempts_each_recorded(control_db, world):
    with receiver(default=500) as hook:
        created = endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        queue = Queue()
        queue.send(delivery.id, 1)
        actions = queue.drain(deliverer(control_db, queue, backoff=lambda attempt: 0))
        got = hook.wait_for(MAX_ATTEMPTS)
    assert actions == ["retry"] * (MAX_ATTEMPTS - 1) + ["failed"]
    assert len(got) == MAX_ATTEMPTS
    assert {r.headers["X-CapyDB-Delivery"] for r in got} == {delivery.id}
    assert {r.body for r in got} == {got[0].body}  # the same event every time...
    for request in got:  # ...signed again at each attempt
        assert signing.verify(
            created.secret, request.headers["X-CapyDB-Signature"], request.body, now=time.time()
        )
    delivery = WebhookDelivery.get_by_id(delivery.id)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("failed", MAX_ATTEMPTS, 500)
    attempts = list(
        WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id).order_by(WebhookAttempt.attempt)
    )
    assert [(a.attempt, a.status_code, a.error) for a in attempts] == [
        (n, 500, "the endpoint answered 500") for n in range(1, MAX_ATTEMPTS + 1)
    ]


def test_the_backoff_schedules_each_next_attempt(control_db, world):
    with receiver(answers=[500, 503], default=204) as hook:
        endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        queue = Queue()
        worker = deliverer(control_db, queue, backoff=backoff_schedule([7, 11]))
        assert worker.deliver(delivery.id, 1).action == "retry"
        assert queue.sent == [(delivery.id, 2, 7)]
        after_first = WebhookDelivery.get_by_id(delivery.id)
        # Too early: the message sends itself on for what is left of the wait.
        assert worker.deliver(delivery.id, 2).action == "rescheduled"
        assert queue.sent[-1][:2] == (delivery.id, 2) and 0 < queue.sent[-1][2] <= 7
        later = after_first.next_attempt_at
        worker.clock = lambda: later
        assert worker.deliver(delivery.id, 2).action == "retry"
        assert queue.sent[-1] == (delivery.id, 3, 11)
        worker.clock = lambda: WebhookDelivery.get_by_id(delivery.id).next_attempt_at
        assert worker.deliver(delivery.id, 3).action == "delivered"
        hook.wait_for(3)
    assert [
        a.status_code
        for a in WebhookAttempt.select()
        .where(WebhookAttempt.delivery == delivery.id)
        .order_by(WebhookAttempt.attempt)
    ] == [500, 503, 204]


def test_a_duplicate_or_stale_message_does_nothing(control_db, world):
    with receiver() as hook:
        endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        worker = deliverer(control_db, Queue())
        assert worker.deliver(delivery.id, 1).action == "delivered"
        assert worker.deliver(delivery.id, 1).action == "skipped"
        assert worker.deliver(delivery.id, 2).action == "skipped"
        assert worker.deliver("whd_unknown", 1).action == "skipped"
        assert len(hook.wait_for(1)) == 1
    assert WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id).count() == 1


def test_a_refused_address_is_refused_at_add_and_at_each_delivery(control_db, world):
    strict = control_db.replace(allow_private_sources=False)
    with pytest.raises(InvalidRequest, match="127.0.0.1, a loopback address"):
        add_endpoint(
            world.org,
            "http://127.0.0.1:9/hook",
            Sealer(strict.secret_key),
            dev_mode=True,
            allow_private=False,
        )
    # Added while its name resolved to a public address; then DNS changed to a private one.
    created = add_endpoint(
        world.org,
        "https://hooks.example.invalid/capy",
        Sealer(strict.secret_key),
        dev_mode=False,
        allow_private=False,
        resolver=lambda host, port: ["93.184.215.14"],
    )
    job = unwoken_job(control_db, world)
    end(job.id, "failed")
    [delivery] = [d for d in deliveries_of(job.id) if d.endpoint_id == created.record.id]
    posted = []
    worker = Deliverer(
        Sealer(strict.secret_key),
        Queue().send,
        dev_mode=False,
        allow_private=False,
        backoff=backoff_schedule([0]),
        resolver=lambda host, port: ["10.0.0.5"],
        post=lambda target, body, headers: posted.append(target) or Answer(200, None, 1),
    )
    assert worker.deliver(delivery.id, 1).action == "retry"
    assert posted == []  # nothing was sent to the refused address
    [attempt] = WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id)
    assert attempt.status_code is None
    assert "resolves to 10.0.0.5, a private address" in attempt.error


def test_a_redirect_is_not_followed(control_db, world):
    with receiver(default=302, location="http://127.0.0.1:9/elsewhere\x1b[2J") as hook:
        endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        assert deliverer(control_db, Queue()).deliver(delivery.id, 1).action == "retry"
        assert len(hook.wait_for(1)) == 1
    [attempt] = WebhookAttempt.select().where(WebhookAttempt.delivery == delivery.id)
    assert attempt.status_code == 302 and "redirects are not followed" in attempt.error
    assert "to http://127.0.0.1:9/elsewhere?[2J" in attempt.error  # no terminal escapes for the CLI


def test_a_large_answer_is_not_read_past_the_cap(control_db, world):
    with receiver(body=b"x" * (4 * 1024 * 1024)) as hook:
        endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        assert deliverer(control_db, Queue()).deliver(delivery.id, 1).action == "delivered"


def test_a_removed_endpoint_gets_nothing_more(control_db, world):
    with receiver() as hook:
        created = endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        WebhookEndpoint.update(removed_at=jobs.utcnow()).where(
            WebhookEndpoint.id == created.record.id
        ).execute()
        assert deliverer(control_db, Queue()).deliver(delivery.id, 1).action == "failed"
        assert hook.requests == []
    delivery = WebhookDelivery.get_by_id(delivery.id)
    assert delivery.state == "failed" and "removed" in delivery.last_error


def test_the_relay_sends_what_no_message_carried(control_db, world):
    endpoint(control_db, world, "http://127.0.0.1:9/unused")
    job = unwoken_job(control_db, world)
    end(job.id, "failed")
    [delivery] = deliveries_of(job.id)
    sent: list[tuple[str, int]] = []
    relay(lambda d, n: sent.append((d, n)))
    assert delivery.id not in [d for d, _ in sent]  # just recorded: its first message may be on its way
    later = delivery.created_at + RELAY_AFTER * 2
    found = relay(lambda d, n: sent.append((d, n)), now=later)
    assert {"delivery": delivery.id, "attempt": 1} in found and (delivery.id, 1) in sent
    # Touched: the next round does not send it again while its message is in flight.
    sent.clear()
    relay(lambda d, n: sent.append((d, n)), now=later)
    assert (delivery.id, 1) not in sent


def test_the_cli_adds_lists_removes_and_shows_deliveries(control_db, world, capsys):
    with receiver(answers=[500]) as hook:
        code, added = run(control_db, capsys, "webhooks", "add", "--org", world.org.id, "--url", hook.url)
        assert code == 0 and added["secret"].startswith("whsec_") and added["url"] == hook.url
        code, listed = run(control_db, capsys, "webhooks", "list", "--org", world.org.id)
        assert [e["id"] for e in listed["endpoints"]] == [added["id"]]
        assert added["secret"] not in json.dumps(listed)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        queue = Queue()
        queue.send(delivery.id, 1)
        queue.drain(deliverer(control_db, queue))
        hook.wait_for(2)
    code, shown = run(control_db, capsys, "webhooks", "deliveries", "--job", job.id)
    assert code == 0
    [row] = shown["deliveries"]
    assert (row["id"], row["state"], row["event_type"], row["endpoint_id"]) == (
        delivery.id,
        "delivered",
        "job.failed",
        added["id"],
    )
    assert [(a["attempt"], a["status_code"]) for a in row["attempts"]] == [(1, 500), (2, 200)]
    assert main(["webhooks", "deliveries", "--org", world.org.id], control_db) == 0
    text = capsys.readouterr().out
    assert f"{delivery.id}  delivered" in text and "attempt 1" in text and "HTTP 500" in text
    code, removed = run(control_db, capsys, "webhooks", "remove", added["id"])
    assert code == 0 and removed["removed"] is True
    _, again = run(control_db, capsys, "webhooks", "remove", added["id"])
    assert again["removed"] is False
    _, listed = run(control_db, capsys, "webhooks", "list", "--org", world.org.id)
    assert listed == {"endpoints": []}


def test_the_cli_add_refuses_what_it_must_and_shows_the_secret_once_in_text(control_db, world, capsys):
    strict = control_db.replace(allow_private_sources=False)
    code, refused = run(
        strict, capsys, "webhooks", "add", "--org", world.org.id, "--url", "http://127.0.0.1:9/"
    )
    assert code == 1 and "loopback" in refused["error"]
    code, missing = run(
        control_db, capsys, "webhooks", "add", "--org", "org_missing", "--url", "http://127.0.0.1:9/"
    )
    assert code == 1 and "org_missing does not exist" in missing["error"]
    assert main(["webhooks", "add", "--org", world.org.id, "--url", "http://127.0.0.1:9/x"], control_db) == 0
    text = capsys.readouterr().out
    assert text.count("whsec_") == 1


def test_the_first_attempts_are_sent_once_the_change_committed(control_db, world):
    from pipeline.webhooks import events

    endpoint(control_db, world, "http://127.0.0.1:9/unused")
    notified: list[list[str]] = []
    events.install(notified.append)
    try:
        job = unwoken_job(control_db, world)
        end(job.id, "completed")
        assert len(notified) == 1 and sorted(notified[0]) == sorted(d.id for d in deliveries_of(job.id))
        # Inside a larger transaction the rows are not visible yet: the relay sends them.
        notified.clear()
        other = unwoken_job(control_db, world)
        with database.atomic():
            end(other.id, "failed")
        assert notified == []
        assert len(deliveries_of(other.id)) == 1
    finally:
        events.install(None)


def test_sweep_sends_deliveries_whose_message_was_lost(control_db, world, capsys):
    endpoint(control_db, world, "http://127.0.0.1:9/unused")
    job = unwoken_job(control_db, world)
    end(job.id, "failed")
    [delivery] = deliveries_of(job.id)
    past = delivery.created_at - RELAY_AFTER * 2
    WebhookDelivery.update(next_attempt_at=past, updated_at=past).where(
        WebhookDelivery.id == delivery.id
    ).execute()
    code, done = run(control_db, capsys, "sweep")
    assert code == 0, done
    assert {"delivery": delivery.id, "attempt": 1} in done["webhook_deliveries_sent"]
    assert main(["sweep"], control_db) == 0
    assert f"sent webhook delivery {delivery.id}" not in capsys.readouterr().out  # touched: not again at once


def test_redeliver_sends_the_same_event_again_as_a_new_delivery(control_db, world, capsys):
    with receiver(default=500) as hook:
        endpoint(control_db, world, hook.url)
        job = unwoken_job(control_db, world)
        end(job.id, "failed")
        [delivery] = deliveries_of(job.id)
        code, pending = run(control_db, capsys, "webhooks", "redeliver", delivery.id)
        assert code == 1 and "still pending" in pending["error"]
        queue = Queue()
        queue.send(delivery.id, 1)
        queue.drain(deliverer(control_db, queue, max_attempts=2))
        assert WebhookDelivery.get_by_id(delivery.id).state == "failed"
        hook.default = 200
        # The CLI's message goes to a queue no worker reads: the e2e tests' service,
        # still running in this session, reads this run's webhook queue and could make
        # the attempt before this test does (then its own attempt is "skipped").
        idle = control_db.replace(queue_prefix=control_db.queue_prefix + "_idle")
        code, again = run(idle, capsys, "webhooks", "redeliver", delivery.id)
        assert code == 0, again
        assert (
            waiting_in(idle.broker_url, f"{idle.queue_prefix}.webhooks") == 1
        )  # its first attempt is queued
        assert again["redelivery_of"] == delivery.id and again["id"] != delivery.id
        assert (again["state"], again["event_id"], again["attempts"]) == ("pending", delivery.event_id, [])
        assert deliverer(control_db, Queue()).deliver(again["id"], 1).action == "delivered"
        got = hook.wait_for(3)
    assert got[-1].body == got[0].body and got[-1].headers["X-CapyDB-Delivery"] == again["id"]
    code, unknown = run(control_db, capsys, "webhooks", "redeliver", "whd_unknown")
    assert code == 1 and "does not exist" in unknown["error"]
