"""End to end: cancel a running import over HTTP; the worker stops its restore."""

import secrets
import time

import pytest
import requests

from tests.support import pg
from tests.support.processes import cli, wait_for_job
from tests.support.uploading import post_file


def sessions(marker: str) -> list[tuple]:
    return pg.admin(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",)
    )


@pytest.mark.e2e
def test_cancel_a_running_import_over_http(service, tenant):
    marker = "capy-e2e-cancel-" + secrets.token_hex(4)
    auth = {"Authorization": f"Bearer {tenant['key']}"}
    project = tenant["project"]["id"]
    upload = requests.post(
        f"{service.base_url}/v1/projects/{project}/imports/uploads", headers=auth, timeout=30
    )
    assert upload.status_code == 201, upload.text
    form = upload.json()["upload"]
    post_file(
        form, f"CREATE TABLE t (id int);\nSELECT pg_sleep(120), '{marker}';\n".encode()
    ).raise_for_status()
    resp = requests.post(
        f"{service.base_url}/v1/projects/{project}/imports",
        json={"confirm": True, "upload_key": form["object_key"]},
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job"]["id"]
    until = time.monotonic() + 60
    while not sessions(marker):
        assert time.monotonic() < until, "the restore never started:\n" + service.log_tail()
        time.sleep(0.2)

    began = time.monotonic()
    cancelled = requests.post(f"{service.base_url}/v1/jobs/{job_id}/cancel", headers=auth, timeout=30)
    assert cancelled.status_code == 202, cancelled.text
    body = cancelled.json()["job"]
    assert (body["state"], body["stage"]) == ("running", "restore") and body["cancel_requested_at"]
    job = wait_for_job(service, tenant["key"], job_id, timeout=30)
    assert time.monotonic() - began < 15
    assert (job["state"], job["retry_classification"], job["locked_resource"]) == (
        "cancelled",
        "permanent",
        None,
    )
    assert job["error"].startswith("cancelled by api_key:") and "during the restore stage" in job["error"]
    assert sessions(marker) == []
    until = time.monotonic() + 10
    while pg.database_exists(job["preview_database_id"]):
        assert time.monotonic() < until, "the preview was not dropped"
        time.sleep(0.2)
    assert pg.row_counts(tenant["project"]["database_name"]) == {}

    again = requests.post(f"{service.base_url}/v1/jobs/{job_id}/cancel", headers=auth, timeout=30)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    reasons = [e["reason"] for e in cli(service.env, "jobs", "show", job_id)["events"]]
    assert any(r.startswith("cancel requested by api_key:") for r in reasons)
    assert reasons[-1] == f"cancelled by {job['error'].split()[2]}: the restore stage was stopped"
