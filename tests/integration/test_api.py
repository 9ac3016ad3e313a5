"""The HTTP contract through Falcon's test client, against the real control database."""

import datetime as dt
import json

import pytest
from falcon import testing

from app.api import Services, create_app
from pipeline import apikeys
from pipeline.dispatcher import DispatchDelayed
from pipeline.models import ApiKey, JobEvent
from pipeline.sealing import Sealer
from pipeline.serialize import JOB_FIELDS
from pipeline.uploads import Uploads
from tests.support.world import make_world

SOURCE = "postgres://alice:pa55word@db.example.com:5432/shop"


class RecordingQueue:
    def __init__(self):
        self.woken = []

    def wake(self, job_id, stage):
        self.woken.append((job_id, stage))


@pytest.fixture
def queue():
    return RecordingQueue()


@pytest.fixture
def uploads(store):
    return Uploads(store, expiry=dt.timedelta(hours=1))


@pytest.fixture
def client(control_db, queue, uploads):
    services = Services(
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=queue.wake,
        uploads=uploads,
        readiness={"database": lambda: None, "broker": lambda: None},
    )
    return testing.TestClient(create_app(services))


@pytest.fixture
def world(control_db):
    return make_world(control_db)


def post_import(client, world, body, key=None, **headers):
    return client.simulate_post(
        f"/v1/projects/{world.project.id}/imports",
        headers={
            "Authorization": f"Bearer {key or world.key}",
            "Content-Type": "application/json",
            **headers,
        },
        body=body if isinstance(body, str) else json.dumps(body),
    )


def test_accepted_import_answers_202_with_the_full_job(client, world, queue):
    resp = post_import(client, world, {"confirm": True, "recreate": True, "source_url": SOURCE})
    assert resp.status_code == 202
    job = resp.json["job"]
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert set(JOB_FIELDS) <= set(job)
    assert (job["state"], job["stage"], job["type"], job["project_id"]) == (
        "pending",
        "preflight",
        "project.import",
        world.project.id,
    )
    assert job["source"] == {
        "kind": "live",
        "url": "postgresql://alice:***@db.example.com:5432/shop?sslmode=require",
    }
    assert queue.woken == [(job["id"], "preflight")]
    assert "pa55word" not in resp.text

    fetched = client.simulate_get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {world.key}"})
    assert fetched.status_code == 200 and fetched.json["job"]["id"] == job["id"]
    listed = client.simulate_get(f"/v1/projects/{world.project.id}/jobs", headers={"X-API-Key": world.key})
    assert [j["id"] for j in listed.json["jobs"]] == [job["id"]]
    audit = client.simulate_get(
        f"/v1/projects/{world.project.id}/audit-events", headers={"X-API-Key": world.key}
    )
    event = audit.json["audit_events"][0]
    assert (event["action"], event["target_id"]) == ("project.import_started", job["id"])
    assert event["details"]["source"].startswith("postgresql://alice:***@") and "pa55word" not in audit.text


def test_second_import_conflicts_naming_the_active_job(client, world):
    first = post_import(client, world, {"confirm": True, "source_url": SOURCE}).json["job"]["id"]
    resp = post_import(client, world, {"confirm": True, "source_url": SOURCE})
    assert resp.status_code == 409
    assert first in resp.json["error"]


def test_idempotency_key_replays_the_same_job(client, world, queue):
    a = post_import(client, world, {"confirm": True, "source_url": SOURCE}, **{"Idempotency-Key": "k1"})
    b = post_import(client, world, {"confirm": True, "source_url": SOURCE}, **{"Idempotency-Key": "k1"})
    assert a.status_code == 202 and b.status_code == 200
    assert a.json["job"]["id"] == b.json["job"]["id"] and len(queue.woken) == 1


