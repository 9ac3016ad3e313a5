"""Hostile and malformed requests: each gets the right 4xx and a sentence saying what to fix.

Driven through Falcon's test client against the real control database, like test_api.
Every answer is `{"error": …}` with no traceback and no secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from falcon import testing

from app.api import Services, create_app
from app.auth import api_key_authenticator
from app.clerk import ClerkAuthenticator, JwksCache
from pipeline import accounts, apikeys
from pipeline.db import database
from pipeline.models import ApiKey, Job, Organization, Project
from pipeline.principals import JOBS_READ, PROJECTS_WRITE
from pipeline.ratelimit import RateLimiter
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads
from tests.support.world import make_world

SOURCE = "postgres://alice:pa55word@db.example.com:5432/shop"
ISSUER = "https://clerk.capydb.test"
APP = "https://console.capydb.test"


class RecordingQueue:
    def __init__(self):
        self.woken = []

    def wake(self, job_id, stage):
        self.woken.append((job_id, stage))


def services(settings, store, queue, **extra):
    return Services(
        settings=settings,
        sealer=Sealer(settings.secret_key),
        wake=queue.wake,
        uploads=Uploads(store, expiry=dt.timedelta(hours=1)),
        readiness={"database": lambda: None},
        **extra,
    )


@pytest.fixture
def queue():
    return RecordingQueue()


@pytest.fixture
def client(control_db, store, queue):
    return testing.TestClient(create_app(services(control_db, store, queue)))


@pytest.fixture
def world(control_db):
    return make_world(control_db)


def assert_useful_error(resp, status, message, *secrets):
    assert resp.status_code == status, resp.text
    assert set(resp.json) == {"error"}, resp.text
    error = resp.json["error"]
    assert message in error, error
    assert "Traceback" not in resp.text and "internal error" not in error
    assert len(error.split()) >= 5, f"not a sentence: {error!r}"
    for secret in ("pa55word", *secrets):
        assert secret not in resp.text


# --------------------------------------------------------------------------- inputs


def _post(path, body, **headers):
    return ("POST", path, body, {"Content-Type": "application/json", **headers}, None)


def _get(path, query=None, **headers):
    return ("GET", path, None, headers, query)


IMPORTS = "/v1/projects/{project}/imports"
GOOD = json.dumps({"confirm": True, "source_url": SOURCE})

HOSTILE = [
    # (request, status, message)
    pytest.param(
        _post(IMPORTS, "[" * 30_000 + "]" * 30_000), 400, "nests deeper than 32 levels", id="deep-json"
    ),
    pytest.param(
        _post(IMPORTS, '{"confirm": true, "recreate": false, "source_url": "%s", "recreate": true}' % SOURCE),
        400,
        "names 'recreate' twice; send each field once",
        id="duplicate-key",
    ),
    pytest.param(
        _post(IMPORTS, '{"confirm": true, "source_url": "%s", "recreate": %s}' % (SOURCE, "9" * 5000)),
        400,
        "at most 30 digits",
        id="5000-digit-number",
    ),
    pytest.param(
        _post(IMPORTS, '{"confirm": true, "source_url": "%s", "recreate": NaN}' % SOURCE),
        400,
        "NaN is not a JSON value",
        id="nan",
    ),
    pytest.param(
        _post(IMPORTS, json.dumps({"confirm": True, "source_url": SOURCE + "\x00"})),
        400,
        "must not contain NUL",
        id="nul-in-body-string",
    ),
    pytest.param(
        _post(IMPORTS, '{"confirm": true, "upload_key": "imports/\\ud800"}'),
        400,
        "lone surrogates",
        id="lone-surrogate",
    ),
    pytest.param(
        _post(IMPORTS, b'{"confirm": true, "source_url": "\xff"}'), 400, "must be UTF-8", id="not-utf8"
    ),
    pytest.param(
        _get("/v1/projects/{project}/jobs", query="limit=%C2%B2"),
        400,
        "limit must be a whole number from 1 to 100",
        id="superscript-two-limit",
    ),
    pytest.param(
        _get("/v1/projects/{project}/jobs", query="limit=" + "9" * 5000),
        400,
        "limit must be a whole number from 1 to 100",
        id="5000-digit-limit",
    ),
    pytest.param(
        _get("/v1/projects/{project}/audit-events", query="limit=-1"),
        400,
        "limit must be a whole number from 1 to 100",
        id="negative-limit",
    ),
    pytest.param(
        _get("/v1/jobs/job_\x00x"), 400, "the job ID in the path is not valid", id="nul-in-job-path"
    ),
    pytest.param(
        _post("/v1/projects/prj\x00/imports", GOOD),
        400,
        "the project ID in the path is not valid",
        id="nul-in-project-path",
    ),
    pytest.param(_get("/v1/jobs/" + "j" * 7000), 400, "IDs are 1 to 64", id="7000-char-id"),
    pytest.param(_get("/v1/jobs/job_é"), 400, "ASCII letters", id="non-ascii-id"),
    pytest.param(
        _post(IMPORTS, GOOD, **{"Idempotency-Key": "k" * 7000}),
        400,
        "Idempotency-Key header must be 1 to 255 printable ASCII",
        id="7000-char-idempotency-key",
    ),
    pytest.param(
        _post(IMPORTS, GOOD, **{"Idempotency-Key": "clé\x01"}),
        400,
        "Idempotency-Key header must be 1 to 255 printable ASCII",
        id="control-char-idempotency-key",
    ),
    pytest.param(
        _get("/v1/projects/{project}/jobs", Authorization="Bearer " + "capy_live_" + "x" * 9000),
        401,
        "printable ASCII",
        id="huge-token",
    ),
]


@pytest.mark.parametrize(("request_", "status", "message"), HOSTILE)
def test_hostile_inputs_get_a_4xx_that_says_what_to_fix(client, world, request_, status, message):
    method, path, body, headers, query = request_
    headers = {"Authorization": f"Bearer {world.key}", **headers}
    resp = client.simulate_request(
        method,
        path.format(project=world.project.id),
        body=body,
        headers=headers,
        query_string=query,
    )
    assert_useful_error(resp, status, message, world.key)


class ValueRoute:
    """A route that hands a client's value straight to the control database."""

    auth_required = False

    def __init__(self, action):
        self.action = action

    def on_get(self, req, resp):
        self.action()


