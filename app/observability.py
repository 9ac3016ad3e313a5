"""Request IDs, HTTP metrics and the access log (a middleware), and `GET /metrics`.

Every request gets an ID: the client's `X-Request-ID` when it is a sane one, else a
new one; it is bound to every line logged while the request is handled and returned
in the response's `X-Request-ID`. Requests are counted by route template (never the
raw path: no IDs in labels) and status.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import falcon
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from app.edge import REQUEST_ID
from app.openapi import operation
from pipeline import logs, metrics, scrape
from pipeline.errors import Unauthorized

log = logging.getLogger("app.access")

REQUEST_ID_HEADER = REQUEST_ID.name
# What a client may send as its request ID: a UUID, a trace ID, a short token.
_REQUEST_ID = re.compile(REQUEST_ID.pattern, re.ASCII)
UNMATCHED = "unmatched"


def request_id(sent: str | None, new: Callable[[], str] = lambda: uuid.uuid4().hex) -> str:
    """The client's request ID if it is 1-128 letters, digits, '.', '_', ':' or '-'
    (anything else could forge log lines), else a new one."""
    if sent and _REQUEST_ID.fullmatch(sent):
        return sent
    return new()


class RequestObservation:
    """Falcon middleware, first of all: request ID, access log line, HTTP metrics."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = request_id(req.get_header(REQUEST_ID_HEADER))
        req.context.request_started = self.clock()
        req.context.log_token = logs.push(request_id=req.context.request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        rid = getattr(req.context, "request_id", None)
        if rid is None:  # process_request did not run (cannot happen with this first)
            return
        resp.set_header(REQUEST_ID_HEADER, rid)
        seconds = self.clock() - req.context.request_started
        route = req.uri_template or UNMATCHED
        status = resp.status_code
        metrics.http_request(req.method, route, status, seconds)
        log.info(
            "%s %s %d %.1f ms",
            req.method,
            req.path,
            status,
            seconds * 1000,
            extra={
                "method": req.method,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
            },
        )
        logs.pop(req.context.log_token)


class MetricsResource:
    """`GET /metrics`, Prometheus's text format. It holds no tenant data, but a hosted
    service keeps it private: with `token` set, only `Authorization: Bearer <token>`
    reads it; without one it is open in development and refused in production."""

    auth_required = False  # not an API key: the metrics token, checked here

    def __init__(
        self,
        gauges: Sequence[Collector],
        *,
        token: str = "",
        open_without_token: bool = False,
        process_dir: Callable[[], str | None] = scrape.multiprocess_dir,
    ) -> None:
        self.gauges = list(gauges)
        self.token = token
        self.open_without_token = open_without_token
        self.process_dir = process_dir

    def _authorize(self, req: falcon.Request) -> None:
        if not self.token:
            if self.open_without_token:
                return
            raise Unauthorized(
                "metrics are private in production: the operator sets CAPY_METRICS_TOKEN and "
                "the scraper sends Authorization: Bearer <that token>"
            )
        scheme, _, sent = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), self.token.encode()):
            raise Unauthorized("send Authorization: Bearer <CAPY_METRICS_TOKEN> to read the metrics")

    @operation(
        "Prometheus metrics of the API and the workers, in Prometheus' text format.",
        responses={200: None},
        errors=(401,),
        media_type=CONTENT_TYPE_PLAIN_0_0_4,
        authenticated=False,
        notes={
            401: "CAPY_METRICS_TOKEN is set and was not sent as a bearer token, or production mode has none set."
        },
    )
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._authorize(req)
        resp.content_type = CONTENT_TYPE_PLAIN_0_0_4
        resp.data = scrape.render(self.gauges, process_dir=self.process_dir())
