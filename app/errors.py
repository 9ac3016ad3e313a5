"""Domain errors to HTTP, in one place. Every error body is {"error": "..."}."""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import peewee

from pipeline.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from stages.errors import CapyError, PermanentError, TransientError

log = logging.getLogger(__name__)

_STATUS = [
    (InvalidRequest, falcon.HTTP_400),
    (Unauthorized, falcon.HTTP_401),
    (Forbidden, falcon.HTTP_403),
    (NotFound, falcon.HTTP_404),
    (Conflict, falcon.HTTP_409),
    (RateLimited, falcon.HTTP_429),
    (Unavailable, falcon.HTTP_503),
    (TransientError, falcon.HTTP_503),
    (PermanentError, falcon.HTTP_400),
]


def _send(resp: falcon.Response, status: str, message: str) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps({"error": message})
    resp.media = None


def handle_capy_error(req: falcon.Request, resp: falcon.Response, err: CapyError, params: Any) -> None:
    status = next((code for cls, code in _STATUS if isinstance(err, cls)), falcon.HTTP_500)
    if status == falcon.HTTP_401:
        resp.set_header("WWW-Authenticate", 'Bearer realm="capydb"')
    if isinstance(err, RateLimited):
        resp.set_header("Retry-After", str(max(1, err.retry_after)))
    if status == falcon.HTTP_500:
        log.error("unmapped error %s: %s", type(err).__name__, err.message)
        _send(resp, status, "internal error; the operators have been notified")
        return
    _send(resp, status, err.message)


def handle_database_error(req: falcon.Request, resp: falcon.Response, err: Exception, params: Any) -> None:
    log.error("control database error: %s", err)
    _send(resp, falcon.HTTP_503, "the service's database is unavailable; try again shortly")


def handle_http_error(req: falcon.Request, resp: falcon.Response, err: falcon.HTTPError, params: Any) -> None:
    message = err.description or err.title or "request failed"
    if err.status == falcon.HTTP_404 and not err.description:
        message = f"no such route: {req.method} {req.path}"
    if err.status == falcon.HTTP_405:
        message = f"method {req.method} is not allowed on {req.path}"
    for name, value in (err.headers or {}).items():
        resp.set_header(name, value)
    _send(resp, err.status, message)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, err: Exception, params: Any) -> None:
    log.exception("unexpected error on %s %s", req.method, req.path)
    _send(resp, falcon.HTTP_500, "internal error; the operators have been notified")


def install(app: falcon.App) -> None:
    # Falcon picks the most specific handler by the exception's MRO.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(peewee.OperationalError, handle_database_error)
    app.add_error_handler(peewee.InterfaceError, handle_database_error)
    app.add_error_handler(CapyError, handle_capy_error)