def _org_with_huge_clerk_id():
    # A unique index entry this large fails with "index row size exceeds maximum" (54000).
    org = accounts.create_organization("Huge")
    Organization.update(clerk_org_id=secrets.token_urlsafe(6000)).where(Organization.id == org.id).execute()


@pytest.mark.parametrize(
    "action",
    [
        lambda: Project.get_or_none(Project.id == "prj\x00"),
        lambda: Project.get_or_none(Project.id == "prj\ud800"),
        _org_with_huge_clerk_id,
        lambda: Project.update(storage_limit_bytes=10**30).where(Project.id == "prj_none").execute(),
    ],
    ids=["nul", "surrogate", "index-row-too-big", "out-of-range"],
)
def test_values_the_database_refuses_are_a_400_not_a_5xx(control_db, store, queue, action):
    app = create_app(services(control_db, store, queue))
    app.add_route("/test/value", ValueRoute(action))
    resp = testing.TestClient(app).simulate_get("/test/value")
    assert_useful_error(resp, 400, "the request holds a value the service cannot store")


# --------------------------------------------------------------------------- idempotency


def _import(client, world, body, key=None, **headers):
    return client.simulate_post(
        f"/v1/projects/{world.project.id}/imports",
        headers={
            "Authorization": f"Bearer {key or world.key}",
            "Content-Type": "application/json",
            **headers,
        },
        body=json.dumps(body),
    )


def test_idempotency_key_reused_with_a_different_body_is_422(client, world, queue):
    first = _import(client, world, {"confirm": True, "source_url": SOURCE}, **{"Idempotency-Key": "retry-1"})
    assert first.status_code == 202
    job_id = first.json["job"]["id"]
    same = _import(client, world, {"confirm": True, "source_url": SOURCE}, **{"Idempotency-Key": "retry-1"})
    assert same.status_code == 200 and same.json["job"]["id"] == job_id
    for different in (
        {"confirm": True, "source_url": SOURCE, "recreate": True},
        {"confirm": True, "source_url": SOURCE.replace("pa55word", "other-password")},
        {"confirm": True, "source_url": SOURCE.replace("shop", "shop2")},
    ):
        resp = _import(client, world, different, **{"Idempotency-Key": "retry-1"})
        assert_useful_error(resp, 422, "already used for a different request", "other-password")
        assert job_id in resp.json["error"]
    assert len(queue.woken) == 1
    assert "pa55word" not in (Job.get_by_id(job_id).request_hash or "")


