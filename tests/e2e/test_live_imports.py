"""End to end: real gunicorn and dramatiq processes, driven over HTTP like a user."""

import pytest
import requests

from tests.support import pg
from tests.support.processes import cli, wait_for_job


def start(service, tenant, body):
    return requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports",
        json=body,
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("corpus", ["pagila", "chinook", "northwind"])
def test_live_import_over_http_matches_the_source(service, tenant, corpus_source, corpus):
    source = corpus_source(corpus)
    resp = start(
        service,
        tenant,
        {"confirm": True, "recreate": False, "source_url": pg.url_for(source, sslmode="disable")},
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job"]["id"]
    assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
    job = wait_for_job(service, tenant["key"], job_id)
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    assert job["completed_at"] and job["started_at"] and job["preview_database_id"]
    assert job["last_exit_code"] == 0 and job["attempts"] == 1
    live = tenant["project"]["database_name"]
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    assert job["report"]["row_count"] == sum(pg.row_counts(source).values())
    shown = cli(service.env, "jobs", "show", job_id)
    assert shown["state"] == "completed"
    assert [e["to_stage"] for e in shown["events"] if e["reason"].endswith(" done")] == [
        "fetch",
        "restore",
        "finalize",
    ]


@pytest.mark.e2e
def test_failed_import_over_http_leaves_the_live_database_unchanged(service, tenant, password_source):
    live = tenant["project"]["database_name"]
    pg.psql(
        live,
        text="CREATE TABLE precious (id int primary key, note text); INSERT INTO precious VALUES (1, 'keep me');",
    )
    before = (pg.schema_dump(live), pg.row_counts(live))
    resp = start(
        service,
        tenant,
        {
            "confirm": True,
            "recreate": True,
            "source_url": password_source.url("chinook", password="not-the-password"),
        },
    )
    assert resp.status_code == 202
    assert "not-the-password" not in resp.text
    job = wait_for_job(service, tenant["key"], resp.json()["job"]["id"])
    assert job["state"] == "failed"
    assert job["retry_classification"] == "permanent"
    assert "password authentication failed; check the user name and password" in job["error"]
    assert (pg.schema_dump(live), pg.row_counts(live)) == before
    listed = cli(service.env, "jobs", "list", "--project", tenant["project"]["id"])
    assert "not-the-password" not in str(listed)
    assert "not-the-password" not in service.log_tail(10_000)


@pytest.mark.e2e
def test_preflight_over_http(service, tenant, corpus_source):
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports/preflight",
        json={"source_url": pg.url_for(corpus_source("chinook"), sslmode="disable")},
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()["preflight"]
    assert body["ok"] is True and body["target_version"].startswith("15.")
    assert {c["name"]: c["status"] for c in body["checks"]}["source_reachable"] == "pass"
    assert body["source"]["table_count"] == 11


@pytest.mark.e2e
def test_a_source_that_never_answers_is_retried_by_the_queue_then_failed(service, tenant):
    from tests.support.pgproxy import silent_listener

    live = tenant["project"]["database_name"]
    with silent_listener() as listener:
        resp = start(
            service,
            tenant,
            {
                "confirm": True,
                "source_url": f"postgresql://u:pw@127.0.0.1:{listener.port}/db?sslmode=disable",
            },
        )
        assert resp.status_code == 202
        job = wait_for_job(service, tenant["key"], resp.json()["job"]["id"], timeout=180)
    assert job["state"] == "failed" and job["retry_classification"] == "transient"
    assert job["attempts"] == job["max_attempts"] == 3
    assert job["error"].startswith(
        "gave up on the preflight stage after 3 attempts; last error: preflight check source_reachable failed:"
    )
    assert "did not answer within the 3 s connect timeout" in job["error"]
    events = cli(service.env, "jobs", "show", job["id"])["events"]
    assert [e["reason"] for e in events].count("preflight claimed (attempt 2 of 3)") == 1
    assert pg.row_counts(live) == {}
