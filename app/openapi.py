"""The OpenAPI 3.1 document, built from the app's own routes and schemas.

Each responder declares its operation with `@operation(...)`: the request body's model
(the one `read_body` validates with), the response models by status, the query
parameters and headers it reads (the same objects that read them), and the error
statuses it can answer. `document(app)` walks the app's routes, so a route added with
`app.add_route` is in the document as soon as its responder is declared, and a test
fails while one is not. Schemas are pydantic's JSON Schema (2020-12, OpenAPI 3.1's
dialect), under components/schemas.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import falcon
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from app import schemas
from app.edge import ID_PATTERN, REQUEST_ID, Header, QueryInt

WebApp = falcon.App[falcon.Request, falcon.Response]
Responder = Callable[..., Any]

OPENAPI_VERSION = "3.1.0"
VERSION = importlib.metadata.version("capy-imports")
REF = "#/components/schemas/{model}"

# What each error status means on this API (SPEC.md, HTTP API); an operation may say more.
ERRORS: dict[int, str] = {
    400: "Invalid request: a path parameter, query parameter, header or the body is not valid.",
    401: "Missing, invalid, expired or revoked credentials.",
    403: "The credentials are valid but not for this project, or lack the scope.",
    404: "Unknown project or job (or one the credentials may not see).",
    409: "Conflict, e.g. another import holds the project.",
    413: "The request body is too large.",
    415: "The body is not sent as application/json.",
    422: "The Idempotency-Key was already used for a different request.",
    429: "Rate limited: try again after Retry-After seconds.",
    503: "A dependency (database, broker, storage) is unavailable: try again shortly.",
}
# Every authenticated operation may answer these: a bad path ID or Idempotency-Key
# (app.edge), credentials and scopes (app.auth), rate limit, the database down.
AUTHENTICATED_ERRORS = (400, 401, 403, 429, 503)
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "API key (capy_live_…) or Clerk session JWT",
        "description": "An API key, org- or project-scoped, or a Clerk session token (RS256) when the "
        "deployment configures Clerk; the token's active organization is the CapyDB organization.",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (capy_live_…).",
    },
}
# Headers the error handlers always send with these statuses (app.errors).
_RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}, "description": "Bearer realm."}
    },
    429: {
        "Retry-After": {
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
            "description": "Seconds to wait.",
        }
    },
}
# Every answer carries the request's ID (app.observability), whatever its status.
_REQUEST_ID_HEADER = {
    REQUEST_ID.name: {
        "required": True,
        "schema": {"type": "string", "pattern": f"^{REQUEST_ID.pattern}$"},
        "description": "The client's X-Request-ID when it was sane, else a new ID.",
    }
}
_LOCATION = {
    "Location": {
        "required": True,
        "schema": {"type": "string"},
        "description": "The job's URL: /v1/jobs/{id}.",
    }
}


@dataclass(frozen=True)
class Operation:
    """A responder's operation; as a decorator (`@operation(...)`) it declares it and
    changes nothing in how the responder runs.

    `responses` maps each success status to its body's model, or to None for a body
    that is not JSON (a string of `media_type`, e.g. Prometheus' text format).
    """

    summary: str
    responses: Mapping[int, type[BaseModel] | None]
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    query: tuple[QueryInt, ...] = ()
    headers: tuple[Header, ...] = ()
    located: tuple[int, ...] = ()  # success statuses that send a Location header
    authenticated: bool = True
    notes: Mapping[int, str] = field(default_factory=dict)  # what a status means here
    media_type: str = falcon.MEDIA_JSON  # of the success responses

    def __call__(self, responder: Responder) -> Responder:
        responder.openapi_operation = self  # type: ignore[attr-defined]
        return responder


operation = Operation


def routes(app: WebApp) -> Iterator[tuple[str, str, Responder]]:
    """(path template, HTTP method, responder) for every route the app serves.

    Falcon's own inspector (falcon.inspect.inspect_compiled_router) walks the compiled
    router the same way; it reports names, and the document needs the responders.
    """

    def walk(nodes: list[Any], parent: str) -> Iterator[tuple[str, str, Responder]]:
        for node in nodes:
            path = f"{parent}/{node.raw_segment}"
            if node.resource is not None:
                for method, responder in (node.method_map or {}).items():
                    if not getattr(responder, "__module__", "").startswith("falcon."):  # 405s, OPTIONS
                        yield path, method, responder
            yield from walk(node.children or [], path)

    yield from walk(app._router._roots, "")


def undocumented(app: WebApp) -> list[str]:
    """The routes no `@operation` declares ("GET /path"): a test keeps this empty."""
    return [f"{method} {path}" for path, method, responder in routes(app) if declared(responder) is None]


def declared(responder: Responder) -> Operation | None:
    return getattr(responder, "openapi_operation", None)


def document(app: WebApp, *, title: str = "CapyDB Imports", version: str = VERSION) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every declared operation of `app`."""
    operations = [(path, method, op) for path, method, r in routes(app) if (op := declared(r)) is not None]
    models: set[tuple[type[BaseModel], JsonSchemaMode]] = {(schemas.ErrorBody, "serialization")}
    for _, _, op in operations:
        models.update((model, "serialization") for model in op.responses.values() if model is not None)
        if op.body is not None:
            models.add((op.body, "validation"))
    refs, definitions = models_json_schema(
        sorted(models, key=lambda m: (m[0].__name__, m[1])), ref_template=REF
    )
    paths: dict[str, dict[str, Any]] = {}
    for path, method, op in sorted(operations, key=lambda d: (d[0], d[1])):
        paths.setdefault(path, {})[method.lower()] = _path_item(path, method, op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": 'Move an existing Postgres database into a CapyDB project. Errors are {"error": "…"}.',
        },
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {}), "securitySchemes": SECURITY_SCHEMES},
    }


