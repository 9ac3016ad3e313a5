"""Opening psycopg2 connections, with libpq errors translated to ours.

The translated message says what a person should check; it never contains the
password or the full URL, only the redacted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions

from stages.errors import PermanentError, SourceUnreachable, TransientError
from stages.pgurl import SourceURL, redact


class SourceAuthenticationFailed(PermanentError):
    """The source refused the user name or password."""


class SourceDatabaseMissing(PermanentError):
    """The source database does not exist."""


def explain_connect_error(err: psycopg2.OperationalError, source: SourceURL, role: str) -> Exception:
    """Turn a libpq connection error into an exception whose message says what to fix."""
    text = redact(str(err), source.password).strip()
    lower = text.lower()
    where = f"{source.host}:{source.port}"
    if "password authentication failed" in lower or "no password supplied" in lower:
        return SourceAuthenticationFailed(
            f"the {role} at {where} refused the login for user {source.user!r}: "
            "password authentication failed; check the user name and password"
        )
    if "no pg_hba.conf entry" in lower:
        return SourceAuthenticationFailed(
            f"the {role} at {where} does not accept connections from this service "
            f"for user {source.user!r} (pg_hba.conf); allow our address or use SSL"
        )
    if "does not exist" in lower and "database" in lower:
        return SourceDatabaseMissing(
            f"the {role} at {where} has no database {source.dbname!r}; check the database name"
        )
    if "does not exist" in lower and "role" in lower:
        return SourceAuthenticationFailed(
            f"the {role} at {where} has no user {source.user!r}; check the user name"
        )
    if "server does not support ssl" in lower:
        return PermanentError(
            f"the {role} at {where} does not accept SSL connections; add ?sslmode=disable "
            "to the URL only if the network between us is trusted"
        )
    if "connection refused" in lower:
        return PermanentError(
            f"nothing accepts connections at {where} (connection refused); "
            "check the host and port and that the database is running"
        )
    if "timeout expired" in lower or "timed out" in lower:
        return SourceUnreachable(
            f"the {role} at {where} did not answer within the connect timeout; "
            "check the host, port and firewall"
        )
    if "too many connections" in lower or "starting up" in lower or "shutting down" in lower:
        return TransientError(f"the {role} at {where} is busy: {text}")
    return SourceUnreachable(f"could not connect to the {role} at {where}: {text}")


def connect(
    source: SourceURL, *, role: str = "source database", timeout: int = 10, **options: Any
) -> psycopg2.extensions.connection:
    """Connect with a bounded timeout; raise a translated CapyError on failure."""
    try:
        return psycopg2.connect(
            **source.connect_kwargs(connect_timeout=timeout, application_name="capy-imports"),
            **options,
        )
    except psycopg2.OperationalError as err:
        raise explain_connect_error(err, source, role) from err


@contextlib.contextmanager
def connection(source: SourceURL, **kwargs: Any) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(source, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def server_major(conn: psycopg2.extensions.connection) -> int:
    return int(conn.server_version) // 10000
