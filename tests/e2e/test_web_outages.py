"""The web process (real gunicorn, gthread workers) while its broker or its control
database goes away: readiness tells the truth, a POST is answered within a few seconds
and never 500, no job is left behind, and everything recovers without a restart.

Each test runs its own broker node or Postgres cluster on free loopback ports; the
machine's own RabbitMQ and Postgres are never stopped.
"""

from __future__ import annotations

import secrets
import time

import pika
import pytest
import requests

from tests.support import pg
from tests.support.broker import delete_queues
from tests.support.holdproxy import hold_proxy
from tests.support.pgcluster import temporary_cluster
from tests.support.processes import cli, service_env, start_service
from tests.support.rabbitnode import temporary_rabbitmq

pytestmark = pytest.mark.e2e

SOURCE = "postgres://alice:secret@db.example.com:5432/shop"
# How long a POST waits for the broker to confirm its wake-up (CAPY_PUBLISH_DEADLINE_SECONDS).
PUBLISH_DEADLINE = 3


def _tenant(env: dict[str, str], admin_url: str | None = None) -> dict[str, str]:
    """An organization, project and key; the project on the run's `local` cluster (in
    the run's control database), or on a cluster `admin_url` registered here."""
    org = cli(env, "orgs", "create", "--name", "Outage org")
    if admin_url is None:
        database = env["CAPY_DATABASE_URL"].rsplit("/", 1)[1]
        known = pg.admin("SELECT id FROM clusters WHERE name = 'local'", dbname=database)
        cluster = (
            known[0][0]
            if known
            else cli(env, "clusters", "add", "--name", "local", "--admin-url", pg.ADMIN_URL)["id"]
        )
    else:
        cluster = cli(env, "clusters", "add", "--name", "own", "--admin-url", admin_url)["id"]
    project = cli(env, "projects", "create", "--org", org["id"], "--name", "outage", "--cluster", cluster)
    key = cli(env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "outage")
    return {"project": project["id"], "key": key["key"]}


@pytest.fixture
def rabbit():
    with temporary_rabbitmq() as node:
        yield node


@pytest.fixture
def broker_service(control_db, rabbit, tmp_path):
    """gunicorn alone (no worker: the messages stay in the queue to be counted) over a
    broker node of its own, with 2 s heartbeats so an idle minute takes seconds."""
    settings = control_db.replace(
        broker_url=rabbit.url(heartbeat="2"),
        queue_prefix=f"{control_db.queue_prefix}_outage",
    )
    env = service_env(settings)
    cli(env, "migrate")
    tenant = _tenant(env)
    # One web worker: readiness is asked of the dispatcher whose publish the alarm
    # blocked (another worker's first publish may still be taken before RabbitMQ blocks
    # its connection too).
    service = start_service(
        settings, tmp_path, workers=0, web_workers=1, CAPY_PUBLISH_DEADLINE_SECONDS=str(PUBLISH_DEADLINE)
    )
    try:
        yield service, tenant, settings
    finally:
        service.stop()


def _ready(service) -> requests.Response:
    return requests.get(service.base_url + "/readyz", timeout=20)


def _post(service, tenant, idempotency_key: str) -> requests.Response:
    return requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']}/imports",
        headers={"Authorization": f"Bearer {tenant['key']}", "Idempotency-Key": idempotency_key},
        json={"confirm": True, "recreate": True, "source_url": SOURCE},
        timeout=40,
    )


