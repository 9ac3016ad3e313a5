"""The control database: one Peewee proxy, initialised at the edge from Settings."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import peewee
from playhouse.postgres_ext import PostgresqlExtDatabase

from stages.errors import TransientError

database = peewee.DatabaseProxy()

CONTROL_DB_TCP_TIMEOUT_MS = 10_000
# Errors of the control database's connection (down, restarted, unreachable).
CONNECTION_ERRORS = (peewee.OperationalError, peewee.InterfaceError)


class ControlDatabaseUnavailable(TransientError):
    """The service's control database was unavailable; the work will be tried again."""


def connect_params(url: str) -> tuple[str, dict[str, Any]]:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql"):
        raise ValueError("CAPY_DATABASE_URL must be a postgres:// URL")
    params = {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": unquote(parsed.username or "postgres"),
    }
    if parsed.password:
        params["password"] = unquote(parsed.password)
    return unquote(parsed.path.lstrip("/")) or "capy_imports", params


def init_database(url: str) -> PostgresqlExtDatabase:
    """Point the proxy at the control database (no connection is opened here)."""
    name, params = connect_params(url)
    db = PostgresqlExtDatabase(
        name,
        connect_timeout=5,
        application_name="capy-imports",
        # A control database that stops answering mid-query (a network that drops
        # packets, a host gone in a failover) ends the query with an error, answered 503,
        # instead of holding the request until gunicorn's timeout: unacknowledged data
        # fails after tcp_user_timeout, a silent idle peer after the keepalives.
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=CONTROL_DB_TCP_TIMEOUT_MS,
        **params,
    )
    database.initialize(db)
    return db
