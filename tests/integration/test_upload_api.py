"""Upload creation and upload-key checks through the API, against real S3."""

import datetime as dt
import json
from urllib.parse import urlsplit

import pytest
import requests
from falcon import testing

from app.api import Services, create_app
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from tests.support.world import make_world


@pytest.fixture
def client(control_db, store):
    services = Services(
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=lambda job_id, stage: None,
        uploads=Uploads(store, expiry=dt.timedelta(hours=1)),
        readiness={},
    )
    return testing.TestClient(create_app(services))


@pytest.fixture
def world(control_db):
    return make_world(control_db)


def create_upload(client, world):
    resp = client.simulate_post(f"/v1/projects/{world.project.id}/imports/uploads", headers={"X-API-Key": world.key})
    assert resp.status_code == 201, resp.text
    return resp.json["upload"]


def import_upload(client, world, key):
    return client.simulate_post(
        f"/v1/projects/{world.project.id}/imports",
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
        body=json.dumps({"confirm": True, "upload_key": key}),
    )


def test_upload_is_presigned_under_the_project_prefix_and_audited(client, world, control_db):
    upload = create_upload(client, world)
    assert upload["object_key"].startswith(f"imports/{world.project.id}/")
    assert urlsplit(upload["upload_url"]).netloc == urlsplit(control_db.s3_public_endpoint).netloc
    expires = dt.datetime.fromisoformat(upload["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    put = requests.put(upload["upload_url"], data=b"PGDMP-not-really", headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert put.status_code == 200
    audit = client.simulate_get(f"/v1/projects/{world.project.id}/audit-events", headers={"X-API-Key": world.key})
    event = audit.json["audit_events"][0]
    assert (event["action"], event["target_id"]) == ("project.import_upload_created", upload["object_key"])
    assert "X-Amz-Signature" not in audit.text and "upload_url" not in event["details"]
    # The uploaded key is accepted for an import.
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 202 and resp.json["job"]["source"] == {"kind": "upload", "upload_key": upload["object_key"]}


@pytest.mark.parametrize(
    ("make_key", "status", "message"),
    [
        (lambda w, other: f"imports/{other.project.id}/abc/dump", 400, "is not under this project's prefix"),
        (lambda w, other: f"imports/{w.project.id}/../{other.project.id}/dump", 400, "'..' segment"),
        (lambda w, other: f"/imports/{w.project.id}/abc/dump", 400, "must not start with '/'"),
        (lambda w, other: "", 400, "the upload key is empty"),
        (lambda w, other: f"imports/{w.project.id}/deadbeef/dump", 404, "nothing has been uploaded at"),
    ],
)
def test_bad_upload_keys_are_refused_before_any_job(client, world, control_db, make_key, status, message):
    other = make_world(control_db)
    resp = import_upload(client, world, make_key(world, other))
    assert resp.status_code == status
    assert message in resp.json["error"]
    jobs = client.simulate_get(f"/v1/projects/{world.project.id}/jobs", headers={"X-API-Key": world.key})
    assert jobs.json["jobs"] == []


def test_another_projects_key_is_rejected_even_when_the_object_exists(client, world, control_db):
    other = make_world(control_db)
    upload = create_upload(client, other)
    requests.put(upload["upload_url"], data=b"x", timeout=30).raise_for_status()
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 400 and "is not under this project's prefix" in resp.json["error"]
