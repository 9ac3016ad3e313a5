"""What a live source holds, read from its catalog in read-only transactions.

`read_only_session` is how preflight connects: the session starts with
``default_transaction_read_only=on`` and every transaction is ``BEGIN READ ONLY``
besides, so the source sees nothing it could write with even when a pooler drops
the startup options. `read_source` changes nothing; each optional catalog read runs
in its own transaction so a table the user may not read costs only that answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg2
import psycopg2.extensions

from stages.connections.connect import PoolerRefusedStartupParameter, connect
from stages.connections.deadline import Deadline
from stages.connections.pgurl import SourceURL
from stages.connections.rows import one_row
from stages.errors import PermanentError
from stages.preflight.extensions import Extension
from stages.preflight.report import Findings

# Bounded so that a huge or locked catalog cannot hold preflight (and its caller) long.
SESSION_OPTIONS = "-c default_transaction_read_only=on -c statement_timeout=60000 -c lock_timeout=10000"
LARGEST_TABLES = 5

# Schemas of the system and of a session's temporary objects; never the user's.
_USER_SCHEMA = """
    n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_toast%'
    AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""
_NOT_IN_EXTENSION = """
    NOT EXISTS (
        SELECT 1 FROM pg_depend d
        WHERE d.classid = '{catalog}'::regclass AND d.objid = {oid} AND d.deptype = 'e'
    )
"""
_SCHEMAS = f"""
SELECT n.nspname FROM pg_namespace n
WHERE {_USER_SCHEMA} AND {_NOT_IN_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
ORDER BY 1
"""
# Tables as a dump's table of contents lists them: ordinary and partitioned tables,
# not members of an extension.
_TABLE_COUNT = f"""
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMA}
  AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
"""
_LARGEST_TABLES = f"""
SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND {_USER_SCHEMA}
  AND {_NOT_IN_EXTENSION.format(catalog="pg_class", oid="c.oid")}
ORDER BY 2 DESC, 1
LIMIT {LARGEST_TABLES}
"""
_OPTIONAL = {
    "large_objects": "SELECT count(*) FROM pg_largeobject_metadata",
    "event_triggers": "SELECT evtname FROM pg_event_trigger ORDER BY 1",
    "untrusted_languages": "SELECT lanname FROM pg_language WHERE lanispl AND NOT lanpltrusted ORDER BY 1",
    "foreign_servers": "SELECT srvname FROM pg_foreign_server ORDER BY 1",
    "publications": "SELECT pubname FROM pg_publication ORDER BY 1",
    # pg_subscription is cluster-wide; only this database's subscriptions are dumped.
    # subconninfo is not readable by everyone, subname and subdbid are.
    "subscriptions": """
        SELECT subname FROM pg_subscription
        WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
        ORDER BY 1
    """,
}


class SourceCatalogUnreadable(PermanentError):
    """Connected to the source, but could not read what preflight needs from its catalog."""


@dataclass
class SourceFacts:
    """What preflight learned about a live source. `session` is ``direct``,
    ``proxied`` (the backend pid announced at login is not the session's: a pooler or
    proxy answers) or ``transaction-pooled`` (two transactions ran in different server
    sessions). Optional facts are None when the catalog would not say, and `errors`
    says why, keyed by fact."""

    server_version: str
    server_version_num: int
    database_size_bytes: int
    extensions: list[Extension]
    schemas: list[str]
    table_count: int
    largest_tables: list[tuple[str, int]] | None
    findings: Findings
    session: str = "direct"
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return self.server_version_num // 10000

    @property
    def version_label(self) -> str:
        """ "15.4" from "15.4 (Debian 15.4-1.pgdg120+1)"."""
        return self.server_version.split(" ", 1)[0]

    def as_source(self) -> dict[str, Any]:
        findings = self.findings
        return {
            "database_size_bytes": self.database_size_bytes,
            "server_version": self.server_version,
            "extensions": [{"name": ext.name, "version": ext.version} for ext in self.extensions],
            "schemas": self.schemas,
            "table_count": self.table_count,
            "largest_tables": (
                None
                if self.largest_tables is None
                else [{"name": name, "bytes": size} for name, size in self.largest_tables]
            ),
            "large_objects": findings.large_objects,
            "event_triggers": findings.event_triggers,
            "untrusted_languages": findings.untrusted_languages,
            "foreign_servers": findings.foreign_servers,
            "publications": findings.publications,
            "subscriptions": findings.subscriptions,
        }


