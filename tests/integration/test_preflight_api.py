"""POST /v1/projects/{id}/imports/preflight through the app, against real sources and S3."""

import datetime as dt
import json

import pytest

from pipeline.models import Job
from pipeline.principals import Principal
from pipeline.uploads import Uploads
from stages.preflight import LIVE_CHECKS, human_bytes
from tests.support import pg
from tests.support.api import api_client
from tests.support.bombs import gzip_bomb
from tests.support.uploading import upload_file
from tests.support.world import make_world


def client_for(settings, store):
    return api_client(settings, store)


def preflight(client, world, body):
    return client.simulate_post(
        f"/v1/projects/{world.project.id}/imports/preflight",
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
        body=json.dumps(body),
    )


def checks_of(resp):
    return {c["name"]: (c["status"], c["detail"]) for c in resp.json["preflight"]["checks"]}


def test_live_preflight_reports_every_check_and_mutates_nothing(control_db, store, corpus_source):
    source = corpus_source("chinook")
    world = make_world(control_db, storage_limit_bytes=11 * 1024 * 1024)
    before = pg.schema_dump(source), pg.row_counts(source)
    resp = preflight(
        client_for(control_db, store), world, {"source_url": pg.url_for(source, sslmode="disable")}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json["preflight"]
    assert [c["name"] for c in body["checks"]] == list(LIVE_CHECKS)
    assert body["ok"] is True
    assert body["storage_limit_bytes"] == 11 * 1024 * 1024
    assert body["target_version"].startswith("15.")
    assert body["source"]["table_count"] == 11 and body["source"]["extensions"] == [
        {"name": "plpgsql", "version": "1.0"}
    ]
    status, detail = checks_of(resp)["source_size_within_plan"]
    assert status == "warn" and "of the project's 11.0 MiB storage limit" in detail and "over 80 %" in detail
    # Nothing changed: no job, the source and the project's database as they were.
    assert Job.select().where(Job.project == world.project.id).count() == 0
    assert (pg.schema_dump(source), pg.row_counts(source)) == before
    assert pg.row_counts(world.project.database_name) == {}
    audit = client_for(control_db, store).simulate_get(
        f"/v1/projects/{world.project.id}/audit-events", headers={"X-API-Key": world.key}
    )
    event = audit.json["audit_events"][0]
    assert event["action"] == "project.import_preflight"
    assert event["details"]["ok"] is True and event["details"]["failed"] == []


def test_failing_preflight_is_200_with_ok_false(control_db, store, corpus_source):
    strict = control_db.replace(allow_private_sources=False)
    world = make_world(strict)
    pg.psql(world.project.database_name, text="CREATE TABLE existing (id int);")
    resp = preflight(
        client_for(strict, store),
        world,
        {"source_url": pg.url_for(corpus_source("chinook"), sslmode="disable")},
    )
    assert resp.status_code == 200
    assert resp.json["preflight"]["ok"] is False
    checks = checks_of(resp)
    assert checks["source_address_allowed"][0] == "fail"
    assert "127.0.0.1, a loopback address" in checks["source_address_allowed"][1]
    status, detail = checks["target_database_empty"]
    assert status == "fail" and '"recreate": true' in detail


def test_upload_preflight_reads_the_dump_head(control_db, store, corpus_source, tmp_path):
    world = make_world(control_db)
    upload = Uploads(store, expiry=dt.timedelta(hours=1)).create(
        world.project, Principal(world.org.id, None, "t")
    )
    upload_file(upload, pg.make_dump(corpus_source("pagila"), "custom", tmp_path / "p.dump"))
    resp = preflight(
        client_for(control_db, store), world, {"upload_key": upload["object_key"], "confirm": True}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json["preflight"]
    assert body["ok"] is True
    assert body["source"]["format"] == "custom"
    assert body["source"]["dumped_by"].startswith("15.")
    assert checks_of(resp)["dump_format_recognized"][0] == "pass"
    assert store.size(upload["object_key"]) > 0  # preflight leaves the upload in place


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, 'send exactly one of "source_url"'),
        ({"source_url": "mysql://x@y/z"}, 400, "postgres://"),
        ({"source_url": "postgres://u@h.example.com/d", "extra": 1}, 400, "unknown field(s): extra"),
        ({"upload_key": "imports/prj_other/abc/dump"}, 400, "is not under this project's prefix"),
    ],
)
def test_bad_preflight_requests(control_db, store, body, status, message):
    world = make_world(control_db)
    resp = preflight(client_for(control_db, store), world, body)
    assert resp.status_code == status and message in resp.json["error"]


def test_missing_upload_is_404(control_db, store):
    world = make_world(control_db)
    upload = Uploads(store, expiry=dt.timedelta(hours=1)).create(
        world.project, Principal(world.org.id, None, "t")
    )
    resp = preflight(client_for(control_db, store), world, {"upload_key": upload["object_key"]})
    assert resp.status_code == 404 and "nothing has been uploaded at" in resp.json["error"]


def test_a_gzip_bomb_upload_preflight_reads_only_up_to_its_caps(control_db, store, tmp_path):
    # 1 GiB of SQL comment lines, about 1 MiB compressed: it used to cost the web
    # process 16 s of CPU and more per preflight. The caps are small here to show them.
    settings = control_db.replace(preflight_head_bytes=256 * 1024, preflight_text_bytes=1024 * 1024)
    bomb = gzip_bomb(
        tmp_path / "bomb.sql.gz", b"--\n", 1024 * 1024 * 1024, suffix=b"CREATE EXTENSION plperlu;\n"
    )
    world = make_world(control_db)
    upload = Uploads(store, expiry=dt.timedelta(hours=1)).create(
        world.project, Principal(world.org.id, None, "t")
    )
    upload_file(upload, bomb)
    resp = preflight(client_for(settings, store), world, {"upload_key": upload["object_key"]})
    assert resp.status_code == 200, resp.text
    body = resp.json["preflight"]
    assert body["source"]["format"] == "gzip-plain"
    size = bomb.stat().st_size
    assert checks_of(resp)["dump_read_in_full"] == (
        "warn",
        f"preflight read the first 1.0 MiB of the dump (decompressed from the first 256.0 KiB of the "
        f"{human_bytes(size)} upload); the import reads it whole and checks what comes after",
    )
    # The extension at the very end is past the caps: preflight does not claim to have seen it.
    assert checks_of(resp)["extensions_available_on_target"][0] == "pass"
    assert body["ok"] is True