def _cancel(service, tenant, job_id: str) -> None:
    requests.post(
        f"{service.base_url}/v1/jobs/{job_id}/cancel",
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=20,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


def test_readiness_after_idling_and_a_broker_restart_and_a_post_while_the_broker_is_down(
    broker_service, rabbit
):
    service, tenant, settings = broker_service
    queue = f"{settings.queue_prefix}.preflight"
    # Several requests, so that both web workers have used their broker connection...
    for _ in range(6):
        assert _ready(service).status_code == 200
    # ...then idle for several heartbeat intervals: RabbitMQ closes connections that miss heartbeats.
    time.sleep(9)
    answers = [_ready(service) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]

    rabbit.stop()
    started = time.monotonic()
    down = _ready(service)
    assert down.status_code == 503 and time.monotonic() - started < 10
    assert "broker" in down.json()["error"] and down.json()["checks"]["database"] == "ok"

    # A POST while the broker is down: accepted and recorded, within seconds, not failed.
    started = time.monotonic()
    resp = _post(service, tenant, "outage-1")
    assert time.monotonic() - started < PUBLISH_DEADLINE + 5
    assert resp.status_code == 202, resp.text
    job = resp.json()["job"]
    assert job["state"] == "pending" and job["error"] is None
    assert "queued for dispatch" in job["progress"]["detail"]
    # The same Idempotency-Key during the outage returns the same, still pending job.
    again = _post(service, tenant, "outage-1")
    assert again.status_code == 200 and again.json()["job"]["id"] == job["id"]
    assert again.json()["job"]["state"] == "pending"

    rabbit.start()
    # Ready again at once: the check reconnects, no POST needed.
    answers = [_ready(service) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    # The web process dispatches what it recorded during the outage, by itself.
    _wait_for(lambda: rabbit.messages(queue) >= 1, 40, f"the wake-up of {job['id']} was not published")
    after = _post(service, tenant, "outage-1")
    assert after.status_code == 200 and after.json()["job"]["state"] == "pending"
    _cancel(service, tenant, job["id"])


def test_a_post_while_the_broker_blocks_publishers_is_answered_at_once_and_dispatched_later(
    broker_service, rabbit
):
    service, tenant, settings = broker_service
    queue = f"{settings.queue_prefix}.preflight"
    assert _ready(service).status_code == 200
    rabbit.block_publishers()
    try:
        started = time.monotonic()
        resp = _post(service, tenant, "blocked-1")
        elapsed = time.monotonic() - started
        assert resp.status_code == 202, resp.text
        assert elapsed < PUBLISH_DEADLINE + 5, elapsed
        job = resp.json()["job"]
        assert job["state"] == "pending" and "queued for dispatch" in job["progress"]["detail"]
        # Readiness says publishing would not work now, and says it quickly.
        started = time.monotonic()
        blocked = _ready(service)
        assert blocked.status_code == 503 and time.monotonic() - started < 10, blocked.text
        assert "broker" in blocked.json()["error"]
        assert rabbit.messages(queue) == 0
    finally:
        rabbit.unblock_publishers()
    _wait_for(lambda: rabbit.messages(queue) >= 1, 40, f"the wake-up of {job['id']} was not published")
    _wait_for(lambda: _ready(service).status_code == 200, 30, "readiness did not come back")
    _cancel(service, tenant, job["id"])


def test_control_database_restart_answers_503_at_most_once_then_serves(control_db, tmp_path):
    with temporary_cluster() as cluster:
        settings = control_db.replace(
            database_url=f"postgresql://{cluster.superuser}:{cluster.password}@127.0.0.1:{cluster.port}/capy_imports",
            queue_prefix=f"{control_db.queue_prefix}_outage",
        )
        env = service_env(settings)
        cli(env, "migrate")
        tenant = _tenant(env, cluster.url("postgres"))
        service = start_service(settings, tmp_path, workers=0)
        url = f"{service.base_url}/v1/projects/{tenant['project']}/jobs"
        headers = {"Authorization": f"Bearer {tenant['key']}"}
        try:
            # Every web thread that serves a request has used the control database.
            for _ in range(8):
                assert requests.get(url, headers=headers, timeout=20).status_code == 200
            cluster.stop()
            down = requests.get(url, headers=headers, timeout=20)
            assert down.status_code == 503, down.text
            assert down.json() == {"error": "the service's database is unavailable; try again shortly"}
            ready = _ready(service)
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable")
            cluster.start()
            answers = [requests.get(url, headers=headers, timeout=20) for _ in range(8)]
            statuses = [a.status_code for a in answers]
            assert statuses.count(503) <= 1 and statuses[1:] == [200] * 7, [a.text for a in answers]
            assert _ready(service).status_code == 200
        finally:
            service.stop()


def test_a_post_while_packets_to_the_broker_are_dropped_is_answered_and_dispatched_later(
    control_db, tmp_path
):
    """A proxy in front of the machine's RabbitMQ stops passing bytes (nothing is
    refused or closed: only timeouts notice), then lets them through again."""
    prefix = f"{control_db.queue_prefix}_held_{secrets.token_hex(2)}"
    with hold_proxy(5672) as proxy:
        settings = control_db.replace(
            broker_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F?heartbeat=2",
            queue_prefix=prefix,
        )
        env = service_env(settings)
        tenant = _tenant(env)
        service = start_service(
            settings, tmp_path, workers=0, CAPY_PUBLISH_DEADLINE_SECONDS=str(PUBLISH_DEADLINE)
        )
        try:
            assert _ready(service).status_code == 200
            proxy.hold()
            started = time.monotonic()
            resp = _post(service, tenant, "held-1")
            assert time.monotonic() - started < PUBLISH_DEADLINE + 5
            assert resp.status_code == 202, resp.text
            job = resp.json()["job"]
            assert job["state"] == "pending" and "queued for dispatch" in job["progress"]["detail"]
            started = time.monotonic()
            held = _ready(service)
            assert held.status_code == 503 and time.monotonic() - started < 10, held.text
            proxy.release()
            _wait_for(
                lambda: _shared_messages(f"{prefix}.preflight") >= 1, 60, f"{job['id']} was not dispatched"
            )
            _wait_for(lambda: _ready(service).status_code == 200, 30, "readiness did not come back")
            _cancel(service, tenant, job["id"])
        finally:
            service.stop()
            _delete_shared_queues(prefix)


def _shared_messages(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        if connection.is_open:
            connection.close()


def _delete_shared_queues(prefix: str) -> None:
    delete_queues("amqp://guest:guest@127.0.0.1:5672/%2F", [prefix])
