"""End to end: upload pagila dumps with a plain HTTP PUT and import them over HTTP."""

import pytest
import requests

from tests.support import pg
from tests.support.processes import wait_for_job


@pytest.fixture(scope="module")
def pagila_dumps(corpus_source, tmp_path_factory):
    source = corpus_source("pagila")
    folder = tmp_path_factory.mktemp("e2e-dumps")
    return source, {fmt: pg.make_dump(source, fmt, folder / f"pagila.{fmt}") for fmt in ("custom", "tar", "plain", "gzip-plain")}


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "gzip-plain"])
def test_uploaded_dump_import_over_http(service, tenant, pagila_dumps, fmt):
    source, dumps = pagila_dumps
    auth = {"Authorization": f"Bearer {tenant['key']}"}
    project = tenant["project"]["id"]
    resp = requests.post(f"{service.base_url}/v1/projects/{project}/imports/uploads", headers=auth, timeout=30)
    assert resp.status_code == 201, resp.text
    upload = resp.json()["upload"]
    put = requests.put(upload["upload_url"], data=dumps[fmt].read_bytes(), headers={"Content-Type": "application/octet-stream"}, timeout=120)
    assert put.status_code == 200, put.text
    resp = requests.post(
        f"{service.base_url}/v1/projects/{project}/imports",
        json={"confirm": True, "upload_key": upload["object_key"]},
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job = wait_for_job(service, tenant["key"], resp.json()["job"]["id"])
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    live = tenant["project"]["database_name"]
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    assert job["report"]["tables"]["public.payment_p2022_03"]["target_rows"] == pg.row_counts(source)["public.payment_p2022_03"]