@contextlib.contextmanager
def read_only_session(
    source: SourceURL, *, timeout: int, deadline: Deadline | None = None
) -> Iterator[tuple[psycopg2.extensions.connection, bool]]:
    """A connection whose every transaction is read-only, and whether the server
    refused our startup options (as PgBouncer does): then only `BEGIN READ ONLY`
    guards the session, which is still enough to write nothing. With a `deadline`,
    connecting and every round trip fit in it (`SourceTimedOut` otherwise)."""
    # Ours come last so they win over the URL's own; a URL asking for a read-write
    # session would make libpq refuse our read-only one, so that wish is dropped.
    params = {k: v for k, v in source.params.items() if k not in ("options", "target_session_attrs")}
    options = " ".join(filter(None, (source.params.get("options"), SESSION_OPTIONS)))
    plain = replace(source, params=params)
    refused = False
    try:
        conn = connect(plain.with_params(options=options), timeout=timeout, deadline=deadline)
    except PoolerRefusedStartupParameter:
        refused = True
        conn = connect(plain, timeout=timeout, deadline=deadline)
    try:
        conn.set_session(readonly=True)
        yield conn, refused
    finally:
        conn.close()


def read_source(conn: psycopg2.extensions.connection) -> SourceFacts:
    """Read the source's facts; raise `SourceCatalogUnreadable` if the essential ones
    (version, size, extensions, schemas, tables) cannot be read."""
    announced_pid = conn.get_backend_pid()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
                "pg_database_size(current_database()), pg_backend_pid()"
            )
            version, version_num, size, first_pid = one_row(cur)
            cur.execute("SELECT extname, extversion FROM pg_extension ORDER BY extname")
            extensions = [Extension(name, ver) for name, ver in cur.fetchall()]
            cur.execute(_SCHEMAS)
            schemas = [row[0] for row in cur.fetchall()]
            cur.execute(_TABLE_COUNT)
            table_count = int(one_row(cur)[0])
        conn.rollback()
    except psycopg2.Error as err:
        _end(conn)
        raise SourceCatalogUnreadable(_first_line(err)) from err
    errors: dict[str, str] = {}
    # Right after the first transaction: a transaction pooler may hand the next one to
    # another server session. A pooler or proxy also announces a backend pid of its own
    # at login (BackendKeyData), not the pid of the session that answers.
    next_pid = _optional(conn, "SELECT pg_backend_pid()", errors, "backend_pid")
    session = "direct"
    if next_pid and next_pid[0][0] != first_pid:
        session = "transaction-pooled"
    elif first_pid != announced_pid:
        session = "proxied"
    largest = _optional(conn, _LARGEST_TABLES, errors, "largest_tables")
    found = {name: _optional(conn, query, errors, name) for name, query in _OPTIONAL.items()}
    return SourceFacts(
        server_version=version,
        server_version_num=int(version_num),
        database_size_bytes=int(size),
        extensions=extensions,
        schemas=schemas,
        table_count=table_count,
        largest_tables=None if largest is None else [(name, int(n)) for name, n in largest],
        findings=Findings(
            event_triggers=_names(found["event_triggers"]),
            untrusted_languages=_names(found["untrusted_languages"]),
            large_objects=None if found["large_objects"] is None else int(found["large_objects"][0][0]),
            foreign_servers=_names(found["foreign_servers"]),
            publications=_names(found["publications"]),
            subscriptions=_names(found["subscriptions"]),
            errors=errors,
        ),
        session=session,
        errors=errors,
    )


def _optional(
    conn: psycopg2.extensions.connection, query: str, errors: dict[str, str], name: str
) -> list[tuple[Any, ...]] | None:
    """Rows of `query` in a transaction of its own, or None (and the error noted)."""
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            rows = cur.fetchall()
        conn.rollback()
        return rows
    except psycopg2.Error as err:
        _end(conn)
        errors[name] = _first_line(err)
        return None


def _end(conn: psycopg2.extensions.connection) -> None:
    if not conn.closed:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()


def _names(rows: list[tuple[Any, ...]] | None) -> list[str] | None:
    return None if rows is None else [str(row[0]) for row in rows]


def _first_line(err: psycopg2.Error) -> str:
    """The server's message without its "ERROR:" prefix, or libpq's first line."""
    diag = getattr(err, "diag", None)
    if diag is not None and diag.message_primary:
        return str(diag.message_primary)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