def _path_item(path: str, method: str, op: Operation, refs: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "operationId": _operation_id(path, method),
        "summary": op.summary,
        "security": SECURITY if op.authenticated else [],
        "parameters": [
            *_path_parameters(path),
            *(q.parameter() for q in op.query),
            *(h.parameter() for h in op.headers),
            REQUEST_ID.parameter(),
        ],
        "responses": {},
    }
    if op.body is not None:
        item["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    for status, model in op.responses.items():
        item["responses"][str(status)] = _response(
            op.notes.get(status, (model.__doc__ if model else None) or "OK"),
            refs[(model, "serialization")] if model else {"type": "string"},
            _LOCATION if status in op.located else {},
            op.media_type,
        )
    errors = (*(AUTHENTICATED_ERRORS if op.authenticated else ()), *op.errors)
    error_ref = refs[(schemas.ErrorBody, "serialization")]
    for status in sorted(set(errors)):
        item["responses"][str(status)] = _response(
            op.notes.get(status, ERRORS[status]), error_ref, _RESPONSE_HEADERS.get(status, {})
        )
    return item


def _response(
    description: str, schema: Any, headers: Mapping[str, Any], media_type: str = falcon.MEDIA_JSON
) -> dict[str, Any]:
    return {
        "description": " ".join(description.split()),
        "content": {media_type: {"schema": schema}},
        "headers": {**_REQUEST_ID_HEADER, **headers},
    }


def _path_parameters(path: str) -> list[dict[str, Any]]:
    # app.edge.check_path_params: every path parameter is an ID.
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": f"The {name.removesuffix('_id')}'s ID.",
            "schema": {"type": "string", "pattern": f"^{ID_PATTERN}$"},
        }
        for name in re.findall(r"{(\w+)}", path)
    ]


def _operation_id(path: str, method: str) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", re.sub(r"{\w+}", "", path)) if w and w != "v1"]
    return "_".join([method.lower(), *words]) or method.lower()


class OpenAPIResource:
    """GET /v1/openapi.json: the document, built once from the finished app."""

    auth_required = False

    def __init__(self, app: WebApp) -> None:
        self.app = app
        self._document: dict[str, Any] | None = None

    @operation("This document (OpenAPI 3.1).", responses={200: schemas.OpenAPIDocument}, authenticated=False)
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._document is None:
            self._document = document(self.app)
        resp.media = self._document
