"""Opening psycopg2 connections, with libpq errors translated to ours.

The translated message says what a person should check; it never contains the
password or the full URL, only the redacted one.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import psycopg2
import psycopg2.extensions

from stages.connections.deadline import Deadline, GuardedConnection, SourceTimedOut
from stages.connections.pgurl import SourceURL, redact
from stages.errors import ClusterUnavailable, PermanentError, SourceUnreachable, TransientError

log = logging.getLogger(__name__)

__all__ = ["SourceTimedOut", "connect", "explain_connect_error", "server_major"]


class SourceAuthenticationFailed(PermanentError):
    """The source refused the user name or password."""


class SourceDatabaseMissing(PermanentError):
    """The source database does not exist."""


class SourceConnectionRefused(SourceUnreachable):
    """Nothing accepts connections at the source's host and port (yet: a server that
    restarts refuses connections for a few seconds); retried, then permanent."""


class PoolerRefusedStartupParameter(PermanentError):
    """A connection pooler in front of the database refused a startup parameter."""


def explain_connect_error(
    err: psycopg2.OperationalError,
    source: SourceURL,
    role: str,
    *,
    timeout: int | None = None,
    ours: bool = False,
) -> Exception:
    """Turn a libpq connection error into an exception whose message says what to fix.

    Whose server it is decides first: one of ours (`ours`: the project's cluster) that
    cannot be connected to is always `ClusterUnavailable` (transient, no address in
    its message; the cause is logged for operators), whatever libpq said. For a user's
    source, each cause a person fixes differently gets its own class and message: a
    refused login, a missing database, nothing listening (refused: transient for a few
    attempts, as a restarting server refuses too), no answer (timed out), a pooler that
    refuses startup parameters.
    """
    text = redact(str(err), source.password).strip()
    if ours:
        log.warning("could not connect to the %s at %s:%s: %s", role, source.host, source.port, text)
        return ClusterUnavailable()
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
        return SourceConnectionRefused(
            f"the {role} at {where} refused the connection (connection refused): nothing accepts "
            "connections there, or the server is restarting; check the host and port and that the "
            "database is running",
            when_repeated=f"the {role} at {where} kept refusing connections (connection refused); "
            "check the host and port and that the database is running",
        )
    if "timeout expired" in lower or "timed out" in lower:
        within = f"the {timeout} s connect timeout" if timeout else "the connect timeout"
        return SourceTimedOut(
            f"the {role} at {where} did not answer within {within}; check the host, port and firewall"
        )
    if "unsupported startup parameter" in lower:
        # PgBouncer's answer to a startup parameter it does not pass on (client.c).
        return PoolerRefusedStartupParameter(
            f"the {role} at {where} is a connection pooler that refused a startup parameter ({text})"
        )
    if "too many connections" in lower or "starting up" in lower or "shutting down" in lower:
        return TransientError(f"the {role} at {where} is busy: {text}")
    return SourceUnreachable(f"could not connect to the {role} at {where}: {text}")


def connect(
    source: SourceURL,
    *,
    role: str = "source database",
    timeout: int = 10,
    deadline: Deadline | None = None,
    ours: bool = False,
    **options: Any,
) -> psycopg2.extensions.connection:
    """Connect with a bounded timeout; raise a translated CapyError on failure (see
    explain_connect_error: `ours` for the service's own servers, e.g. a project cluster).

    A URL's own connect_timeout may shorten ours, never lengthen it. With a
    `deadline`, connecting fits in what is left of it and every later round trip on
    the connection is bounded by it (see stages.connections.deadline).
    """
    url_timeout = source.params.get("connect_timeout", "")
    if url_timeout.isdigit() and int(url_timeout) > 0:
        timeout = min(timeout, int(url_timeout))
    if deadline is not None:
        timeout = deadline.connect_timeout(timeout)
        options = {**options, "connection_factory": GuardedConnection}
    kwargs: dict[str, Any] = source.connect_kwargs(connect_timeout=timeout)
    kwargs.setdefault("application_name", "capy-imports")
    try:
        conn: psycopg2.extensions.connection = psycopg2.connect(**kwargs, **options)
    except psycopg2.OperationalError as err:
        raise explain_connect_error(err, source, role, timeout=timeout, ours=ours) from err
    if deadline is not None:
        # A GuardedConnection: the connection_factory set above.
        cast(GuardedConnection, conn).guard(deadline, where=f"{source.host}:{source.port}")
    return conn


def server_major(conn: psycopg2.extensions.connection) -> int:
    return int(conn.server_version) // 10000


def major_of(version_num: int) -> int:
    """The major version in a server_version_num: 150004 -> 15, 90624 -> 906 (9.6)."""
    return version_num // 10000 if version_num >= 100000 else version_num // 100
