"""The control database goes away while a worker runs a stage: the stage's tool goes
on, nothing the worker could not record is lost, and once the control database is
back the job finishes by itself (it never fails with "no error was recorded").

The control database is a throw-away cluster of this test's own; the project and the
source are on the machine's cluster, which stays up.
"""

from __future__ import annotations

import contextlib
import time

import psycopg2
import pytest
import requests

from tests.support import pg
from tests.support.pgcluster import temporary_cluster
from tests.support.processes import cli, service_env, start_service

pytestmark = pytest.mark.e2e

HOLD = 8  # the restore stage's first attempt runs this long (a slow pg_restore)
LEASE = "6"


def _job(service, key: str, job_id: str) -> dict:
    resp = requests.get(
        f"{service.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=20
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["job"]


def test_a_control_database_outage_mid_stage_does_not_fail_the_job(control_db, corpus_source, tmp_path):
    source = corpus_source("chinook")
    with temporary_cluster() as cluster:
        settings = control_db.replace(
            database_url=f"postgresql://{cluster.superuser}:{cluster.password}@127.0.0.1:{cluster.port}/capy_imports",
            queue_prefix=f"{control_db.queue_prefix}_ctldb",
        )
        env = service_env(settings)
        cli(env, "migrate")
        cli(env, "clusters", "add", "--name", "local", "--admin-url", pg.ADMIN_URL)
        org = cli(env, "orgs", "create", "--name", "Control outage org")
        project = cli(env, "projects", "create", "--org", org["id"], "--name", "ctl")
        key = cli(env, "keys", "create", "--org", org["id"], "--project", project["id"], "--name", "ctl")[
            "key"
        ]
        service = start_service(
            settings, tmp_path, worker_env={"CAPY_LEASE_SECONDS": LEASE, "CAPY_TEST_HOLDS": f"restore={HOLD}"}
        )
        try:
            resp = requests.post(
                f"{service.base_url}/v1/projects/{project['id']}/imports",
                json={
                    "confirm": True,
                    "recreate": False,
                    "source_url": pg.url_for(source, sslmode="disable"),
                },
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            assert resp.status_code == 202, resp.text
            job_id = resp.json()["job"]["id"]
            deadline = time.monotonic() + 120
            while _job(service, key, job_id)["progress"].get("phase") != "test hold: restore":
                assert time.monotonic() < deadline, service.log_tail()
                time.sleep(0.3)

            # Down for the rest of the hold and well after it: the stage ends (its
            # result, the claim's release and the tool's exit status all fail to be
            # written) and its retries meet the outage too.
            cluster.stop()
            time.sleep(HOLD + 20)
            cluster.start()

            deadline = time.monotonic() + 240
            while (job := _job(service, key, job_id))["state"] not in ("completed", "failed", "cancelled"):
                assert time.monotonic() < deadline, service.log_tail()
                time.sleep(0.5)
            events = [e["reason"] for e in cli(env, "jobs", "show", job_id)["events"]]
            assert job["state"] == "completed", (job["error"], events, service.log_tail())
            assert not any("no error was recorded" in r for r in events), events
            live = project["database_name"]
            assert pg.row_counts(live) == pg.row_counts(source)
            assert not pg.database_exists("capy_preview_" + job_id.removeprefix("job_"))
        finally:
            service.stop()
            with contextlib.suppress(psycopg2.OperationalError):  # the control database is down
                pg.drop_made_by(settings.database_url)