def test_a_job_whose_wake_up_is_not_confirmed_is_accepted_and_queued_for_dispatch(control_db, uploads, world):
    """The job row is the outbox: a broker that does not confirm in time (down, blocking
    publishers, dropping packets) gets 202 with the pending job, never a failed one."""
    attempts = []

    def unconfirmed(job_id, stage):
        attempts.append((job_id, stage))
        raise DispatchDelayed("the job queue did not confirm within 3 s")

    services = Services(
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=unconfirmed,
        uploads=uploads,
        readiness={},
    )
    client = testing.TestClient(create_app(services))
    body = {"confirm": True, "recreate": True, "source_url": SOURCE}
    resp = post_import(client, world, body, **{"Idempotency-Key": "outage"})
    assert resp.status_code == 202, resp.text
    job = resp.json["job"]
    assert (job["state"], job["error"], job["retry_classification"]) == ("pending", None, None)
    assert job["progress"]["phase"] == "queued" and job["progress"]["detail"].startswith(
        "queued for dispatch"
    )
    assert attempts == [(job["id"], "preflight")]
    # The same key after (or during) the outage: the same job, still pending, not sent twice.
    again = post_import(client, world, body, **{"Idempotency-Key": "outage"})
    assert again.status_code == 200 and again.json["job"]["id"] == job["id"]
    assert again.json["job"]["state"] == "pending" and len(attempts) == 1
    # Exactly one event (its creation): the sweep's reaper knows it was never picked up.
    events = JobEvent.select().where(JobEvent.job == job["id"])
    assert [e.reason for e in events] == ["import requested"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        ("{not json", "application/json", 400, "the request body is not valid JSON"),
        ("", "application/json", 400, "the request needs a JSON body"),
        ('{"confirm": true}', "text/plain", 415, "Content-Type: application/json"),
        (
            '{"confirm": true, "source_url": "%s", "x": 1}' % SOURCE,
            "application/json",
            400,
            "unknown field(s): x",
        ),
        ('{"source_url": "%s"}' % SOURCE, "application/json", 400, '"confirm" must be true'),
        (
            '{"confirm": false, "source_url": "%s"}' % SOURCE,
            "application/json",
            400,
            '"confirm" must be true',
        ),
        ('{"confirm": true}', "application/json", 400, 'send exactly one of "source_url"'),
        (
            '{"confirm": true, "source_url": "%s", "upload_key": "k"}' % SOURCE,
            "application/json",
            400,
            "exactly one of",
        ),
        (
            '{"confirm": true, "source_url": "mysql://u:p@h/db"}',
            "application/json",
            400,
            "must start with postgres://",
        ),
        (
            '{"confirm": true, "source_url": "%s"}' % ("postgres://u@h/" + "x" * 70000),
            "application/json",
            413,
            "larger than",
        ),
    ],
)
def test_bad_bodies_get_their_status_and_a_message(client, world, body, content_type, status, message):
    resp = client.simulate_post(
        f"/v1/projects/{world.project.id}/imports",
        headers={"Authorization": f"Bearer {world.key}", "Content-Type": content_type},
        body=body,
    )
    assert resp.status_code == status
    assert message in resp.json["error"]
    assert set(resp.json) == {"error"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "authentication required"),
        ({"Authorization": "Basic abc"}, "must be: Bearer <API key>"),
        ({"Authorization": "Bearer capy_live_doesnotexistatallreally"}, "the API key is not valid"),
        ({"Authorization": "Bearer capy_live_x"}, "the API key is malformed"),
        ({"Authorization": "Bearer eyJhbGciOi.not.ours"}, "not a CapyDB API key"),
    ],
)
def test_missing_or_bad_credentials_are_401(client, world, headers, message):
    resp = client.simulate_get(f"/v1/projects/{world.project.id}/jobs", headers=headers)
    assert resp.status_code == 401
    assert message in resp.json["error"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_and_expired_keys_are_401(client, world):
    revoked = apikeys.create_key(world.org, world.project)
    ApiKey.update(revoked_at=dt.datetime.now(dt.UTC)).where(ApiKey.id == revoked.record.id).execute()
    expired = apikeys.create_key(
        world.org, world.project, expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    for key, message in ((revoked.plaintext, "revoked"), (expired.plaintext, "expired")):
        resp = client.simulate_get(f"/v1/projects/{world.project.id}/jobs", headers={"X-API-Key": key})
        assert resp.status_code == 401 and message in resp.json["error"]


def test_project_scope_and_foreign_projects(client, control_db, world):
    other = make_world(control_db)  # another organization
    sibling_key = apikeys.create_key(world.org, None).plaintext  # org-scoped key
    from pipeline import accounts

    sibling = accounts.create_project(
        world.org, "second", Sealer(control_db.secret_key), cluster_id=world.cluster.id
    )
    # Project-scoped key on a sibling project of the same org: 403.
    resp = client.simulate_get(f"/v1/projects/{sibling.id}/jobs", headers={"X-API-Key": world.key})
    assert resp.status_code == 403 and f"scoped to project {world.project.id}" in resp.json["error"]
    # Org-scoped key: every project of its org.
    assert (
        client.simulate_get(f"/v1/projects/{sibling.id}/jobs", headers={"X-API-Key": sibling_key}).status_code
        == 200
    )
    # Another org's project and an unknown one: 404, indistinguishable.
    for project_id in (other.project.id, "prj_doesnotexist"):
        resp = client.simulate_post(
            f"/v1/projects/{project_id}/imports",
            headers={"X-API-Key": sibling_key, "Content-Type": "application/json"},
            body=json.dumps({"confirm": True, "source_url": SOURCE}),
        )
        assert resp.status_code == 404 and resp.json["error"] == f"project {project_id} does not exist"
    # Another org's job is not visible.
    job_id = post_import(client, other, {"confirm": True, "source_url": SOURCE}).json["job"]["id"]
    resp = client.simulate_get(f"/v1/jobs/{job_id}", headers={"X-API-Key": sibling_key})
    assert resp.status_code == 404 and resp.json["error"] == f"job {job_id} does not exist"


def test_limits_and_unknown_routes(client, world):
    auth = {"X-API-Key": world.key}
    assert (
        client.simulate_get(f"/v1/projects/{world.project.id}/jobs?limit=0", headers=auth).status_code == 400
    )
    assert (
        "from 1 to 100"
        in client.simulate_get(f"/v1/projects/{world.project.id}/jobs?limit=101", headers=auth).json["error"]
    )
    assert client.simulate_get("/v1/jobs/job_nope", headers=auth).json == {
        "error": "job job_nope does not exist"
    }
    resp = client.simulate_get("/v1/nothing-here", headers=auth)
    assert resp.status_code == 404 and resp.json == {"error": "no such route: GET /v1/nothing-here"}
    resp = client.simulate_delete(f"/v1/projects/{world.project.id}/imports", headers=auth)
    assert resp.status_code == 405 and "not allowed" in resp.json["error"]


def test_each_request_closes_its_control_database_connection(client, world):
    """A connection per request: none outlives its response, so a restarted Postgres
    costs at most the one request that met it (tests/e2e/test_web_outages.py)."""
    from pipeline.db import database

    database.connect(reuse_if_open=True)
    resp = client.simulate_get(f"/v1/projects/{world.project.id}/jobs", headers={"X-API-Key": world.key})
    assert resp.status_code == 200
    assert database.is_closed()


def test_health_and_readiness(control_db, uploads):
    def down():
        raise ConnectionError("broker down")

    app = create_app(
        Services(
            settings=control_db,
            sealer=Sealer(control_db.secret_key),
            wake=lambda *a: None,
            uploads=uploads,
            readiness={"database": lambda: None, "broker": down},
        )
    )
    client = testing.TestClient(app)
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    resp = client.simulate_get("/readyz")
    assert resp.status_code == 503
    assert resp.json["error"] == "not ready: broker unavailable"
    assert resp.json["checks"] == {"database": "ok", "broker": "unavailable: ConnectionError"}


def test_the_openapi_document_is_served_without_credentials(client):
    resp = client.simulate_get("/v1/openapi.json")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.json["openapi"] == "3.1.0" and "/v1/jobs/{job_id}" in resp.json["paths"]
    # Unauthenticated routes read no header: a hostile Idempotency-Key cannot fail them.
    assert client.simulate_get("/healthz", headers={"Idempotency-Key": "k" * 7000}).status_code == 200
