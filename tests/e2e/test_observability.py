"""End to end: /metrics of real gunicorn and dramatiq processes sharing a metrics
directory, request IDs over HTTP, and the JSON log lines of both."""

from __future__ import annotations

import json

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import pg
from tests.support.processes import cli, service_env, start_service, wait_for_job

TOKEN = "e2e-metrics-token-0123456789abcdef"
STAGES = ("preflight", "fetch", "restore", "finalize")
IMPORTS_ROUTE = "/v1/projects/{project_id}/imports"


@pytest.fixture(scope="module")
def observed(control_db, tmp_path_factory):
    """A service of its own: its metrics directory starts empty, its logs are JSON, and
    its queues are its own (tests/conftest.py deletes them): a message an earlier test
    left in the session's queues must not be counted among this import's stages."""
    settings = control_db.replace(queue_prefix=control_db.queue_prefix + "_observed")
    env = service_env(settings)
    cli(env, "migrate")
    dbname = control_db.database_url.rsplit("/", 1)[1]
    if not pg.admin("SELECT id FROM clusters WHERE name = 'local'", dbname=dbname):
        cli(env, "clusters", "add", "--name", "local", "--admin-url", pg.ADMIN_URL)
    metrics_dir = tmp_path_factory.mktemp("metrics")
    running = start_service(
        settings,
        tmp_path_factory.mktemp("observed-logs"),
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        CAPY_LOG_FORMAT="json",
        CAPY_METRICS_TOKEN=TOKEN,
    )
    yield running
    running.stop()


def scrape(service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(
        f"{service.base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def json_lines(service, name: str) -> list[dict]:
    lines = service.logs[name].read_text(errors="replace").splitlines()
    # gunicorn's and dramatiq's own master processes print a few lines of their own.
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.e2e
def test_an_import_moves_the_metrics_and_its_lines_carry_request_and_job(observed, corpus_source):
    service = observed
    assert requests.get(f"{service.base_url}/metrics", timeout=10).status_code == 401
    org = cli(service.env, "orgs", "create", "--name", "Metrics org")
    project = cli(service.env, "projects", "create", "--org", org["id"], "--name", "metrics")
    key = cli(service.env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "m")[
        "key"
    ]

    before = scrape(service)
    completed = ("capy_jobs", (("stage", "finalize"), ("state", "completed")))
    for stage in STAGES:
        assert (
            "capy_stage_duration_seconds_count",
            (("outcome", "succeeded"), ("stage", stage)),
        ) not in before

    resp = requests.post(
        f"{service.base_url}/v1/projects/{project['id']}/imports",
        json={
            "confirm": True,
            "recreate": False,
            "source_url": pg.url_for(corpus_source("chinook"), sslmode="disable"),
        },
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": "e2e-observability-1"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    assert resp.headers["X-Request-ID"] == "e2e-observability-1"
    job_id = resp.json()["job"]["id"]
    job = wait_for_job(service, key, job_id)
    assert job["state"] == "completed", job["error"]
    generated = requests.get(f"{service.base_url}/healthz", timeout=10).headers["X-Request-ID"]
    assert generated and generated != "e2e-observability-1"

    after = scrape(service)
    # Counted by the worker's processes, read by whichever web process answered.
    for stage in STAGES:
        assert after[("capy_stage_duration_seconds_count", (("outcome", "succeeded"), ("stage", stage)))] == 1
        assert (
            after[
                (
                    "capy_stage_duration_seconds_bucket",
                    (("le", "+Inf"), ("outcome", "succeeded"), ("stage", stage)),
                )
            ]
            == 1
        )
    assert after[completed] == before[completed] + 1
    assert after[("capy_copied_rows_total", (("source", "live"),))] == job["report"]["row_count"]
    assert (
        after[("capy_http_requests_total", (("method", "POST"), ("route", IMPORTS_ROUTE), ("status", "202")))]
        == 1
    )
    assert after[("capy_metrics_source_up", (("source", "database"),))] == 1
    assert after[("capy_metrics_source_up", (("source", "broker"),))] == 1
    assert ("capy_queue_messages", (("queue", f"{service.env['CAPY_QUEUE_PREFIX']}.preflight"),)) in after
    labels = {value for _, pairs in after for _, value in pairs}
    assert not any(project["id"] in value or job_id in value for value in labels)

    web = json_lines(service, "web")
    (post,) = [line for line in web if line.get("request_id") == "e2e-observability-1" and line.get("route")]
    assert (post["method"], post["route"], post["status"]) == ("POST", IMPORTS_ROUTE, 202)
    worker = [line for line in json_lines(service, "worker") if line.get("job_id") == job_id]
    for stage in STAGES:
        started = [line for line in worker if line.get("stage") == stage and "started by" in line["message"]]
        assert len(started) == 1 and started[0]["attempt"] == 1, worker
    tools = {line["tool"] for line in worker if "tool" in line and line.get("stage") == "restore"}
    assert {"pg_dump", "pg_restore"} <= tools, worker
