"""Spare databases: empty databases made ahead on a project cluster, so that a schema
rehearsal or an import's preview is ready at once instead of after CREATE DATABASE.

CREATE DATABASE copies template0 through the WAL and waits for the disk whatever
`synchronous_commit` says: a fifth of a second on an idle disk, more on a busy one;
a small import makes two (the rehearsal's and the preview). A spare is taken in one
transaction of a few catalog updates (about a millisecond): renamed to the database
wanted, given to its owner, opened to connections. Either all of it is done or the
spare stays a spare.

A spare is made as ClusterAdmin.create_database makes a database (template0, UTF-8),
owned by the admin, refusing connections (nobody, not even a superuser, can enter it,
so nothing can be created in it, and RENAME is never refused for a session inside),
with PUBLIC's access revoked: made under another name (`capy_newspare_…`) and renamed
`capy_spare_<random>` once all of that is done. A database is taken as a spare only
while it is still exactly that (`_USABLE`): named so, owned by the admin, refusing
connections, never entered by a session (as far as the server's statistics know: a
reset or a crash forgets), valid, not a template, no connection limit, template0's
encoding, locale (provider included) and tablespace, no grant, setting, comment or
label of its own. Anything else of that name is never handed out: `keep`
drops it when it refuses connections and the admin owns it (a keeper or a drop that
was interrupted), and leaves it alone otherwise. Like template0 itself, a spare is
trusted to hold what the admin made: only the admin (or another superuser) can
change one.

Two takers of one spare: the second waits (briefly: TAKE_LOCK_TIMEOUT) for the
first's rename, finds the spare gone, and takes another, or creates the database as
before. `keep` makes or drops spares until a cluster holds the number configured
(CAPY_SPARE_DATABASES); one process at a time per cluster (an advisory lock), so
workers refilling side by side never overshoot.
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
# What a spare is called while it is made, until it is locked down.
MAKING_PREFIX = "capy_newspare_"
# pg_try_advisory_lock's key while a process makes or drops spares on a cluster.
KEEP_LOCK = 0x6361_7079_7370_6172 & 0x7FFF_FFFF_FFFF_FFFF
# Takers racing for spares try this many before creating the database themselves.
TAKE_TRIES = 3
# How long a taker waits for a spare another session holds before passing it over.
TAKE_LOCK_TIMEOUT = "200ms"

# A spare that may be handed out (`d`: the database, `t`: template0).
_USABLE = """NOT d.datallowconn AND NOT d.datistemplate AND d.datconnlimit OPERATOR(pg_catalog.=) -1
    AND d.encoding OPERATOR(pg_catalog.=) pg_catalog.pg_char_to_encoding('UTF8')
    AND d.datcollate OPERATOR(pg_catalog.=) t.datcollate AND d.datctype OPERATOR(pg_catalog.=) t.datctype
    AND d.dattablespace OPERATOR(pg_catalog.=) t.dattablespace
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(ARRAY['datlocprovider', 'daticulocale', 'datlocale', 'daticurules']) k
        WHERE pg_catalog.to_jsonb(d) OPERATOR(pg_catalog.->) k IS DISTINCT FROM pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->) k)
    AND (SELECT pg_catalog.count(*) FROM pg_catalog.aclexplode(d.datacl) a) OPERATOR(pg_catalog.=) 3
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.aclexplode(d.datacl) a WHERE a.is_grantable
        OR a.grantee OPERATOR(pg_catalog.<>) d.datdba OR a.grantor OPERATOR(pg_catalog.<>) d.datdba)
    AND COALESCE(pg_catalog.pg_stat_get_db_sessions(d.oid), 0) OPERATOR(pg_catalog.=) 0
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s WHERE s.setdatabase OPERATOR(pg_catalog.=) d.oid)
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shdescription c
        WHERE c.objoid OPERATOR(pg_catalog.=) d.oid AND c.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_database'::pg_catalog.regclass)
    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_shseclabel l
        WHERE l.objoid OPERATOR(pg_catalog.=) d.oid AND l.classoid OPERATOR(pg_catalog.=) 'pg_catalog.pg_database'::pg_catalog.regclass)"""
# The admin's databases named `prefix` (%s twice: its length, then itself), each with
# whether it is usable as a spare and whether it refuses connections; oldest first.
_OURS = f"""SELECT d.datname, {_USABLE}, NOT d.datallowconn
    FROM pg_catalog.pg_database d, pg_catalog.pg_database t
    WHERE t.datname OPERATOR(pg_catalog.=) 'template0'
    AND pg_catalog.left(d.datname::text, %s) OPERATOR(pg_catalog.=) %s
    AND d.datdba OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r
        WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
    ORDER BY d.oid"""
# Whether the database named %s is (still) a usable spare.
_STILL_USABLE = f"""SELECT {_USABLE} FROM pg_catalog.pg_database d, pg_catalog.pg_database t
    WHERE t.datname OPERATOR(pg_catalog.=) 'template0' AND d.datname OPERATOR(pg_catalog.=) %s"""
# A taker that meets one of these passes the spare over: another process took or
# dropped it, holds it, or changed its catalog row at the same moment.
_BUSY = (
    psycopg2.errors.InvalidCatalogName,
    psycopg2.errors.ObjectInUse,
    psycopg2.errors.LockNotAvailable,
)


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
            cur.execute("SELECT pg_catalog.set_config('lock_timeout', %s, true)", (TAKE_LOCK_TIMEOUT,))
            cur.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(spare), sql.Identifier(name))
            )
            # Renamed, it is locked: what it is now is what is handed out.
            cur.execute(_STILL_USABLE, (name,))
            row = cur.fetchone()
            if not (row and row[0]):
                cur.execute("ROLLBACK")
                continue
            if owner:
                cur.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(name), sql.Identifier(owner)
                    )
                )
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            cur.execute("COMMIT")
        except psycopg2.Error as err:
            if not cur.connection.closed:
                cur.execute("ROLLBACK")
            if isinstance(err, _BUSY) or _concurrently_updated(err):
                continue
            raise
        except BaseException:
            if not cur.connection.closed:
                cur.execute("ROLLBACK")
            raise
        log.debug("database %s is spare %s", name, spare)
        return True
    return False


def keep(cur: psycopg2.extensions.cursor, count: int) -> tuple[list[str], list[str]]:
    """Make or drop spares until the cluster holds `count`; returns (made, dropped),
    the dropped including what is left of a keeper or a drop that was interrupted.
    Does nothing while another process keeps this cluster's spares."""
    cur.execute("SELECT pg_catalog.pg_try_advisory_lock(%s)", (KEEP_LOCK,))
    row = cur.fetchone()
    if not (row and row[0]):
        return [], []
    made: list[str] = []
    dropped: list[str] = []
    try:
        usable, broken = _ours(cur, SPARE_PREFIX)
        _half_made, stale = _ours(cur, MAKING_PREFIX)  # no keeper is making one now: we hold the lock
        for spare in [*broken, *stale, *usable[count:]]:
            try:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(spare)))
            except psycopg2.Error as err:
                if cur.connection.closed:
                    raise
                # A session or a prepared transaction in it, a template: never handed
                # out, and no reason to make no spare; the next keeper tries again.
                log.warning("could not drop %s, which is not a usable spare: %s", spare, str(err).strip())
                continue
            dropped.append(spare)
        for _ in range(count - len(usable)):
            token = secrets.token_hex(8)
            making, spare = MAKING_PREFIX + token, SPARE_PREFIX + token
            cur.execute(create_statement(making, None))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(making)))
            cur.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(making), sql.Identifier(spare)
                )
            )
            made.append(spare)
    finally:
        if not cur.connection.closed:
            cur.execute("SELECT pg_catalog.pg_advisory_unlock(%s)", (KEEP_LOCK,))
    return made, dropped


def _ours(cur: psycopg2.extensions.cursor, prefix: str) -> tuple[list[str], list[str]]:
    """The admin's databases named `prefix`: (usable as spares, oldest first; those
    that are not but refuse connections, to drop). One that admits connections is
    left alone: someone may be in it."""
    cur.execute(_OURS, (len(prefix), prefix))
    rows = cur.fetchall()
    usable = [name for name, ok, _closed in rows if ok and prefix == SPARE_PREFIX]
    broken = [name for name, ok, closed in rows if closed and name not in usable]
    return usable, broken


def _any_spare(cur: psycopg2.extensions.cursor) -> str | None:
    usable, _broken = _ours(cur, SPARE_PREFIX)
    # Not always the oldest: takers side by side would all queue on the same one.
    return secrets.choice(usable) if usable else None


def _concurrently_updated(err: psycopg2.Error) -> bool:
    """The server's "tuple concurrently updated": another session changed the spare's
    catalog row (a GRANT, a keeper's REVOKE) while this one renamed it."""
    return err.pgcode == "XX000" and "concurrently updated" in str(err)
