"""End to end: the fixture with every object kind, live and uploaded, over HTTP."""

from pathlib import Path

import pytest
import requests

from tests.e2e.test_upload_imports import upload_and_import
from tests.support import pg
from tests.support.processes import cli, wait_for_job

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def fixture_source():
    name = pg.create_db(pg.scratch_name("capysrc_e2e_fidelity"))
    pg.psql(name, file=FIXTURES / "fidelity.sql")
    pg.psql(name, file=FIXTURES / "superuser_objects.sql")
    yield name
    pg.drop_db(name)


def check(job, source, live, service):
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    assert pg.row_counts(live) == pg.row_counts(source)
    report = job["report"]
    assert report["skipped"][0] == {
        "object": "EVENT TRIGGER capy_ddl_watch",
        "reason": "event triggers need superuser, which a managed database does not grant",
    }
    assert report["sequences"]["public.invoice_number_seq"] == {"source": 2007, "target": 2007}
    assert report["objects"]["large_objects"]["target"] == 3
    shown = cli(service.env, "jobs", "show", job["id"])
    assert shown["report"] == report


@pytest.mark.e2e
def test_fixture_live_over_http(service, tenant, fixture_source):
    resp = requests.post(
        f"{service.base_url}/v1/projects/{tenant['project']['id']}/imports",
        json={"confirm": True, "source_url": pg.url_for(fixture_source, sslmode="disable")},
        headers={"Authorization": f"Bearer {tenant['key']}"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job = wait_for_job(service, tenant["key"], resp.json()["job"]["id"])
    check(job, fixture_source, tenant["project"]["database_name"], service)
    assert "event_triggers: 1 on the source, 0 restored" in job["report"]["warnings"]


@pytest.mark.e2e
def test_fixture_uploaded_over_http(service, tenant, fixture_source, tmp_path):
    job = upload_and_import(
        service, tenant, pg.make_dump(fixture_source, "custom", tmp_path / "fx").read_bytes()
    )
    check(job, fixture_source, tenant["project"]["database_name"], service)
