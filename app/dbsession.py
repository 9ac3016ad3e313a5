"""A control-database connection per request (Peewee's documented Falcon middleware).

Peewee keeps one connection per thread and never checks it: after a Postgres restart or
failover every gthread worker thread would keep its dead connection, and answer 503
until gunicorn restarts. Here a request opens a connection when it first queries
(Peewee's autoconnect) and the response closes it, so a request that meets a dead
server answers 503 once and the next request connects afresh. Connecting costs a few
milliseconds on a local network; a pooler (PgBouncer) in front of the control database
removes even that.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import peewee

from pipeline.db import database

log = logging.getLogger(__name__)


class DatabaseSession:
    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # A connection left open on this thread (by code outside a request) is not trusted.
        _close()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        _close()


def _close() -> None:
    if database.is_closed():
        return
    try:
        database.close()
    except peewee.PeeweeException:
        # The socket was already gone: Peewee forgets the connection all the same. (Every
        # transaction here is a `database.atomic()` block, which ends with its request.)
        log.info("closing the control-database connection failed; it is discarded", exc_info=True)