# --------------------------------------------------------------------------- API keys


def test_revoked_expired_and_wrong_scope_keys(client, world):
    revoked = apikeys.create_key(world.org, world.project)
    apikeys.revoke_key(revoked.record.id)
    expired = apikeys.create_key(
        world.org, world.project, expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    jobs_path = f"/v1/projects/{world.project.id}/jobs"
    for key, message in ((revoked.plaintext, "has been revoked"), (expired.plaintext, "has expired")):
        resp = client.simulate_get(jobs_path, headers={"X-API-Key": key})
        assert_useful_error(resp, 401, message, key)

    reader = apikeys.create_key(world.org, world.project, scopes=[JOBS_READ]).plaintext
    writer = apikeys.create_key(world.org, world.project, scopes=[PROJECTS_WRITE]).plaintext
    assert client.simulate_get(jobs_path, headers={"X-API-Key": reader}).status_code == 200
    for path in ("imports", "imports/uploads", "imports/preflight"):
        resp = client.simulate_post(
            f"/v1/projects/{world.project.id}/{path}",
            headers={"X-API-Key": reader, "Content-Type": "application/json"},
            body=GOOD,
        )
        assert_useful_error(resp, 403, "lacks the scope projects:write", reader)
    job_id = _import(client, world, {"confirm": True, "source_url": SOURCE}, key=writer).json["job"]["id"]
    for path in (jobs_path, f"/v1/jobs/{job_id}", f"/v1/projects/{world.project.id}/audit-events"):
        resp = client.simulate_get(path, headers={"X-API-Key": writer})
        assert_useful_error(resp, 403, "lacks the scope jobs:read", writer)


def test_new_keys_carry_both_scopes(world):
    record = ApiKey.get(ApiKey.key_prefix == world.key[:22])
    assert sorted(record.scopes) == ["jobs:read", "projects:write"]


# --------------------------------------------------------------------------- rate limit


class Clock:
    def __init__(self):
        self.now = dt.datetime(2030, 1, 1, 12, 0, 10, tzinfo=dt.UTC)

    def __call__(self):
        return self.now


def test_rate_limit_per_credential_across_workers_is_429_with_retry_after(control_db, store, queue, world):
    clock = Clock()
    # Two app instances stand for two web workers: the counter is in the control database.
    apps = [
        testing.TestClient(
            create_app(services(control_db, store, queue, rate_limiter=RateLimiter(3, clock=clock)))
        )
        for _ in range(2)
    ]
    path = f"/v1/projects/{world.project.id}/jobs"
    auth = {"X-API-Key": world.key}
    assert [apps[i % 2].simulate_get(path, headers=auth).status_code for i in range(3)] == [200, 200, 200]
    resp = apps[1].simulate_get(path, headers=auth)
    assert_useful_error(resp, 429, "rate limit exceeded: at most 3 requests per minute", world.key)
    assert resp.headers["Retry-After"] == "50"
    # Another credential has its own budget.
    other = apikeys.create_key(world.org, world.project).plaintext
    assert apps[0].simulate_get(path, headers={"X-API-Key": other}).status_code == 200
    # The next window starts afresh.
    clock.now += dt.timedelta(seconds=50)
    assert apps[0].simulate_get(path, headers=auth).status_code == 200
    # Counters of windows long past are deleted, so the table stays small.
    first_window = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    clock.now += dt.timedelta(minutes=3)
    assert apps[0].simulate_get(path, headers=auth).status_code == 200
    left = database.execute_sql("SELECT count(*) FROM rate_limits WHERE window_start = %s", (first_window,))
    assert left.fetchone()[0] == 0


# --------------------------------------------------------------------------- Clerk tokens


class JwksServer:
    """A local JWKS endpoint on 127.0.0.1 that counts its fetches."""

    def __init__(self, keys):
        self.keys = keys
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(private, kid):
    entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {**entry, "kid": kid, "use": "sig", "alg": "RS256"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signing_key():
    return _rsa()


@pytest.fixture
def jwks(signing_key):
    server = JwksServer([_jwk(signing_key, "k1")])
    yield server
    server.close()


@pytest.fixture
def clerk_org(control_db):
    world = make_world(control_db)
    clerk_id = "org_clerk_" + world.org.id
    world.org.clerk_org_id = clerk_id
    world.org.save()
    return world


@pytest.fixture
def clerk_client(control_db, store, queue, jwks):
    clerk = ClerkAuthenticator(
        JwksCache(jwks.url, timeout=2, min_refresh_seconds=60), issuer=ISSUER, authorized_parties=(APP,)
    )
    app = create_app(services(control_db, store, queue, authenticators=(api_key_authenticator, clerk)))
    return testing.TestClient(app)


def claims(org_id, **overrides):
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "sub": "user_2abc",
        "azp": APP,
        "sid": "sess_1",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 60,
        "org_id": org_id,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(payload, key, kid="k1"):
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def unsigned(payload, alg, kid="k1", secret=b""):
    head = _b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps(payload).encode())
    signature = _b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()) if secret else ""
    return f"{head}.{body}.{signature}"


