"""End to end: upload pagila dumps with a plain HTTP form POST and import them over HTTP."""

import pytest
import requests

from tests.support import pg
from tests.support.processes import wait_for_job
from tests.support.uploading import post_file


@pytest.fixture(scope="module")
def pagila_dumps(corpus_source, tmp_path_factory):
    source = corpus_source("pagila")
    folder = tmp_path_factory.mktemp("e2e-dumps")
    return source, {
        fmt: pg.make_dump(source, fmt, folder / f"pagila.{fmt}")
        for fmt in ("custom", "tar", "plain", "gzip-plain")
    }


def upload_and_import(service, tenant, data: bytes) -> dict:
    auth = {"Authorization": f"Bearer {tenant['key']}"}
    project = tenant["project"]["id"]
    resp = requests.post(
        f"{service.base_url}/v1/projects/{project}/imports/uploads", headers=auth, timeout=30
    )
    assert resp.status_code == 201, resp.text
    upload = resp.json()["upload"]
    assert upload["method"] == "POST"
    posted = post_file(upload, data)
    assert posted.status_code in (200, 201, 204), posted.text
    resp = requests.post(
        f"{service.base_url}/v1/projects/{project}/imports",
        json={"confirm": True, "upload_key": upload["object_key"]},
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    return wait_for_job(service, tenant["key"], resp.json()["job"]["id"])


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "gzip-plain"])
def test_uploaded_dump_import_over_http(service, tenant, pagila_dumps, fmt):
    source, dumps = pagila_dumps
    job = upload_and_import(service, tenant, dumps[fmt].read_bytes())
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    live = tenant["project"]["database_name"]
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    report = job["report"]
    assert (
        report["tables"]["public.payment_p2022_03"]["target_rows"]
        == pg.row_counts(source)["public.payment_p2022_03"]
    )
    assert (
        report["sequences"]["public.rental_rental_id_seq"]["source"]
        == report["sequences"]["public.rental_rental_id_seq"]["target"]
    )
    assert report["skipped"] == [] and report["warnings"] == []


@pytest.mark.e2e
@pytest.mark.parametrize("corpus", ["chinook", "northwind"])
def test_other_corpora_as_uploaded_custom_dumps(service, tenant, corpus_source, tmp_path, corpus):
    source = corpus_source(corpus)
    job = upload_and_import(service, tenant, pg.make_dump(source, "custom", tmp_path / "dump").read_bytes())
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    live = tenant["project"]["database_name"]
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    assert job["report"]["row_count"] == sum(pg.row_counts(source).values())
