"""End to end: an import over HTTP, real dramatiq workers, and a loopback webhook receiver."""

import json
import time

import pytest
import requests

from pipeline.webhooks import signing
from tests.support import pg
from tests.support.processes import cli, wait_for_job
from tests.support.webhook_receiver import receiver


def start(service, tenant, source_url):
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports",
        json={"confirm": True, "recreate": False, "source_url": source_url},
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["job"]["id"]


def verified(secret, requests_):
    """Each request's envelope, once its signature is checked as a receiver would."""
    out = []
    for request in requests_:
        assert signing.verify(secret, request.headers["X-CapyDB-Signature"], request.body, now=time.time())
        envelope = json.loads(request.body)
        assert set(envelope) == {"id", "type", "created_at", "data"}
        assert request.headers["X-CapyDB-Event"] == envelope["type"]
        out.append((request.headers["X-CapyDB-Delivery"], envelope))
    return out


@pytest.mark.e2e
def test_a_completed_import_is_announced_signed_and_a_500_is_retried(service, tenant, corpus_source):
    source = corpus_source("chinook")
    # The first request the receiver gets is answered 500: its delivery is retried.
    with receiver(answers=[500]) as hook:
        added = cli(service.env, "webhooks", "add", "--org", tenant["org"]["id"], "--url", hook.url)
        assert added["secret"].startswith("whsec_")
        job_id = start(service, tenant, pg.url_for(source, sslmode="disable"))
        job = wait_for_job(service, tenant["key"], job_id)
        assert job["state"] == "completed", job["error"]
        got = hook.wait_for(3)
    envelopes = verified(added["secret"], got)
    assert sorted({e["type"] for _, e in envelopes}) == ["import.completed", "job.completed"]
    for _, envelope in envelopes:
        data = envelope["data"]
        assert (data["id"], data["state"], data["project_id"]) == (
            job_id,
            "completed",
            tenant["project"]["id"],
        )
        assert data["report"] == job["report"] and data["completed_at"] == job["completed_at"]
    # The retried delivery sent the same event again, under the same delivery id.
    first = got[0]
    again = [r for r in got[1:] if r.headers["X-CapyDB-Delivery"] == first.headers["X-CapyDB-Delivery"]]
    assert len(again) == 1 and again[0].body == first.body
    shown = cli(service.env, "webhooks", "deliveries", "--job", job_id)
    assert sorted(
        (d["event_type"], d["state"], [a["status_code"] for a in d["attempts"]]) for d in shown["deliveries"]
    ) in (
        [("import.completed", "delivered", [200]), ("job.completed", "delivered", [500, 200])],
        [("import.completed", "delivered", [500, 200]), ("job.completed", "delivered", [200])],
    )


@pytest.mark.e2e
def test_a_failed_import_is_announced_as_job_failed(service, tenant):
    with receiver() as hook:
        added = cli(service.env, "webhooks", "add", "--org", tenant["org"]["id"], "--url", hook.url)
        job_id = start(service, tenant, pg.url_for("capysrc_no_such_database", sslmode="disable"))
        job = wait_for_job(service, tenant["key"], job_id)
        assert job["state"] == "failed"
        got = hook.wait_for(1)
    [(delivery_id, envelope)] = verified(added["secret"], got)
    assert envelope["type"] == "job.failed"
    assert (envelope["data"]["id"], envelope["data"]["state"], envelope["data"]["error"]) == (
        job_id,
        "failed",
        job["error"],
    )
    [delivery] = cli(service.env, "webhooks", "deliveries", "--endpoint", added["id"])["deliveries"]
    assert (delivery["id"], delivery["state"], len(delivery["attempts"])) == (delivery_id, "delivered", 1)
