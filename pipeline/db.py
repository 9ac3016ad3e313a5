"""The control database: one Peewee proxy, initialised at the edge from Settings."""

from __future__ import annotations

import re
from typing import Any

import dramatiq
import peewee
import psycopg2
import psycopg2.extensions
from playhouse.postgres_ext import PostgresqlExtDatabase

from stages.connections.pgurl import conninfo_passwords, redact
from stages.errors import TransientError

database = peewee.DatabaseProxy()

CONTROL_DB_TCP_TIMEOUT_MS = 10_000
# Errors of the control database's connection (down, restarted, unreachable).
CONNECTION_ERRORS = (peewee.OperationalError, peewee.InterfaceError)

# What CAPY_DATABASE_URL leaves out is taken from here, as it always was (not from
# libpq's own defaults: the unix socket and the OS user); a URL naming a `service`
# takes host, port and user from the service file instead.
DEFAULT_DBNAME = "capy_imports"
DEFAULT_PARAMS = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
_QUOTED = re.compile(r'"([^"]*)"')


class ControlDatabaseUnavailable(TransientError):
    """The service's control database was unavailable; the work will be tried again."""


def connect_params(url: str) -> tuple[str, dict[str, str]]:
    """The database name and the other libpq parameters of CAPY_DATABASE_URL.

    Parsed by libpq itself (psycopg2's `parse_dsn`), so every parameter it knows is kept
    — `sslmode`, `sslrootcert`, `connect_timeout`, `options`, host lists, unix-socket
    hosts, URL-encoded values — and a key=value connection string works as well as a
    postgresql:// URL. ValueError (password redacted) if libpq cannot parse it.
    """
    try:
        params: dict[str, str] = psycopg2.extensions.parse_dsn(url)
    except psycopg2.ProgrammingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "libpq cannot parse it"
        passwords = conninfo_passwords(url)
        raise ValueError(_unquoted_secrets(redact(reason, url, *passwords), passwords)) from None
    name = params.pop("dbname", None) or DEFAULT_DBNAME
    if "service" not in params:
        for key, value in DEFAULT_PARAMS.items():
            params.setdefault(key, value)
    return name, params


def _unquoted_secrets(reason: str, passwords: list[str]) -> str:
    """libpq's reason with every "token" it quotes that is, holds or is part of a
    password masked: it quotes the piece it could not read (`invalid percent-encoded
    token: "<the password>"`, `invalid port number: "<its first part>"`)."""

    def mask(match: re.Match[str]) -> str:
        token = match.group(1)
        secret = any(token and (token in p or p in token) for p in passwords)
        return '"***"' if secret else match.group(0)

    return _QUOTED.sub(mask, reason)


def init_database(url: str) -> PostgresqlExtDatabase:
    """Point the proxy at the control database (no connection is opened here).

    The URL's own parameters win over the defaults below (e.g. `?connect_timeout=2`).
    """
    name, params = connect_params(url)
    options: dict[str, Any] = {
        "connect_timeout": 5,
        "application_name": "capy-imports",
        # A control database that stops answering mid-query (a network that drops
        # packets, a host gone in a failover) ends the query with an error, answered 503,
        # instead of holding the request until gunicorn's timeout: unacknowledged data
        # fails after tcp_user_timeout, a silent idle peer after the keepalives.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": CONTROL_DB_TCP_TIMEOUT_MS,
    }
    db = PostgresqlExtDatabase(name, **{**options, **params})
    database.initialize(db)
    return db


class CloseDatabase(dramatiq.Middleware):
    """Return each worker thread's control-database connection after every message,
    so a restarted Postgres never leaves a thread holding a dead connection."""

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if not database.is_closed():
            database.close()

    after_skip_message = after_process_message
