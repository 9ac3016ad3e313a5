"""The hostile suite: a running service in production posture, attacked over HTTP.

Real gunicorn and dramatiq processes with `CAPY_ENV=production`, a secret key of their
own and private sources refused, on a queue prefix of their own. Every row of the table
is a request a hostile or careless client can send; each gets its status and a message
that says what to fix, never a traceback and never a secret. Then hostile dumps are
imported and the project is preflighted, proving that nothing a tenant defines runs in
a service session and that a restore reaches nothing but its own preview.

Network rule: every address here is loopback, or a host in `.invalid` (which never
resolves); no test sends a packet anywhere else.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
import requests

from tests.support import pg
from tests.support.hostile import PINNED, PLAIN_HIJACK
from tests.support.processes import cli, start_service, wait_for_job
from tests.support.uploading import post_file

SECRET_PASSWORD = "s3cr3t-Pa55word-never-shown"


@pytest.fixture(scope="module")
def prod(control_db, tmp_path_factory):
    """The service in production posture, with its own queues (the dev-mode e2e
    service shares this run's control database, not its workers)."""
    settings = control_db.replace(
        environment="production",
        allow_private_sources=False,
        queue_prefix=control_db.queue_prefix + "_prod",
    )
    running = start_service(settings, tmp_path_factory.mktemp("prod-logs"))
    env = running.env
    cli(env, "migrate")
    if not pg.admin(
        "SELECT 1 FROM clusters WHERE name = 'local'", dbname=control_db.database_url.rsplit("/", 1)[1]
    ):
        cli(env, "clusters", "add", "--name", "local", "--admin-url", pg.ADMIN_URL)
    yield running
    running.stop()
    for name, path in running.logs.items():
        text = path.read_text(errors="replace")
        assert SECRET_PASSWORD not in text, f"the {name} log shows a source password"
        assert "Traceback" not in text, f"the {name} log has a traceback:\n{text[-3000:]}"


@dataclasses.dataclass
class Tenant:
    org: str
    project: dict
    key: str
    read_only_key: str


def make_tenant(prod) -> Tenant:
    org = cli(prod.env, "orgs", "create", "--name", "Hostile org")["id"]
    project = cli(prod.env, "projects", "create", "--org", org, "--name", "hostile")
    key = cli(prod.env, "keys", "create", "--org", org, "--project", project["id"])["key"]
    read_only = cli(
        prod.env, "keys", "create", "--org", org, "--project", project["id"], "--scope", "jobs:read"
    )["key"]
    return Tenant(org, project, key, read_only)


@pytest.fixture(scope="module")
def tenants(prod) -> tuple[Tenant, Tenant]:
    return make_tenant(prod), make_tenant(prod)


def _alg_none_jwt() -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return (
        part({"alg": "none", "typ": "JWT"})
        + "."
        + part({"sub": "user_1", "org_id": "org_x", "exp": 4102444800})
        + "."
    )


Call = Callable[[str, Tenant, Tenant], requests.Response]


def _post(
    path: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None, key: str = "key"
) -> Call:
    def call(base: str, me: Tenant, other: Tenant) -> requests.Response:
        url = base + path.format(me=me.project["id"], other=other.project["id"])
        sent = {
            "Authorization": f"Bearer {getattr(me, key)}",
            "Content-Type": "application/json",
            **(headers or {}),
        }
        data = (
            raw
            if raw is not None
            else json.dumps(body)
            .replace("{me}", me.project["id"])
            .replace("{other}", other.project["id"])
            .encode()
        )
        return requests.post(url, data=data, headers=sent, timeout=60)

    return call


def _get(path: str, *, auth: str | None = "key") -> Call:
    def call(base: str, me: Tenant, other: Tenant) -> requests.Response:
        headers = {"Authorization": f"Bearer {getattr(me, auth)}"} if auth in ("key", "read_only_key") else {}
        if auth and auth not in ("key", "read_only_key"):
            headers = {"Authorization": auth}
        return requests.get(
            base + path.format(me=me.project["id"], other=other.project["id"]), headers=headers, timeout=30
        )

    return call


IMPORTS = "/v1/projects/{me}/imports"
PREFLIGHT = "/v1/projects/{me}/imports/preflight"


def _source(query: str, host: str = "db.invalid") -> dict:
    return {"confirm": True, "source_url": f"postgres://app:{SECRET_PASSWORD}@{host}:5432/app?{query}"}


HOSTILE = [
    pytest.param(
        _post(IMPORTS, raw=b"[" * 30_000 + b"]" * 30_000), 400, "nests deeper", id="30000-deep-json"
    ),
    pytest.param(
        _post(IMPORTS, raw=b'{"confirm": true, "recreate": ' + b"9" * 5000 + b"}"),
        400,
        "digits",
        id="5000-digit-number",
    ),
    pytest.param(_post(IMPORTS, raw=b"x" * (1024 * 1024)), 413, "", id="oversized-body"),
    pytest.param(
        _post(IMPORTS, raw=b"confirm=true", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        "JSON",
        id="not-json",
    ),
    pytest.param(_get("/v1/projects/{me}/jobs?limit=²"), 400, "limit", id="superscript-limit"),
    pytest.param(_get("/v1/jobs/job_%00x"), 400, "not valid", id="nul-in-path"),
    pytest.param(
        _post(IMPORTS, _source("sslmode=disable"), headers={"Idempotency-Key": "k" * 7000}),
        400,
        "Idempotency-Key",
        id="7000-char-idempotency-key",
    ),
    pytest.param(
        _get("/v1/projects/{me}/jobs", auth=None), 401, "authentication required", id="no-credentials"
    ),
    pytest.param(
        _get("/v1/projects/{me}/jobs", auth="Bearer capy_live_" + "x" * 40),
        401,
        "not valid",
        id="forged-api-key",
    ),
    pytest.param(
        _get("/v1/projects/{me}/jobs", auth="Bearer " + _alg_none_jwt()), 401, "", id="alg-none-jwt"
    ),
    pytest.param(_get("/v1/projects/{me}/jobs", auth="Basic dXNlcjpwYXNz"), 401, "Bearer", id="basic-auth"),
    pytest.param(_get("/v1/projects/{other}/jobs"), 404, "does not exist", id="another-tenants-project"),
    pytest.param(
        _post(IMPORTS, _source("sslmode=disable"), key="read_only_key"),
        403,
        "projects:write",
        id="read-only-key-imports",
    ),
    pytest.param(_post(IMPORTS, _source("passfile=/root/.pgpass")), 400, "passfile", id="passfile-parameter"),
    pytest.param(_post(IMPORTS, _source("service=prod")), 400, "service", id="service-parameter"),
    pytest.param(
        _post(IMPORTS, _source("sslkey=/etc/ssl/private/key.pem")), 400, "sslkey", id="sslkey-parameter"
    ),
    pytest.param(
        _post(IMPORTS, _source("sslpassword=hunter2")), 400, "sslpassword", id="sslpassword-parameter"
    ),
    pytest.param(
        _post(PREFLIGHT, _source("sslrootcert=/etc/passwd")), 400, "sslrootcert", id="sslrootcert-file"
    ),
    pytest.param(
        _post(IMPORTS, {"confirm": True, "upload_key": "imports/{me}/../../etc/passwd"}),
        400,
        "",
        id="traversal-upload-key",
    ),
    pytest.param(
        _post(IMPORTS, {"confirm": True, "upload_key": "/imports/x/dump"}), 400, "", id="absolute-upload-key"
    ),
    pytest.param(
        _post(IMPORTS, {"confirm": True, "upload_key": "imports/{other}/abc/dump"}),
        400,
        "",
        id="other-projects-upload-key",
    ),
    pytest.param(
        _post(IMPORTS, {"confirm": True, "upload_key": "imports/{me}/never-issued/dump"}),
        400,
        "",
        id="never-issued-upload-key",
    ),
    pytest.param(
        _post(IMPORTS, {"confirm": False, "source_url": "postgres://a@db.invalid/b"}),
        400,
        "confirm",
        id="unconfirmed",
    ),
]


@pytest.mark.e2e
@pytest.mark.parametrize("call,status,message", HOSTILE)
def test_hostile_requests_get_a_4xx_that_says_what_to_fix(prod, tenants, call, status, message):
    me, other = tenants
    resp = call(prod.base_url, me, other)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and len(body["error"]) > 10, body
    assert message in body["error"], body
    assert SECRET_PASSWORD not in resp.text and "hunter2" not in resp.text and "Traceback" not in resp.text


@pytest.mark.e2e
def test_the_address_gate_refuses_loopback_and_unresolvable_hosts_in_production(prod, tenants):
    me, _ = tenants
    auth = {"Authorization": f"Bearer {me.key}"}
    url = f"{prod.base_url}/v1/projects/{me.project['id']}/imports/preflight"
    for host, check, words in (
        ("127.0.0.1", "source_address_allowed", "loopback"),
        ("[::1]", "source_address_allowed", "loopback"),
        ("localhost", "source_address_allowed", "loopback"),
        ("db.invalid", "source_reachable", "does not resolve"),
    ):
        resp = requests.post(
            url,
            json={"source_url": f"postgres://app:{SECRET_PASSWORD}@{host}:5432/app"},
            headers=auth,
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        checks = {c["name"]: c for c in resp.json()["preflight"]["checks"]}
        assert checks[check]["status"] == "fail" and words in checks[check]["detail"], (host, checks[check])
        assert SECRET_PASSWORD not in resp.text


@pytest.mark.e2e
def test_keys_revoked_or_expired_are_refused(prod, tenants):
    me, _ = tenants
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).isoformat()
    expiring = cli(
        prod.env, "keys", "create", "--org", me.org, "--project", me.project["id"], "--expires-at", soon
    )
    revoked = cli(prod.env, "keys", "create", "--org", me.org, "--project", me.project["id"])
    jobs = f"{prod.base_url}/v1/projects/{me.project['id']}/jobs"
    assert (
        requests.get(jobs, headers={"Authorization": f"Bearer {revoked['key']}"}, timeout=30).status_code
        == 200
    )
    cli(prod.env, "keys", "revoke", revoked["id"])
    resp = requests.get(jobs, headers={"Authorization": f"Bearer {revoked['key']}"}, timeout=30)
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]
    time.sleep(4)
    resp = requests.get(jobs, headers={"Authorization": f"Bearer {expiring['key']}"}, timeout=30)
    assert resp.status_code == 401 and "expired" in resp.json()["error"]


@pytest.mark.e2e
def test_an_idempotency_key_reused_for_another_request_is_422(prod, tenants):
    me, _ = tenants
    auth = {"Authorization": f"Bearer {me.key}", "Idempotency-Key": "hostile-idem-1"}
    url = f"{prod.base_url}/v1/projects/{me.project['id']}/imports"
    first = requests.post(url, json=_source("sslmode=disable"), headers=auth, timeout=30)
    assert first.status_code == 202, first.text
    again = requests.post(url, json=_source("sslmode=disable"), headers=auth, timeout=30)
    assert again.status_code == 200 and again.json()["job"]["id"] == first.json()["job"]["id"]
    other = requests.post(url, json=_source("sslmode=require"), headers=auth, timeout=30)
    assert other.status_code == 422 and first.json()["job"]["id"] in other.json()["error"]
    job = wait_for_job(prod, me.key, first.json()["job"]["id"], timeout=180)
    assert job["state"] == "failed" and "does not resolve" in job["error"]
    assert SECRET_PASSWORD not in json.dumps(job)


def _upload(prod, tenant: Tenant, data: bytes, *, recreate: bool) -> dict:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    base = f"{prod.base_url}/v1/projects/{tenant.project['id']}/imports"
    resp = requests.post(base + "/uploads", headers=auth, timeout=30)
    assert resp.status_code == 201, resp.text
    upload = resp.json()["upload"]
    posted = post_file(upload, data)
    assert posted.status_code in (200, 201, 204), posted.text
    resp = requests.post(
        base,
        json={"confirm": True, "recreate": recreate, "upload_key": upload["object_key"]},
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    return wait_for_job(prod, tenant.key, resp.json()["job"]["id"], timeout=300)


def _read(dbname: str, query: str) -> list[tuple]:
    conn = psycopg2.connect(pg.url_for(dbname), options=PINNED)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.e2e
def test_no_tenant_code_runs_in_a_service_session(prod, control_db):
    """A dump full of shadowing operators, aggregates and functions, with a database-level
    search_path that puts `public` first, is imported; then the project is preflighted
    (whose emptiness check reads the live database) and imported over again (finalize
    reads both databases). The tenant's functions log every call and count a
    superuser's calls in a sequence no rollback undoes."""
    tenant = make_tenant(prod)
    live = tenant.project["database_name"]
    job = _upload(prod, tenant, PLAIN_HIJACK.encode(), recreate=False)
    assert job["state"] == "completed", (job["error"], job["last_stderr"])
    auth = {"Authorization": f"Bearer {tenant.key}"}
    preflight = requests.post(
        f"{prod.base_url}/v1/projects/{tenant.project['id']}/imports/preflight",
        json={"source_url": "postgres://app@db.invalid/app"},
        headers=auth,
        timeout=60,
    )
    assert preflight.status_code == 200, preflight.text
    empty = {c["name"]: c for c in preflight.json()["preflight"]["checks"]}["target_database_empty"]
    assert empty["status"] == "fail" and "hijacked" not in empty["detail"]
    second = _upload(prod, tenant, b"CREATE TABLE public.second (id int);\n", recreate=True)
    assert second["state"] == "completed", (second["error"], second["last_stderr"])
    retained = second["report"]["replaced_database"]
    assert _read(retained, "SELECT is_called FROM public.hijack_superuser_calls") == [(False,)]
    assert _read(retained, "SELECT * FROM public.hijack_log") == []
    assert _read(retained, "SELECT id FROM public.notes ORDER BY 1") == [(1,), (2,), (3,)]
    assert _read(live, "SELECT count(*) FROM public.second") == [(0,)]


@pytest.mark.e2e
def test_a_dump_cannot_drop_the_live_or_retained_databases(prod, control_db):
    tenant = make_tenant(prod)
    live = tenant.project["database_name"]
    first = _upload(
        prod,
        tenant,
        b"CREATE TABLE public.kept (id int);\nINSERT INTO public.kept VALUES (1), (2);\n",
        recreate=True,
    )
    assert first["state"] == "completed", first["error"]
    retained = first["report"]["replaced_database"]
    control = control_db.database_url.rsplit("/", 1)[1]
    for victim in (live, retained, control):
        script = f'SET client_min_messages = warning;\nDROP DATABASE IF EXISTS "{victim}";\nCREATE TABLE public.after (id int);\n'.encode()
        job = _upload(prod, tenant, script, recreate=True)
        assert job["state"] == "failed" and job["retry_classification"] == "permanent", job
        assert "cannot drop, create or change any other database" in job["error"], job["error"]
        assert "/tmp" not in job["error"] and "/tmp" not in (job["last_stderr"] or "")
    assert pg.database_exists(live) and pg.database_exists(retained)
    assert _read(live, "SELECT count(*) FROM public.kept") == [(2,)]


@pytest.mark.e2e
def test_a_chunked_body_is_read(prod, tenants):
    """A client that streams its body (Transfer-Encoding: chunked, no Content-Length)
    is answered for what it sent, not for an empty body."""
    me, _ = tenants
    body = json.dumps({"source_url": f"postgres://app:{SECRET_PASSWORD}@db.invalid:5432/app"}).encode()
    resp = requests.post(
        f"{prod.base_url}/v1/projects/{me.project['id']}/imports/preflight",
        data=iter([body[:10], body[10:]]),
        headers={"Authorization": f"Bearer {me.key}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    checks = {c["name"]: c for c in resp.json()["preflight"]["checks"]}
    assert (
        checks["source_reachable"]["status"] == "fail"
        and "does not resolve" in checks["source_reachable"]["detail"]
    )