def test_a_clerk_session_acts_for_its_organization(control_db, clerk_client, clerk_org, signing_key):
    session = token(claims(clerk_org.org.clerk_org_id), signing_key)
    resp = clerk_client.simulate_post(
        f"/v1/projects/{clerk_org.project.id}/imports",
        headers={"Authorization": f"Bearer {session}", "Content-Type": "application/json"},
        body=GOOD,
    )
    assert resp.status_code == 202, resp.text
    audit = clerk_client.simulate_get(
        f"/v1/projects/{clerk_org.project.id}/audit-events", headers={"Authorization": f"Bearer {session}"}
    )
    assert audit.json["audit_events"][0]["actor"] == "clerk_user:user_2abc"
    # Clerk v2 tokens put the active organization at o.id; every project of the org is open.
    sibling = accounts.create_project(
        clerk_org.org, "second", Sealer(control_db.secret_key), cluster_id=clerk_org.cluster.id
    )
    v2 = token(claims(None, o={"id": clerk_org.org.clerk_org_id, "rol": "admin"}, v=2), signing_key)
    resp = clerk_client.simulate_get(
        f"/v1/projects/{sibling.id}/jobs", headers={"Authorization": f"Bearer {v2}"}
    )
    assert resp.status_code == 200, resp.text


def _bad_tokens(org_id, signing_key, public_pem):
    other_key = _rsa()
    return [
        ("alg-none", unsigned(claims(org_id), "none"), 401, "must be signed with RS256"),
        (
            "hs256-with-public-key",
            unsigned(claims(org_id), "HS256", secret=public_pem),
            401,
            "must be signed with RS256",
        ),
        ("forged-signature", token(claims(org_id), other_key), 401, "signature is not valid"),
        (
            "foreign-issuer",
            token(claims(org_id, iss="https://evil.example.com"), signing_key),
            401,
            "another issuer",
        ),
        ("expired", token(claims(org_id, exp=int(time.time()) - 60), signing_key), 401, "has expired"),
        (
            "not-yet-valid",
            token(claims(org_id, nbf=int(time.time()) + 600), signing_key),
            401,
            "not valid yet",
        ),
        (
            "wrong-azp",
            token(claims(org_id, azp="https://evil.example.com"), signing_key),
            401,
            "authorized party",
        ),
        ("no-azp", token(claims(org_id, azp=None), signing_key), 401, "authorized party"),
        ("unknown-kid", token(claims(org_id), other_key, kid="k9"), 401, "signing key is not one of Clerk's"),
        ("no-org", token(claims(None), signing_key), 401, "no active organization"),
        (
            "unknown-org",
            token(claims("org_clerk_unknown"), signing_key),
            403,
            "not linked to a CapyDB organization",
        ),
        ("no-exp", token(claims(org_id, exp=None), signing_key), 401, "lacks the exp claim"),
        ("garbage", "eyJhbGciOiJSUzI1NiJ9.bm9wZQ.c2ln", 401, "session token"),
    ]


