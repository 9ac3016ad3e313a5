"""The OpenAPI document: built from the app's routes and the schemas that validate bodies
and shape answers (the running service is checked against it in tests/e2e/test_contract.py)."""

from __future__ import annotations

import datetime as dt
import json

import falcon
import falcon.testing
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from app import schemas
from app.api import Services, create_app
from app.body import read_body
from app.edge import REQUEST_ID
from app.openapi import OPENAPI_VERSION, document, operation, routes, undocumented
from pipeline.config import DEV_SECRET_KEY, Settings
from pipeline.errors import InvalidRequest
from pipeline.sealing import Sealer
from pipeline.uploads import Uploads


def make_app() -> falcon.App:
    # No service is reached: create_app only wires collaborators.
    services = Services(
        settings=Settings(),
        sealer=Sealer(DEV_SECRET_KEY),
        wake=lambda job_id, stage: None,
        uploads=Uploads(None, expiry=dt.timedelta(hours=1)),
        readiness={},
    )
    return create_app(services)


@pytest.fixture(scope="module")
def app():
    return make_app()


@pytest.fixture(scope="module")
def doc(app):
    return document(app)


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"] == OPENAPI_VERSION == "3.1.0"
    errors = [e.message for e in jsonschema_rs.Draft202012Validator(OPENAPI_31).iter_errors(doc)]
    assert errors == []


def test_every_route_and_method_is_documented(app, doc):
    assert undocumented(app) == []
    served = {(path, method.lower()) for path, method, _ in routes(app)}
    documented = {(path, method) for path, methods in doc["paths"].items() for method in methods}
    assert documented == served
    assert ("/v1/projects/{project_id}/imports", "post") in served and ("/v1/openapi.json", "get") in served


def test_a_route_without_a_declared_operation_is_reported():
    app = make_app()

    class Bare:
        def on_get(self, req, resp):
            resp.media = {}

    app.add_route("/v1/bare", Bare())
    assert undocumented(app) == ["GET /v1/bare"]


def test_an_operation_may_answer_other_than_json():
    app = make_app()

    class Metrics:
        auth_required = False

        @operation("Prometheus metrics.", responses={200: None}, media_type="text/plain", authenticated=False)
        def on_get(self, req, resp):
            resp.text = ""

    app.add_route("/metrics", Metrics())
    assert undocumented(app) == []
    op = document(app)["paths"]["/metrics"]["get"]
    assert list(op["responses"]) == ["200"]
    assert op["responses"]["200"]["description"] == "OK"
    assert op["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert op["security"] == []


def test_each_authenticated_operation_documents_its_errors_with_the_error_body(doc):
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if path.startswith("/v1/") and path != "/v1/openapi.json":
                assert op["security"] == [{"bearer": []}, {"apiKey": []}], (method, path)
                assert {"400", "401", "403", "429", "503"} <= set(op["responses"]), (method, path)
                if "{" in path:
                    assert "404" in op["responses"], (method, path)
            else:
                assert op["security"] == [], (method, path)
            for status, response in op["responses"].items():
                if status >= "400" and path != "/readyz":
                    assert response["content"]["application/json"]["schema"] == error, (method, path, status)
    imports = doc["paths"]["/v1/projects/{project_id}/imports"]["post"]
    assert set(imports["responses"]) == {
        "200",
        "202",
        "400",
        "401",
        "403",
        "404",
        "409",
        "413",
        "415",
        "422",
        "429",
        "503",
    }
    assert "Location" in imports["responses"]["202"]["headers"]
    assert "Retry-After" in imports["responses"]["429"]["headers"]
    assert imports["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImportBody"
    }


def test_parameters_say_what_the_edge_accepts(doc):
    jobs = doc["paths"]["/v1/projects/{project_id}/jobs"]["get"]["parameters"]
    by_name = {p["name"]: p for p in jobs}
    assert by_name["project_id"]["in"] == "path" and by_name["project_id"]["schema"]["pattern"].startswith(
        "^[A-Za-z0-9_-]"
    )
    assert by_name["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 25}
    imports = doc["paths"]["/v1/projects/{project_id}/imports"]["post"]["parameters"]
    assert "Idempotency-Key" in {p["name"] for p in imports}


def test_every_operation_documents_the_request_id_it_reads_and_returns(doc):
    # Every route reads X-Request-ID and answers with one (app.observability); the
    # document said neither.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            sent = {p["name"]: p for p in op["parameters"]}["X-Request-ID"]
            assert sent["in"] == "header" and not sent["required"], (method, path)
            for status, response in op["responses"].items():
                assert response["headers"]["X-Request-ID"]["required"] is True, (method, path, status)
    pattern = doc["paths"]["/healthz"]["get"]["responses"]["200"]["headers"]["X-Request-ID"]["schema"][
        "pattern"
    ]
    from app.observability import request_id

    assert request_id("a" * 128, new=lambda: "new") == "a" * 128 and pattern == "^" + REQUEST_ID.pattern + "$"
    assert request_id("a" * 129, new=lambda: "new") == "new"


def test_the_import_body_schema_is_the_validating_model(doc):
    body = doc["components"]["schemas"]["ImportBody"]
    assert body["additionalProperties"] is False
    assert body["required"] == ["confirm"] and body["properties"]["confirm"]["const"] is True
    assert body["oneOf"] == [{"required": ["source_url"]}, {"required": ["upload_key"]}]
    # Absent, never null: no default and no null branch.
    assert body["properties"]["upload_key"] == {
        "description": schemas.UPLOAD_KEY,
        "title": "Upload Key",
        "type": "string",
    }


def request(body: str, content_type: str = "application/json") -> falcon.Request:
    return falcon.testing.create_req(method="POST", body=body, headers={"Content-Type": content_type})


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (schemas.ImportBody, [], "the request body must be a JSON object"),
        (schemas.ImportBody, "s", "the request body must be a JSON object"),
        (
            schemas.ImportBody,
            {"confirm": True, "source_url": "postgres://h/d", "zz": 1, "extra": 1},
            "unknown field(s): extra, zz; allowed fields are confirm, recreate, source_url, upload_key",
        ),
        (schemas.ImportBody, {"source_url": "postgres://h/d"}, '"confirm" must be true: an import replaces'),
        (schemas.ImportBody, {"confirm": "yes", "source_url": "postgres://h/d"}, '"confirm" must be true'),
        (schemas.ImportBody, {"confirm": 1, "source_url": "postgres://h/d"}, '"confirm" must be true'),
        (schemas.ImportBody, {"confirm": False, "source_url": "postgres://h/d"}, '"confirm" must be true'),
        (
            schemas.ImportBody,
            {"confirm": True, "recreate": "no", "source_url": "postgres://h/d"},
            '"recreate" must be true or false',
        ),
        (schemas.ImportBody, {"confirm": True}, 'send exactly one of "source_url"'),
        (
            schemas.ImportBody,
            {"confirm": True, "source_url": "postgres://h/d", "upload_key": "k"},
            "exactly one of",
        ),
        (schemas.ImportBody, {"confirm": True, "upload_key": 5}, '"upload_key" must be a string'),
        (schemas.ImportBody, {"confirm": True, "source_url": None}, '"source_url" must be a string'),
        (schemas.PreflightBody, {}, 'send exactly one of "source_url"'),
        (
            schemas.PreflightBody,
            {"source_url": "postgres://h/d", "confirm": "yes"},
            '"confirm" must be true or false',
        ),
    ],
)
def test_bodies_the_schema_refuses_get_a_400_that_says_what_to_fix(model, body, message):
    with pytest.raises(InvalidRequest) as info:
        read_body(request(json.dumps(body)), model, max_bytes=1024)
    assert message in info.value.message


