"""Administration of a project cluster: databases are created, swapped and retired here.

All statements use the cluster's admin URL. Database names are always passed through
`psycopg2.sql.Identifier`; nothing user-supplied is interpolated into SQL.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from stages import inventory
from stages.connect import connect, server_major
from stages.errors import PermanentError, TransientError
from stages.pgurl import SourceURL


class ClusterAdmin:
    """Admin operations on one Postgres cluster that hosts project databases."""

    def __init__(self, admin_url: str, *, timeout: int = 10) -> None:
        # The admin URL is ours, not a user's: no sslmode is forced on it.
        self.url = SourceURL.parse(admin_url, default_sslmode=None)
        self.timeout = timeout

    @contextlib.contextmanager
    def connection(self, dbname: str | None = None) -> Iterator[psycopg2.extensions.connection]:
        url = self.url if dbname is None else self.url.with_params(dbname=dbname)
        conn = connect(url, role="project cluster", timeout=self.timeout)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def autocommit(self, dbname: str | None = None) -> Iterator[psycopg2.extensions.cursor]:
        with self.connection(dbname) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur

    def database_url(self, dbname: str) -> SourceURL:
        return self.url.with_params(dbname=dbname)

    def server_major(self) -> int:
        with self.connection() as conn:
            return server_major(conn)

    def database_exists(self, name: str) -> bool:
        with self.autocommit() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        """Create an empty database from template0 (UTF-8, no leftovers of template1),
        owned by `owner` (the project role) when given."""
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
            sql.Identifier(name)
        )
        if owner:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with self.autocommit() as cur:
            cur.execute(statement)

    def ensure_role(self, name: str, password: str) -> None:
        """Create the project's login role, or reset its password: never a superuser,
        no CREATEDB, no CREATEROLE. It owns the project's database and everything in it."""
        with self.autocommit() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )

    def set_owner(self, database: str, owner: str) -> None:
        with self.autocommit() as cur:
            cur.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(database), sql.Identifier(owner)
                )
            )

    def create_extensions(
        self, database: str, owner: str, extensions: dict[str, str], comments: dict[str, str] | None = None
    ) -> None:
        """Create extensions (name -> schema) in `database` as the admin, as managed
        platforms do for their allowlist; a schema that does not exist yet is created
        owned by the project role, so the restore can fill it. The source's comments
        on them are applied as values, never as SQL text from a dump."""
        with self.autocommit(database) as cur:
            self._create_extensions(cur, owner, extensions)
            for name, comment in (comments or {}).items():
                if name in extensions:
                    cur.execute(sql.SQL("COMMENT ON EXTENSION {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))

    @staticmethod
    def _create_extensions(cur: psycopg2.extensions.cursor, owner: str, extensions: dict[str, str]) -> None:
        for name, schema in extensions.items():
            cur.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), sql.Identifier(owner)
                )
            )
            cur.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}").format(
                    sql.Identifier(name), sql.Identifier(schema)
                )
            )

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, disconnecting anyone still in it."""
        with self.autocommit() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def is_empty(self, name: str) -> bool:
        with self.connection(name) as conn:
            return inventory.is_empty(conn)

    def swap(self, *, live: str, preview: str, replaced: str, attempts: int = 5) -> None:
        """Make `preview` the live database, keeping the old live one as `replaced`.

        Connections to the live database are closed first: ALTER DATABASE RENAME
        refuses while anyone is connected. New connections are refused for the short
        window, and both renames commit in one transaction, so the project's database
        name always points to a complete database.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._swap_once(live=live, preview=preview, replaced=replaced)
                return
            except psycopg2.errors.ObjectInUse as err:
                if attempt == attempts:
                    raise TransientError(
                        f"the project's database {live!r} is still in use by other sessions; "
                        "the swap will be retried"
                    ) from err
                time.sleep(0.5 * attempt)

    def _swap_once(self, *, live: str, preview: str, replaced: str) -> None:
        live_id, preview_id, replaced_id = map(sql.Identifier, (live, preview, replaced))
        with self.connection() as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (preview,))
                if cur.fetchone() is None:
                    raise PermanentError(f"the preview database {preview!r} no longer exists")
                cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(live_id))
                try:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (live,),
                    )
                    conn.autocommit = False
                    cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live_id, replaced_id))
                    cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(preview_id, live_id))
                    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(replaced_id))
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    conn.autocommit = True
                    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(live_id))
                    raise

    def terminate_sessions(self, name: str) -> int:
        """End every session in database `name` (a stopped tool's backend may still be
        running its last statement); returns how many there were."""
        with self.autocommit() as cur:
            cur.execute(
                "SELECT pg_catalog.count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                "WHERE datname OPERATOR(pg_catalog.=) %s AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
                (name,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0