def test_bad_clerk_tokens_are_refused_with_a_reason(clerk_client, clerk_org, signing_key):
    public_pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name, bad, status, message in _bad_tokens(clerk_org.org.clerk_org_id, signing_key, public_pem):
        resp = clerk_client.simulate_get(
            f"/v1/projects/{clerk_org.project.id}/jobs", headers={"Authorization": f"Bearer {bad}"}
        )
        assert resp.status_code == status, (name, resp.text)
        assert_useful_error(resp, status, message, bad)


def test_unknown_kids_cannot_hammer_the_jwks_endpoint(clerk_client, clerk_org, jwks, signing_key):
    other = _rsa()
    good = token(claims(clerk_org.org.clerk_org_id), signing_key)
    path = f"/v1/projects/{clerk_org.project.id}/jobs"
    assert clerk_client.simulate_get(path, headers={"Authorization": f"Bearer {good}"}).status_code == 200
    for i in range(20):
        bogus = token(claims(clerk_org.org.clerk_org_id), other, kid=f"bogus-{i}")
        assert (
            clerk_client.simulate_get(path, headers={"Authorization": f"Bearer {bogus}"}).status_code == 401
        )
    assert jwks.fetches == 1  # the first fetch only: refreshes wait min_refresh_seconds


def test_a_rotated_clerk_key_is_found_by_refreshing(control_db, store, queue, jwks, clerk_org, signing_key):
    now = [1000.0]
    cache = JwksCache(jwks.url, timeout=2, min_refresh_seconds=30, clock=lambda: now[0])
    clerk = ClerkAuthenticator(cache, issuer=ISSUER, authorized_parties=(APP,))
    client = testing.TestClient(
        create_app(services(control_db, store, queue, authenticators=(api_key_authenticator, clerk)))
    )
    path = f"/v1/projects/{clerk_org.project.id}/jobs"
    assert (
        client.simulate_get(
            path,
            headers={"Authorization": f"Bearer {token(claims(clerk_org.org.clerk_org_id), signing_key)}"},
        ).status_code
        == 200
    )
    rotated = _rsa()
    jwks.keys = [_jwk(signing_key, "k1"), _jwk(rotated, "k2")]
    fresh = token(claims(clerk_org.org.clerk_org_id), rotated, kid="k2")
    assert client.simulate_get(path, headers={"Authorization": f"Bearer {fresh}"}).status_code == 401
    now[0] += 31
    assert client.simulate_get(path, headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    assert jwks.fetches == 2


def test_clerk_tokens_are_not_api_keys_without_clerk(client, clerk_org, signing_key):
    session = token(claims(clerk_org.org.clerk_org_id), signing_key)
    resp = client.simulate_get(
        f"/v1/projects/{clerk_org.project.id}/jobs", headers={"Authorization": f"Bearer {session}"}
    )
    assert_useful_error(resp, 401, "not a CapyDB API key", session)


def test_unreachable_jwks_is_a_503(control_db, store, queue, clerk_org, signing_key):
    dead = JwksServer([])
    url = dead.url
    dead.close()
    clerk = ClerkAuthenticator(JwksCache(url, timeout=1), issuer=ISSUER)
    client = testing.TestClient(
        create_app(services(control_db, store, queue, authenticators=(api_key_authenticator, clerk)))
    )
    session = token(claims(clerk_org.org.clerk_org_id), signing_key)
    resp = client.simulate_get(
        f"/v1/projects/{clerk_org.project.id}/jobs", headers={"Authorization": f"Bearer {session}"}
    )
    assert_useful_error(resp, 503, "JWKS is unreachable", session)


def test_settings_wire_clerk_in(control_db, jwks):
    from app.wsgi import authenticators

    assert len(authenticators(control_db)) == 1
    with_clerk = control_db.replace(clerk_jwks_url=jwks.url, clerk_issuer=ISSUER)
    assert isinstance(authenticators(with_clerk)[1], ClerkAuthenticator)