def test_bodies_the_schema_accepts():
    live = read_body(
        request('{"confirm": true, "source_url": "postgres://h/d"}'), schemas.ImportBody, max_bytes=1024
    )
    assert (live.recreate, live.source_url, live.upload_key) == (False, "postgres://h/d", None)
    upload = read_body(
        request('{"upload_key": "k", "recreate": true}'), schemas.PreflightBody, max_bytes=1024
    )
    assert (upload.recreate, upload.source_url, upload.upload_key) == (True, None, "k")


def test_reading_checks_still_come_first():
    with pytest.raises(falcon.HTTPUnsupportedMediaType):
        read_body(request('{"confirm": true}', "text/plain"), schemas.ImportBody, max_bytes=1024)
    with pytest.raises(falcon.HTTPContentTooLarge):
        read_body(request('{"confirm": true}'), schemas.ImportBody, max_bytes=4)
    with pytest.raises(InvalidRequest, match="names 'confirm' twice"):
        read_body(request('{"confirm": true, "confirm": true}'), schemas.ImportBody, max_bytes=1024)


JOB = {
    "attempts": 0,
    "cancel_requested_at": None,
    "claimed_at": None,
    "claimed_by": None,
    "cluster_id": "cls_1",
    "completed_at": None,
    "created_at": "2026-11-29T17:00:00.123456Z",
    "error": None,
    "id": "job_1",
    "last_exit_code": None,
    "last_stderr": None,
    "last_stdout": None,
    "locked_resource": "project:prj_1",
    "max_attempts": 3,
    "organization_id": "org_1",
    "preview_database_id": None,
    "progress": {},
    "project_id": "prj_1",
    "recreate": False,
    "retry_classification": None,
    "source": {"kind": "live", "url": "postgres://u:***@h/d"},
    "stage": "preflight",
    "started_at": None,
    "state": "pending",
    "type": "project.import",
    "updated_at": "2026-11-29T17:00:00.123456Z",
}


def test_shaping_a_job_leaves_it_as_it_was():
    assert schemas.dump(schemas.JobEnvelope, {"job": JOB}) == {"job": JOB}
    done = {**JOB, "state": "completed", "report": {"tables": {}}}
    assert schemas.dump(schemas.JobEnvelope, {"job": done}) == {"job": done}


def test_the_published_job_fields_are_the_schemas():
    from pipeline.serialize import JOB_FIELDS

    assert set(JOB_FIELDS) <= set(schemas.Job.model_fields)
    assert set(JOB) | {"report"} == set(schemas.Job.model_fields)
