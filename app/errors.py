"""Domain errors to HTTP, in one place. Every error body is {"error": "..."}."""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon
import peewee
import psycopg2

from pipeline.errors import (
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
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
    (IdempotencyKeyReused, falcon.HTTP_422),
    (RateLimited, falcon.HTTP_429),
    (Unavailable, falcon.HTTP_503),
    (TransientError, falcon.HTTP_503),
    (PermanentError, falcon.HTTP_400),
]


def _send(resp: falcon.Response, status: str | int, message: str) -> None:
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


# SQLSTATE classes a client's value can cause: 22 data exception (value too long, bad
# encoding, out of range), 54 program limit exceeded (e.g. an index row too big).
_VALUE_ERROR_CLASSES = ("22", "54")
_VALUE_MESSAGE = (
    "the request holds a value the service cannot store (too long, out of range or with "
    "characters such as NUL); shorten or correct it"
)


def _pgcode(err: Exception) -> str:
    for candidate in (*err.args[:1], err.__cause__, err.__context__):
        if isinstance(candidate, psycopg2.Error) and candidate.pgcode:
            return candidate.pgcode
    return ""


def handle_database_error(req: falcon.Request, resp: falcon.Response, err: Exception, params: Any) -> None:
    if _pgcode(err)[:2] in _VALUE_ERROR_CLASSES:
        log.warning("refused a request value the control database cannot store: %s", type(err).__name__)
        _send(resp, falcon.HTTP_400, _VALUE_MESSAGE)
        return
    log.error("control database error: %s", err)
    _send(resp, falcon.HTTP_503, "the service's database is unavailable; try again shortly")


def handle_value_error(req: falcon.Request, resp: falcon.Response, err: ValueError, params: Any) -> None:
    # psycopg2 refuses NUL in a string literal and lone surrogates with ValueError before
    # the query is sent; anything else is a bug.
    if "NUL (0x00)" in str(err) or (
        isinstance(err, UnicodeEncodeError) and err.reason == "surrogates not allowed"
    ):
        log.warning("refused a request value the control database cannot store: %s", type(err).__name__)
        _send(resp, falcon.HTTP_400, _VALUE_MESSAGE)
        return
    handle_unexpected(req, resp, err, params)


def handle_http_error(req: falcon.Request, resp: falcon.Response, err: falcon.HTTPError, params: Any) -> None:
    message = err.description or err.title or "request failed"
    if err.status == falcon.HTTP_404 and not err.description:
        message = f"no such route: {req.method} {req.path}"
    if err.status == falcon.HTTP_405:
        message = f"method {req.method} is not allowed on {req.path}"
    for name, value in dict(err.headers or {}).items():
        resp.set_header(name, value)
    _send(resp, err.status, message)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, err: Exception, params: Any) -> None:
    log.exception("unexpected error on %s %s", req.method, req.path)
    _send(resp, falcon.HTTP_500, "internal error; the operators have been notified")


def install(app: falcon.App[falcon.Request, falcon.Response]) -> None:
    # Falcon picks the most specific handler by the exception's MRO.
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(peewee.OperationalError, handle_database_error)
    app.add_error_handler(peewee.InterfaceError, handle_database_error)
    app.add_error_handler(peewee.DataError, handle_database_error)
    app.add_error_handler(ValueError, handle_value_error)
    app.add_error_handler(CapyError, handle_capy_error)
