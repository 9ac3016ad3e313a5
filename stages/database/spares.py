"""Spare databases: empty databases made ahead on a project cluster, so that a schema
rehearsal or an import's preview is ready at once instead of after CREATE DATABASE.

CREATE DATABASE copies template0 through the WAL and waits for the disk whatever
`synchronous_commit` says: a fifth of a second on an idle disk, more on a busy one;
a small import makes two (the rehearsal's and the preview). A spare is taken in one
transaction of four catalog updates (about a millisecond): renamed to the database
wanted, given to its owner, PUBLIC's access revoked, opened to connections. Either all
of it is done or the spare stays a spare.

A spare is made exactly as ClusterAdmin.create_database makes a database (template0,
UTF-8, the cluster's locale), owned by the admin, refusing connections (nobody, not
even a superuser, can enter it: nothing can be created in it, and RENAME is never
refused for a session inside), PUBLIC's access revoked, named `capy_spare_<random>`.
Two takers of one spare: the second waits for the first's lock, finds it gone, and
takes another, or creates the database as before. `keep` makes or drops spares until
a cluster holds the number configured (CAPY_SPARE_DATABASES); one process at a time
per cluster (an advisory lock), so workers refilling side by side never overshoot.
"""

from __future__ import annotations

import logging
import secrets

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

log = logging.getLogger(__name__)

SPARE_PREFIX = "capy_spare_"
# pg_try_advisory_lock's key while a process makes or drops spares on a cluster.
KEEP_LOCK = 0x6361_7079_7370_6172 & 0x7FFF_FFFF_FFFF_FFFF
# Takers racing for spares try this many before creating the database themselves.
TAKE_TRIES = 3


def create_statement(name: str, owner: str | None) -> sql.Composed:
    """The CREATE DATABASE of every database the service makes (and of its spares)."""
    statement = sql.SQL(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' ALLOW_CONNECTIONS false"
    ).format(sql.Identifier(name))
    if owner:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    return statement


def take(cur: psycopg2.extensions.cursor, name: str, owner: str | None) -> bool:
    """Make a spare the empty database `name`, owned by `owner` (the admin when None),
    refusing every role but its owner and open to connections; False when there is no
    spare to take (the caller creates the database). `cur` is an admin session in
    autocommit mode."""
    for _ in range(TAKE_TRIES):
        spare = _any_spare(cur)
        if spare is None:
            return False
        try:
            cur.execute("BEGIN")
            cur.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(spare), sql.Identifier(name))
            )
            if owner:
                cur.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(name), sql.Identifier(owner)
                    )
                )
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            cur.execute("COMMIT")
        except (
            psycopg2.errors.InvalidCatalogName,
            psycopg2.errors.ObjectInUse,
            psycopg2.errors.LockNotAvailable,
        ):
            # Another process took (or dropped) it between the look and the rename, or
            # holds it (a rename waiting on it, an autovacuum worker guarding against
            # wraparound, which even a database refusing connections admits).
            cur.execute("ROLLBACK")
            continue
        except BaseException:
            if not cur.connection.closed:
                cur.execute("ROLLBACK")
            raise
        log.debug("database %s is spare %s", name, spare)
        return True
    return False


def keep(cur: psycopg2.extensions.cursor, count: int) -> tuple[list[str], list[str]]:
    """Make or drop spares until the cluster holds `count`; returns (made, dropped).
    Does nothing while another process keeps this cluster's spares."""
    cur.execute("SELECT pg_catalog.pg_try_advisory_lock(%s)", (KEEP_LOCK,))
    row = cur.fetchone()
    if not (row and row[0]):
        return [], []
    made: list[str] = []
    dropped: list[str] = []
    try:
        spares = _spares(cur)
        for spare in spares[count:]:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(spare)))
            dropped.append(spare)
        for _ in range(count - len(spares)):
            spare = SPARE_PREFIX + secrets.token_hex(8)
            cur.execute(create_statement(spare, None))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(spare)))
            made.append(spare)
    finally:
        if not cur.connection.closed:
            cur.execute("SELECT pg_catalog.pg_advisory_unlock(%s)", (KEEP_LOCK,))
    return made, dropped


def _spares(cur: psycopg2.extensions.cursor) -> list[str]:
    """The cluster's spares, oldest first: refusing connections and owned by the admin
    (a database of that name that is neither is not ours to hand out)."""
    cur.execute(
        "SELECT datname FROM pg_catalog.pg_database WHERE pg_catalog.left(datname::text, %s) "
        "OPERATOR(pg_catalog.=) %s AND NOT datallowconn AND NOT datistemplate "
        "AND datdba OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_roles "
        "WHERE rolname OPERATOR(pg_catalog.=) current_user) ORDER BY oid",
        (len(SPARE_PREFIX), SPARE_PREFIX),
    )
    return [name for (name,) in cur.fetchall()]


def _any_spare(cur: psycopg2.extensions.cursor) -> str | None:
    spares = _spares(cur)
    # Not always the oldest: takers side by side would all queue on the same one.
    return secrets.choice(spares) if spares else None
