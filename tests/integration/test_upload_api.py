"""Upload creation and upload-key checks through the API, against real S3."""

import datetime as dt
import json
from urllib.parse import urlsplit

import pytest
from falcon import testing

from app.api import Services, create_app
from pipeline.models import Job, Upload, utcnow
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from stages.errors import ObjectMissing
from tests.support.api import api_client
from tests.support.uploading import post_file
from tests.support.world import make_world


@pytest.fixture
def client(control_db, store):
    return api_client(control_db, store)


@pytest.fixture
def world(control_db):
    return make_world(control_db)


def create_upload(client, world):
    resp = client.simulate_post(
        f"/v1/projects/{world.project.id}/imports/uploads", headers={"X-API-Key": world.key}
    )
    assert resp.status_code == 201, resp.text
    return resp.json["upload"]


def import_upload(client, world, key):
    return client.simulate_post(
        f"/v1/projects/{world.project.id}/imports",
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
        body=json.dumps({"confirm": True, "upload_key": key}),
    )


def test_upload_is_a_presigned_post_bounded_by_the_project_limit_and_audited(client, control_db, store):
    world = make_world(control_db, storage_limit_bytes=1024 * 1024)
    upload = create_upload(client, world)
    assert set(upload) == {"object_key", "upload_url", "fields", "method", "max_bytes", "expires_at"}
    assert upload["object_key"].startswith(f"imports/{world.project.id}/")
    assert upload["method"] == "POST" and upload["max_bytes"] == 1024 * 1024
    assert urlsplit(upload["upload_url"]).netloc == urlsplit(control_db.s3_public_endpoint).netloc
    assert upload["fields"]["key"] == upload["object_key"] and "policy" in upload["fields"]
    expires = dt.datetime.fromisoformat(upload["expires_at"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    # 300 MB for a 1 MiB project was accepted by the old presigned PUT; S3 refuses
    # anything above the project's limit before storing it.
    refused = post_file(upload, b"x" * (1024 * 1024 + 1))
    assert 400 <= refused.status_code < 500 and "EntityTooLarge" in refused.text
    with pytest.raises(ObjectMissing):
        store.size(upload["object_key"])
    assert post_file(upload, b"PGDMP-not-really").status_code in (200, 201, 204)
    audit = client.simulate_get(
        f"/v1/projects/{world.project.id}/audit-events", headers={"X-API-Key": world.key}
    )
    event = audit.json["audit_events"][0]
    assert (event["action"], event["target_id"]) == ("project.import_upload_created", upload["object_key"])
    assert event["details"]["max_bytes"] == 1024 * 1024
    assert (
        upload["fields"]["x-amz-signature"] not in audit.text and upload["fields"]["policy"] not in audit.text
    )
    # The uploaded key is accepted for an import, and the upload is recorded as used.
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 202 and resp.json["job"]["source"] == {
        "kind": "upload",
        "upload_key": upload["object_key"],
    }
    assert Upload.get(Upload.object_key == upload["object_key"]).job_id == resp.json["job"]["id"]


def test_the_sixth_active_upload_url_of_a_project_is_rate_limited(control_db, store):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock = [now]
    services = Services(
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=lambda job_id, stage: None,
        uploads=Uploads(store, expiry=dt.timedelta(hours=1), clock=lambda: clock[0], max_active=5),
        readiness={},
    )
    client = testing.TestClient(create_app(services))
    world, other = make_world(control_db), make_world(control_db)
    first = create_upload(client, world)
    for minutes in range(1, 5):
        clock[0] = now + dt.timedelta(minutes=minutes)
        create_upload(client, world)
    clock[0] = now + dt.timedelta(minutes=10)
    resp = client.simulate_post(
        f"/v1/projects/{world.project.id}/imports/uploads", headers={"X-API-Key": world.key}
    )
    assert resp.status_code == 429
    # The oldest expires 50 minutes from the (injected) now.
    assert resp.headers["Retry-After"] == "3000"
    assert resp.json["error"] == (
        f"project {world.project.id} already has 5 upload URLs that are neither used nor expired (at most 5); "
        "import one of them, or try again in 3000 s when the oldest expires"
    )
    # Another project is not affected.
    create_upload(client, other)
    # Using an upload in an import frees its slot.
    post_file(first, b"CREATE TABLE a (id int);\n").raise_for_status()
    assert import_upload(client, world, first["object_key"]).status_code == 202
    create_upload(client, world)
    assert (
        client.simulate_post(
            f"/v1/projects/{world.project.id}/imports/uploads", headers={"X-API-Key": world.key}
        ).status_code
        == 429
    )
    # Once the oldest unused one has expired, a new one may be created.
    clock[0] = now + dt.timedelta(hours=1, minutes=1, seconds=1)
    create_upload(client, world)


def test_a_key_that_was_never_issued_is_refused_naming_it(client, world, store, tmp_path):
    key = f"imports/{world.project.id}/{'ab' * 8}/dump"
    # Even if something is stored there (written behind the API's back).
    path = tmp_path / "dump"
    path.write_bytes(b"CREATE TABLE a (id int);\n")
    store.put_file(key, path)
    resp = import_upload(client, world, key)
    assert resp.status_code == 400
    assert resp.json["error"] == (
        f"the upload key {key} was not issued for project {world.project.id}; create an upload with "
        f"POST /v1/projects/{world.project.id}/imports/uploads and use the object_key it returns"
    )
    preflight = client.simulate_post(
        f"/v1/projects/{world.project.id}/imports/preflight",
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
        body=json.dumps({"upload_key": key}),
    )
    assert preflight.status_code == 400 and key in preflight.json["error"]


def test_an_issued_key_with_nothing_uploaded_is_404(client, world):
    upload = create_upload(client, world)
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 404 and "nothing has been uploaded at" in resp.json["error"]


@pytest.mark.parametrize(
    ("make_key", "status", "message"),
    [
        (lambda w, other: f"imports/{other.project.id}/abc/dump", 400, "is not under this project's prefix"),
        (lambda w, other: f"imports/{w.project.id}/../{other.project.id}/dump", 400, "'..' segment"),
        (lambda w, other: f"/imports/{w.project.id}/abc/dump", 400, "must not start with '/'"),
        (lambda w, other: "", 400, "the upload key is empty"),
        (lambda w, other: f"imports/{w.project.id}/deadbeef/dump", 400, "was not issued for project"),
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
    post_file(upload, b"x").raise_for_status()
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 400 and "is not under this project's prefix" in resp.json["error"]


def test_an_upload_not_imported_within_the_grace_after_its_form_expired_is_refused(control_db, store):
    now = dt.datetime.now(dt.UTC)
    clock = [now]
    uploads = Uploads(
        store, expiry=dt.timedelta(hours=1), unused_grace=dt.timedelta(hours=1), clock=lambda: clock[0]
    )
    services = Services(
        settings=control_db,
        sealer=Sealer(control_db.secret_key),
        wake=lambda job_id, stage: None,
        uploads=uploads,
        readiness={},
    )
    client = testing.TestClient(create_app(services))
    world = make_world(control_db)
    upload = create_upload(client, world)
    post_file(upload, b"CREATE TABLE a (id int);\n").raise_for_status()
    clock[0] = now + dt.timedelta(hours=2, seconds=1)
    resp = import_upload(client, world, upload["object_key"])
    assert resp.status_code == 404
    assert "was not imported in time: its upload URL expired on" in resp.json["error"]
    clock[0] = now + dt.timedelta(hours=1, minutes=59)
    assert import_upload(client, world, upload["object_key"]).status_code == 202


def test_an_upload_is_imported_once(client, world, store):
    """The presigned form stays valid until it expires, so after the first import ended
    the object can be sent again: a second import of the same key is refused."""
    upload = create_upload(client, world)
    assert post_file(
        upload, b"--\n-- PostgreSQL database dump\n--\nCREATE TABLE t (id int);\n"
    ).status_code in (200, 201, 204)
    first = import_upload(client, world, upload["object_key"])
    assert first.status_code == 202, first.text
    job_id = first.json["job"]["id"]
    Job.update(state="failed", completed_at=utcnow()).where(Job.id == job_id).execute()
    again = import_upload(client, world, upload["object_key"])
    assert again.status_code == 409, again.text
    assert again.json["error"] == (
        f"the upload at {upload['object_key']} was already imported by job {job_id}; each upload is "
        "imported once: create a new upload for another import"
    )
