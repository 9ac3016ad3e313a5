"""Administration of a project cluster: databases and roles are created, handed over,
swapped and retired here.

Statements use the cluster's admin URL (today a superuser: see README, "Security: the
privilege model"). Database and role names are always passed through
`psycopg2.sql.Identifier`; nothing user-supplied is interpolated into SQL.

Every session opened here, as the admin or as a tenant's role, pins `search_path` to
`pg_catalog, pg_temp` with a startup option. A tenant owns objects in `public` of its
databases and can `ALTER DATABASE … SET search_path`; a startup option overrides that
setting, so no name in our queries resolves to an operator or function a dump defined
(the CVE-2018-1058 class of attack). Admin sessions enter a tenant-writable database
only to create allowlisted extensions in a fresh, empty preview (granting the restore
role their configuration tables, and counting those tables' rows) and to hand a
verified preview over (REASSIGN / DROP OWNED, and the same grants to the project role):
statements that run no user code. Everything else inside a tenant database runs as the
tenant's own unprivileged roles.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from stages.background import Background
from stages.connections.connect import connect, major_of, server_major
from stages.connections.pgurl import SourceURL
from stages.connections.rows import one_row
from stages.database import inventory, spares
from stages.errors import CapyError, ClusterUnavailable, PermanentError, TransientError

log = logging.getLogger(__name__)

# Startup options, not SETs: they override ALTER DATABASE / ALTER ROLE … SET. With
# pg_temp last no temporary object can shadow a name either. `role=none` undoes an
# `ALTER DATABASE … SET role = x` by the database's owner, which would otherwise make a
# superuser's session in that database run as role x.
PINNED_SEARCH_PATH = "-c search_path=pg_catalog,pg_temp"
PINNED_ROLE = "-c role=none"
# The rest of what a database's owner may set for every session in it, pinned to what
# our sessions need: no library of the owner's choosing loaded, writable transactions,
# no session ended on its first error. A lock a tenant's open transaction holds (on a
# table of its preview, or on its database's catalog row) makes our statement fail
# after LOCK_TIMEOUT_MS instead of holding a worker thread: the stage is retried.
LOCK_TIMEOUT_MS = 10_000
# Relations locked by one transaction of the hand-over (see ClusterAdmin._reassign_in_batches).
REASSIGN_LOCKS = 40
# A hand-over of this many batches or more runs them in two sessions of the database:
# ALTER … OWNER is the server's CPU, and 2,000 tables took 0.44 s in one session, 0.23 s
# in two, here. The batches running at once lock REASSIGN_SESSIONS × REASSIGN_LOCKS
# relations at most, or one batch alone that locks more (a table with many indexes),
# as in one session.
REASSIGN_SESSIONS, REASSIGN_SHARED_FROM = 2, 8
# The oldest major version `clusters add` accepts: DROP DATABASE … WITH (FORCE) is 13's.
MIN_CLUSTER_MAJOR = 13
# And no JIT: our statements are catalog reads, DDL, COPY and counts, and a new database's
# catalog has no statistics yet. On a preview of 2,000 tables a catalog query planned
# from them was estimated at 1.5 million and JIT-compiled for 100 ms (330 ms under load)
# to return no rows in 1 ms; every such query of the import paid it.
PINNED_SESSION = (
    "-c local_preload_libraries= -c default_transaction_read_only=off -c exit_on_error=off "
    f"-c idle_in_transaction_session_timeout=0 -c lock_timeout={LOCK_TIMEOUT_MS} -c jit=off"
)
# Statements of admin sessions (DDL, a drop of a large database) and of verification
# (exact counts of large tables) may take long on an honest server; the emptiness check
# reads only the catalog.
NO_STATEMENT_TIMEOUT = "-c statement_timeout=0"
CATALOG_STATEMENT_TIMEOUT = "-c statement_timeout=60000"


@dataclass(frozen=True)
class RoleLogin:
    """A tenant-side role the service connects as: the project role or a restore role."""

    name: str
    password: str = field(repr=False)


def pinned(url: SourceURL, *extra: str) -> SourceURL:
    """`url` with the pinned search_path and role (and `extra` startup options) added to
    its options, after any it has, so they win."""
    options = " ".join(
        part
        for part in (url.params.get("options", ""), PINNED_SEARCH_PATH, PINNED_ROLE, PINNED_SESSION, *extra)
        if part
    )
    return url.with_params(options=options)


@contextlib.contextmanager
def _waits_explained(dbname: str) -> Iterator[None]:
    """A statement that waited past the pinned lock_timeout, or ran past its
    statement_timeout, becomes a TransientError saying so: the stage is retried. A
    session the cluster lost (restarted, shut down, out of connections) becomes
    ClusterUnavailable: ours, transient, with no address in its message."""
    try:
        yield
    except psycopg2.errors.LockNotAvailable as err:
        raise TransientError(
            f"another session holds a lock in {dbname!r} (an open transaction of the project's own "
            f"role?) and the service waited {LOCK_TIMEOUT_MS // 1000} s; it will try again"
        ) from err
    except psycopg2.errors.QueryCanceled as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "canceled"
        raise TransientError(f"a statement in {dbname!r} ran past its time limit ({first})") from err
    except psycopg2.errors.OutOfMemory as err:
        # "out of shared memory": the cluster's lock table (max_locks_per_transaction ×
        # max_connections, shared by every tenant) was full. The session is not lost;
        # the stage is retried, when other tenants may hold fewer locks.
        log.warning("the project cluster ran out of shared memory in %r: %s", dbname, str(err).strip())
        raise TransientError(
            f"the project's cluster ran out of shared memory in {dbname!r} (its lock table, "
            "max_locks_per_transaction × max_connections, is shared by every tenant and was full); "
            "it will try again; if this repeats, the cluster's operator should raise max_locks_per_transaction"
        ) from err
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as err:
        log.warning("lost the session to the project cluster in %r: %s", dbname, str(err).strip())
        raise ClusterUnavailable() from err


@dataclass(frozen=True)
class _Batch:
    """Statements of the hand-over run in one transaction, and the relations they lock."""

    statements: sql.Composed
    locks: int


class _SharedBatches:
    """The hand-over's batches, taken by several sessions (ClusterAdmin._run_shared):
    a batch starts when the locks of those running and its own fit `budget`, or alone.
    The first error of any session stops them all (`stop`)."""

    def __init__(self, batches: list[_Batch], budget: int) -> None:
        self.pending = list(reversed(batches))
        self.budget = budget
        self.held = 0  # the locks of the batches running now
        self.turns = threading.Condition()
        self.stopped = threading.Event()
        self.started = threading.Event()

    def stop(self) -> None:
        self.stopped.set()
        with self.turns:
            self.turns.notify_all()

    def take(self, session: psycopg2.extensions.cursor) -> None:
        """Run batches over `session` until none is left or the sessions are stopped."""
        try:
            while (batch := self._next()) is not None:
                try:
                    session.execute(batch.statements)
                finally:
                    with self.turns:
                        self.held -= batch.locks
                        self.turns.notify_all()
        except BaseException:
            self.stop()
            raise

    def _next(self) -> _Batch | None:
        with self.turns:
            while (
                not self.stopped.is_set()
                and self.pending
                and self.held > 0
                and self.held + self.pending[-1].locks > self.budget
            ):
                self.turns.wait()
            if self.stopped.is_set() or not self.pending:
                return None
            batch = self.pending.pop()
            self.held += batch.locks
            return batch


@dataclass(frozen=True)
class AdminFacts:
    """What `clusters add` reads of a cluster through its admin URL."""

    version_num: int  # server_version_num: 150004
    version: str  # server_version: "15.4 (Debian 15.4-1)"
    role: str
    superuser: bool
    standby: bool = False  # in recovery: a standby, which takes no writes

    @property
    def major(self) -> int:
        return major_of(self.version_num)


def unfit_for_projects(admin: AdminFacts) -> str | None:
    """Why a cluster cannot host projects through this admin, in words that say what to
    fix; None when it can. The oldest major version is MIN_CLUSTER_MAJOR; the admin
    must be a superuser (README, "Security: the privilege model": BYPASSRLS for the
    restore role, untrusted allowlisted extensions, the hand-over)."""
    if admin.version_num < MIN_CLUSTER_MAJOR * 10_000:
        return (
            f"the cluster runs PostgreSQL {admin.version}; a project cluster must run "
            f"PostgreSQL {MIN_CLUSTER_MAJOR} or newer (a failed import's preview is dropped "
            "WITH (FORCE), which ends the sessions left in it): upgrade it or add another"
        )
    if admin.standby:
        return (
            "the admin URL leads to a standby (the server is in recovery and takes no writes); "
            "give the URL of the cluster's primary"
        )
    if not admin.superuser:
        return (
            f"the admin URL's role {admin.role!r} is not a superuser; the service needs one to "
            "give restores BYPASSRLS, create untrusted allowlisted extensions and hand "
            "imported databases over: use a superuser's URL (ALTER ROLE … SUPERUSER)"
        )
    return None


class ClusterAdmin:
    """Admin operations on one Postgres cluster that hosts project databases."""

    def __init__(self, admin_url: str, *, timeout: int = 10) -> None:
        # The admin URL is ours, not a user's: no sslmode is forced on it.
        self.url = SourceURL.parse(admin_url, default_sslmode=None)
        self.timeout = timeout
        self._held = threading.local()

    @contextlib.contextmanager
    def held_session(self) -> Iterator[None]:
        """Within it, this thread's sessions in the maintenance database are one, opened
        on first use and closed at the end (a stage makes dozens of short admin calls;
        connecting for each costs more than most of them)."""
        if getattr(self._held, "active", False):
            yield
            return
        self._held.active, self._held.conn = True, None
        try:
            yield
        finally:
            conn, self._held.active, self._held.conn = self._held.conn, False, None
            if conn is not None:
                conn.close()

    @contextlib.contextmanager
    def connection(self, dbname: str | None = None) -> Iterator[psycopg2.extensions.connection]:
        """An admin session (search_path pinned), in the maintenance database by default."""
        if dbname is None and getattr(self._held, "active", False):
            yield from self._held_connection()
            return
        url = self.url if dbname is None else self.url.with_params(dbname=dbname)
        conn = connect(
            pinned(url, NO_STATEMENT_TIMEOUT), role="project cluster", timeout=self.timeout, ours=True
        )
        try:
            with _waits_explained(dbname or "the maintenance database"):
                yield conn
        finally:
            conn.close()

    def _held_connection(self) -> Iterator[psycopg2.extensions.connection]:
        """The held session, handed back as a fresh one would be: not in a transaction,
        not in autocommit. One that failed in any way is closed, not reused."""
        conn = self._held.conn
        if conn is None or conn.closed:
            conn = connect(
                pinned(self.url, NO_STATEMENT_TIMEOUT),
                role="project cluster",
                timeout=self.timeout,
                ours=True,
            )
            self._held.conn = conn
        try:
            with _waits_explained("the maintenance database"):
                yield conn
            if conn.autocommit:
                conn.autocommit = False
            else:
                conn.rollback()
        except BaseException:
            self._held.conn = None
            conn.close()
            raise

    def role_url(self, dbname: str, login: RoleLogin) -> SourceURL:
        """The cluster's address, as `login`, in `dbname` (for pg_restore and psql)."""
        return SourceURL(
            params={**self.url.params, "dbname": dbname, "user": login.name}, password=login.password
        )

    @contextlib.contextmanager
    def role_connection(
        self, dbname: str, login: RoleLogin, *extra_options: str, readonly: bool = True
    ) -> Iterator[psycopg2.extensions.connection]:
        """A session in a tenant database as one of the tenant's roles, search_path and
        role pinned.

        Refuses a role that turns out to be a superuser: a tenant database is never
        entered with more than the tenant's own privileges this way.
        """
        conn = self.open_role_connection(dbname, login, *extra_options, readonly=readonly)
        try:
            yield conn
        finally:
            conn.close()

    def open_role_connection(
        self, dbname: str, login: RoleLogin, *extra_options: str, readonly: bool = True
    ) -> psycopg2.extensions.connection:
        """`role_connection`'s session, which the caller closes."""
        url = pinned(self.role_url(dbname, login), *extra_options)
        conn = connect(url, role="project cluster", timeout=self.timeout, ours=True)
        try:
            with _waits_explained(dbname):
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pg_catalog.bool_or(rolsuper) FROM pg_catalog.pg_roles "
                        "WHERE rolname OPERATOR(pg_catalog.=) ANY (ARRAY[session_user, current_user])"
                    )
                    if one_row(cur)[0]:
                        raise PermanentError(
                            f"the role {login.name!r} is a superuser; the service enters a tenant's "
                            "database only as an unprivileged role (ALTER ROLE … NOSUPERUSER)"
                        )
                conn.rollback()
                conn.set_session(readonly=readonly)
                return conn
        except BaseException:
            conn.close()
            raise

    @contextlib.contextmanager
    def autocommit(self, dbname: str | None = None) -> Iterator[psycopg2.extensions.cursor]:
        with self.connection(dbname) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur

    def flush_wal(self) -> None:
        """Return once everything committed on the cluster so far is on disk. Previews are
        filled without waiting for each commit (synchronous_commit off); one commit that
        waits flushes the WAL up to it, theirs included, so a restore that says it is
        done is done even if the server crashes a moment later."""
        with self.autocommit() as cur:
            cur.execute("BEGIN")
            cur.execute("SET LOCAL synchronous_commit = on")
            # A commit waits for the disk only if its transaction wrote WAL (an xid alone
            # does not): a transactional message is the least that does.
            cur.execute("SELECT pg_catalog.pg_logical_emit_message(true, 'capy-imports', 'flush')")
            cur.execute("COMMIT")

    def server_major(self) -> int:
        with self.connection() as conn:
            return server_major(conn)

    def checked_for_projects(self) -> int:
        """The cluster's major version, once its admin URL is shown fit to host projects
        (`unfit_for_projects`); PermanentError saying what to fix otherwise, and a
        connection failure explained by its cause (a wrong user or database, nothing
        listening, a pooler) rather than as the cluster being unavailable: the operator
        is at the keyboard, and waiting fixes none of these.

        The version is read first in a session with none of the pinned options: a server
        too old for one of them (`jit`, PostgreSQL 11) would refuse the session, and the
        operator would be told something other than "too old". The role is then read in
        a session exactly as the service opens every admin session (pinned options
        appended to the URL's own), so a URL that works only without them (a pooler that
        refuses `options`, options of its own that swallow ours) is refused here rather
        than at the first import."""
        conn = connect(self.url, role="project cluster", timeout=self.timeout)
        try:
            with _waits_explained("the maintenance database"), conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_catalog.current_setting('server_version_num')::int, "
                    "pg_catalog.current_setting('server_version'), pg_catalog.pg_is_in_recovery()"
                )
                version_num, version, standby = one_row(cur)
        finally:
            conn.close()
        try:
            conn = connect(
                pinned(self.url, NO_STATEMENT_TIMEOUT), role="project cluster", timeout=self.timeout
            )
        except CapyError as err:
            said = " ".join(err.message.split()).rstrip(".")  # libpq's HINT on a line of its own
            raise PermanentError(
                f"{said}. A session without the service's startup options worked: the "
                "cluster, or a pooler in front of it, refuses the options the service sets on "
                "every admin session (search_path, role, timeouts); give the URL of the "
                "PostgreSQL server itself, and end any options of the URL's own cleanly"
            ) from err
        try:
            with _waits_explained("the maintenance database"), conn.cursor() as cur:
                cur.execute(
                    "SELECT r.rolname, r.rolsuper FROM pg_catalog.pg_roles r "
                    "WHERE r.rolname OPERATOR(pg_catalog.=) session_user"
                )
                role, superuser = one_row(cur)
        finally:
            conn.close()
        admin = AdminFacts(
            version_num=version_num, version=version, role=role, superuser=superuser, standby=standby
        )
        problem = unfit_for_projects(admin)
        if problem:
            raise PermanentError(problem)
        return admin.major

    def database_exists(self, name: str) -> bool:
        with self.autocommit() as cur:
            cur.execute(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) %s", (name,)
            )
            return cur.fetchone() is not None

    def create_database(self, name: str, *, owner: str | None = None, spare: bool = False) -> None:
        """Create an empty database from template0 (UTF-8, no leftovers of template1),
        owned by `owner` when given, that no other role can connect to; with `spare`,
        by taking one of the cluster's spare databases when there is one
        (stages.database.spares).

        It is created refusing connections, locked down, then opened: no other role
        can slip a session in between CREATE and REVOKE.
        """
        with self.autocommit() as cur:
            if spare:
                try:
                    if spares.take(cur, name, owner):
                        return
                except psycopg2.Error as err:
                    if cur.connection.closed:
                        raise
                    # A spare is an optimization: never the error of a rehearsal or an import.
                    log.warning("could not take a spare database for %s; creating it: %s", name, err)
            cur.execute(spares.create_statement(name, owner))
            self._lock_down(cur, name)
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))

    def keep_spares(self, count: int) -> tuple[list[str], list[str]]:
        """Make or drop spare databases until the cluster holds `count`: (made, dropped)."""
        with self.autocommit() as cur:
            return spares.keep(cur, count)

    def lock_down(self, name: str) -> None:
        """Only the owner (and the admin) may connect to `name` or create temporary
        objects there: CONNECT and TEMPORARY are revoked from PUBLIC and from any other
        role a grant named."""
        with self.autocommit() as cur:
            self._lock_down(cur, name)

    def lock_down_open(self, names: list[str]) -> list[str]:
        """Lock down those of `names` that still admit roles other than their owner
        (databases made before the service revoked PUBLIC's access, or a grant since);
        returns the ones it changed. One session for all of them."""
        if not names:
            return []
        with self.autocommit() as cur:
            cur.execute(
                "SELECT d.datname FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) ANY(%s) "
                "AND (d.datacl IS NULL OR EXISTS (SELECT 1 FROM pg_catalog.aclexplode(d.datacl) a "
                "WHERE a.grantee OPERATOR(pg_catalog.<>) d.datdba)) ORDER BY 1",
                (list(names),),
            )
            opened = [name for (name,) in cur.fetchall()]
            for name in opened:
                self._lock_down(cur, name)
        return opened

    @staticmethod
    def _lock_down(cur: psycopg2.extensions.cursor, name: str) -> None:
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
        cur.execute(
            "SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee) FROM pg_catalog.pg_database d, "
            "pg_catalog.aclexplode(d.datacl) a WHERE d.datname OPERATOR(pg_catalog.=) %s "
            "AND a.grantee OPERATOR(pg_catalog.<>) 0 AND a.grantee OPERATOR(pg_catalog.<>) d.datdba",
            (name,),
        )
        for (grantee,) in cur.fetchall():
            cur.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(
                    sql.Identifier(name), sql.Identifier(grantee)
                )
            )

    def ensure_role(self, name: str, password: str) -> None:
        """Create the project's login role, or reset its password: never a superuser,
        no CREATEDB, no CREATEROLE. It owns the project's database and everything in it."""
        self._ensure_login(name, password, "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION")

    def ensure_restore_role(self, name: str) -> RoleLogin:
        """Create an import's restore role, or give it a new random password.

        It runs the dump's SQL and may reach only the preview it owns: no superuser,
        CREATEDB, CREATEROLE or REPLICATION. It keeps INHERIT: the `public` schema of a
        PostgreSQL 15 database belongs to `pg_database_owner`, whose privileges reach
        the database's owner only through inheritance; it is a member of no other role.
        BYPASSRLS (which only a superuser can grant) lets it restore and count tables
        under FORCE ROW LEVEL SECURITY exactly; within its own preview that reveals
        nothing it did not load.
        The password is never stored: each stage that connects as the role sets a new one.
        """
        login = RoleLogin(name, secrets.token_urlsafe(32))
        self._ensure_login(
            name, login.password, "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT BYPASSRLS"
        )
        self._revoke_memberships(name)
        return login

    def _revoke_memberships(self, name: str) -> None:
        """Undo every membership grant to or from `name`. A dump may change its restore
        role's password and, before PostgreSQL 16, grant the role to others; with a new
        password and no members, no session but ours can act as it."""
        with self.autocommit() as cur:
            cur.execute(
                "SELECT g.rolname, m.rolname FROM pg_catalog.pg_auth_members a "
                "JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) a.roleid "
                "JOIN pg_catalog.pg_roles m ON m.oid OPERATOR(pg_catalog.=) a.member "
                "WHERE g.rolname OPERATOR(pg_catalog.=) %s OR m.rolname OPERATOR(pg_catalog.=) %s",
                (name, name),
            )
            for granted, member in cur.fetchall():
                cur.execute(
                    sql.SQL("REVOKE {} FROM {} CASCADE").format(
                        sql.Identifier(granted), sql.Identifier(member)
                    )
                )

    def _ensure_login(self, name: str, password: str, attributes: str) -> None:
        with self.connection() as conn:
            conn.autocommit = True
            # Sent as a SCRAM verifier computed here, so the password never appears in
            # the server's statement log.
            verifier = psycopg2.extensions.encrypt_password(
                password, name, scope=conn, algorithm="scram-sha-256"
            )
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) %s", (name,)
                )
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(
                    sql.SQL(verb + " ROLE {} LOGIN " + attributes + " PASSWORD {}").format(
                        sql.Identifier(name), sql.Literal(verifier)
                    )
                )

    def role_exists(self, name: str) -> bool:
        with self.autocommit() as cur:
            cur.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) %s", (name,))
            return cur.fetchone() is not None

    def roles_like(self, prefix: str) -> list[str]:
        """Names of the roles that start with `prefix`."""
        with self.autocommit() as cur:
            cur.execute(
                "SELECT rolname FROM pg_catalog.pg_roles "
                "WHERE pg_catalog.left(rolname::text, %s) OPERATOR(pg_catalog.=) %s ORDER BY 1",
                (len(prefix), prefix),
            )
            return [name for (name,) in cur.fetchall()]

    def drop_role(self, name: str) -> None:
        """Drop a role if it exists. One that still owns or holds something somewhere is
        stripped of LOGIN and BYPASSRLS instead, and the failure raised for a later sweep."""
        with self.autocommit() as cur:
            try:
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            except psycopg2.errors.DependentObjectsStillExist as err:
                cur.execute(sql.SQL("ALTER ROLE {} NOLOGIN NOBYPASSRLS").format(sql.Identifier(name)))
                raise TransientError(
                    f"the role {name!r} still owns objects or holds privileges ({(err.pgerror or '').strip()}); "
                    "it can no longer log in, and capy-imports sweep retries dropping it"
                ) from err

    def reopen(self, database: str) -> None:
        """Undo what an owner may have done to its database's options: IS_TEMPLATE makes
        it undroppable, ALLOW_CONNECTIONS false and CONNECTION LIMIT 0 unreachable."""
        with self.autocommit() as cur:
            cur.execute(
                sql.SQL(
                    "ALTER DATABASE {} WITH IS_TEMPLATE false ALLOW_CONNECTIONS true CONNECTION LIMIT -1"
                ).format(sql.Identifier(database))
            )

    def hand_over(self, database: str, *, from_role: str, to_role: str) -> None:
        """Give `database` and everything in it from `from_role` to `to_role`, then drop
        `from_role`. Idempotent: a retry after any part of it finishes the rest.

        Whatever the dump did to the database's options is undone first (`reopen`).
        REASSIGN and DROP OWNED run no user code; the session's search_path is pinned.
        """
        self.reopen(database)
        if self.role_exists(from_role):
            # Nobody may act as the role any more, nor still be in the database.
            with self.autocommit() as cur:
                cur.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(from_role)))
            self._revoke_memberships(from_role)
            self.terminate_sessions(database)
            with self.autocommit(database) as cur:
                # One commit per batch of relations (see _reassign_in_batches), none waiting for the
                # disk: the last statement's commit waits, and flushes theirs with it.
                cur.execute("SET synchronous_commit = off")
                self._reassign_in_batches(cur, database, from_role, to_role)
                cur.execute(
                    sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                        sql.Identifier(from_role), sql.Identifier(to_role)
                    )
                )
                cur.execute("SET synchronous_commit = on")
                # DROP OWNED revokes the restore role's privileges: the project role
                # gets those on the extensions' configuration first.
                self._grant_extension_configuration(cur, to_role)
                cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(from_role)))
        self.set_owner(database, to_role)
        self.lock_down(database)
        try:
            self.drop_role(from_role)
        except TransientError as err:
            # The database is handed over either way; the role can no longer log in.
            log.warning("%s", err.message)

    def _reassign_in_batches(
        self, cur: psycopg2.extensions.cursor, database: str, from_role: str, to_role: str
    ) -> None:
        """Give `from_role`'s relations and large objects to `to_role` a few at a time,
        each few in a transaction of its own. REASSIGN OWNED takes a lock on every object it
        changes in a single transaction; a dump of some thousands of tables would need
        more locks than the cluster's shared lock table holds (max_locks_per_transaction
        × max_connections, shared with every tenant) and fail with "out of shared
        memory". What is left afterwards (functions, types, schemas…) is few and takes
        no relation locks. Indexes, TOAST tables and sequences owned by a column follow
        their table.

        A batch is as many statements as lock about REASSIGN_LOCKS relations (a table
        with its TOAST table and index, its indexes and owned sequences; a table with
        more goes alone), sent in one round trip (one implicit transaction): one
        statement at a time, the round trips were 40 % of the hand-over of 2,000 tables.
        From REASSIGN_SHARED_FROM batches on, a second session of `database` takes
        batches too (see REASSIGN_SESSIONS); the first error of either stops both, and
        is raised once neither runs a statement any more (the hand-over is idempotent).
        `cur` is a session of `database` in autocommit."""
        batches = self._reassign_batches(cur, from_role, to_role)
        if len(batches) < REASSIGN_SHARED_FROM:
            for batch in batches:
                cur.execute(batch.statements)
        else:
            self._run_shared(cur, database, batches)
        cur.execute(
            "SELECT m.oid FROM pg_catalog.pg_largeobject_metadata m WHERE m.lomowner OPERATOR(pg_catalog.=) "
            "(SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) %s) ORDER BY 1",
            (from_role,),
        )
        for (oid,) in cur.fetchall():
            cur.execute(
                sql.SQL("ALTER LARGE OBJECT {} OWNER TO {}").format(
                    sql.Literal(int(oid)), sql.Identifier(to_role)
                )
            )

    @staticmethod
    def _reassign_batches(cur: psycopg2.extensions.cursor, from_role: str, to_role: str) -> list[_Batch]:
        """The hand-over's ALTER TABLE … OWNER statements of `from_role`'s relations, in
        batches (see _reassign_in_batches). A sequence owned by a column follows its
        table and is left out; a partition or an inheritance child is a relation of its
        own (ALTER TABLE … OWNER of its parent does not reach it)."""
        cur.execute(
            # Its indexes from pg_index: one made by a constraint (PRIMARY KEY, UNIQUE,
            # EXCLUDE) depends on the constraint, not on the table, in pg_depend.
            "SELECT n.nspname, c.relname, 3 + (SELECT pg_catalog.count(*) FROM pg_catalog.pg_index i "
            "  WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid) "
            "+ (SELECT pg_catalog.count(*) FROM pg_catalog.pg_depend o "
            "  JOIN pg_catalog.pg_class s ON s.oid OPERATOR(pg_catalog.=) o.objid "
            "  WHERE o.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass "
            "  AND o.refobjid OPERATOR(pg_catalog.=) c.oid "
            "  AND o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass "
            "  AND s.relkind OPERATOR(pg_catalog.=) 'S' "
            "  AND o.deptype OPERATOR(pg_catalog.=) ANY (ARRAY['a', 'i']::\"char\"[])) "
            "FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
            "WHERE c.relowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r "
            "  WHERE r.rolname OPERATOR(pg_catalog.=) %s) "
            "AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v', 'm', 'f', 'S']::\"char\"[]) "
            "AND NOT (c.relkind OPERATOR(pg_catalog.=) 'S' AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend d "
            "  WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass "
            "  AND d.objid OPERATOR(pg_catalog.=) c.oid "
            "  AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass "
            "  AND d.deptype OPERATOR(pg_catalog.=) ANY (ARRAY['a', 'i']::\"char\"[]))) "
            "ORDER BY c.oid",
            (from_role,),
        )
        batches: list[_Batch] = []
        batch: list[sql.Composable] = []
        locks = 0
        for schema, name, relations in cur.fetchall():
            if batch and locks + relations > REASSIGN_LOCKS:
                batches.append(_Batch(sql.SQL("; ").join(batch), locks))
                batch, locks = [], 0
            batch.append(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier(schema, name), sql.Identifier(to_role)
                )
            )
            locks += relations
        if batch:
            batches.append(_Batch(sql.SQL("; ").join(batch), locks))
        return batches

    def _run_shared(self, cur: psycopg2.extensions.cursor, database: str, batches: list[_Batch]) -> None:
        """Run `batches`, each in a transaction of its own, over `cur` and
        REASSIGN_SESSIONS - 1 more sessions of `database`, each taking the next batch
        when its last one is done and the locks allow it (see REASSIGN_SESSIONS).

        The first error stops every session and is raised here once none runs a
        statement any more, whatever interrupts this thread meanwhile (a time limit):
        no session outlives the call. A session that cannot be opened or set up takes
        no batch; the others take them all."""
        shared = _SharedBatches(batches, REASSIGN_SESSIONS * REASSIGN_LOCKS)

        def helper() -> None:
            shared.started.wait()
            if shared.stopped.is_set():
                return
            with contextlib.ExitStack() as stack:
                try:
                    other = stack.enter_context(self.autocommit(database))
                    other.execute("SET synchronous_commit = off")
                except (CapyError, psycopg2.Error) as err:
                    # The cluster is full, say: the other sessions take every batch.
                    log.info("the hand-over goes on without a second session (%s)", err)
                    return
                shared.take(other)

        helpers: list[Background[None]] = []
        finished = False
        try:
            for _ in range(REASSIGN_SESSIONS - 1):
                helpers.append(Background(helper, name="hand-over"))
            shared.started.set()
            shared.take(cur)
            finished = True
        finally:
            # Whatever ended this thread's part early (an error, a time limit landing
            # anywhere above), the helpers take no more batches; they are waited for.
            if not finished:
                shared.stop()
            shared.started.set()
            try:
                for running in helpers:
                    running.settle()
            finally:
                for running in helpers:
                    running.join()
        errors = [error for running in helpers if (error := running.error) is not None]
        for extra in errors[1:]:
            log.warning("a session of the hand-over failed too: %s", extra)
        if errors:
            raise errors[0]

    def set_owner(self, database: str, owner: str) -> None:
        with self.autocommit() as cur:
            cur.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(database), sql.Identifier(owner)
                )
            )

    def create_extensions(
        self, database: str, owner: str, extensions: Mapping[str, str], comments: dict[str, str] | None = None
    ) -> dict[str, int]:
        """Create extensions (name -> schema) in `database` as the admin, as managed
        platforms do for their allowlist; a schema that does not exist yet is created
        owned by `owner` (the import's restore role), so the restore can fill it. Only
        in a freshly created preview, before any of the dump's SQL has run there. The
        source's comments on them are applied as values, never as SQL text from a dump.
        `owner` may write the extensions' configuration tables (see
        `_grant_extension_configuration`), whose rows the dump holds.

        Returns the rows each configuration table holds once its extension is made
        ("schema.table" -> rows): the extension's own, which the dump's come beside
        (whatever version of the extension made the dump)."""
        with self.autocommit(database) as cur:
            configuration = self._create_extensions(cur, owner, extensions)
            for name, comment in (comments or {}).items():
                if name in extensions:
                    cur.execute(
                        sql.SQL("COMMENT ON EXTENSION {} IS {}").format(
                            sql.Identifier(name), sql.Literal(comment)
                        )
                    )
            tables = [(relation.schema, relation.name) for relation in configuration if relation.is_table]
            return inventory.count_rows(cur.connection, tables)

    @staticmethod
    def _create_extensions(
        cur: psycopg2.extensions.cursor, owner: str, extensions: Mapping[str, str]
    ) -> list[inventory.Configuration]:
        """Create `extensions`, then grant `owner` their configuration (returned)."""
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
        return ClusterAdmin._grant_extension_configuration(cur, owner)

    @staticmethod
    def _grant_extension_configuration(
        cur: psycopg2.extensions.cursor, role: str
    ) -> list[inventory.Configuration]:
        """Let `role` read and write the configuration tables and sequences of the
        database's extensions (those an extension marks with `pg_extension_config_dump`:
        PostGIS's `spatial_ref_sys`, pg_partman's `part_config`…, and the sequences those
        tables own), and reference the tables in foreign keys. pg_dump dumps their
        rows as the user's own data, and the admin that created the extension owns them:
        without this the restore role cannot restore those rows (`permission denied for
        table …`), nor the project's owner change its extensions' settings afterwards,
        as it could on a server where it created them itself. A schema of theirs the
        role may not use (one the extension made itself) is granted USAGE. A GRANT runs
        no user code. Returns the configuration granted."""
        configuration = inventory.extension_configuration(cur.connection)
        schemas: set[str] = set()
        for relation in configuration:
            if relation.schema not in schemas:
                schemas.add(relation.schema)
                cur.execute(
                    "SELECT pg_catalog.has_schema_privilege(%s, %s, 'USAGE')", (role, relation.schema)
                )
                if not one_row(cur)[0]:
                    cur.execute(
                        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                            sql.Identifier(relation.schema), sql.Identifier(role)
                        )
                    )
            privileges = (
                "USAGE, SELECT, UPDATE ON SEQUENCE"
                if relation.relkind == "S"
                else "SELECT, INSERT, UPDATE, DELETE, REFERENCES ON TABLE"
            )
            cur.execute(
                sql.SQL("GRANT " + privileges + " {} TO {}").format(
                    sql.Identifier(relation.schema, relation.name), sql.Identifier(role)
                )
            )
        return configuration

    def rollback_prepared(self, name: str) -> list[str]:
        """Roll back every prepared transaction of database `name` (a dump may end with
        `PREPARE TRANSACTION`, on a cluster that allows them): it would hold its locks
        across sessions and keep the database from being dropped. Returns their ids."""
        with self.autocommit() as cur:
            cur.execute(
                "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE database OPERATOR(pg_catalog.=) %s",
                (name,),
            )
            gids = [gid for (gid,) in cur.fetchall()]
        if gids:
            # ROLLBACK PREPARED runs in the database the transaction was prepared in; it
            # runs no user code.
            with self.autocommit(name) as cur:
                for gid in gids:
                    cur.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            log.warning("rolled back %d transaction(s) a dump prepared in %s", len(gids), name)
        return gids

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, disconnecting anyone still in it (its owner may
        have marked it a template, which DROP DATABASE refuses) and rolling back what a
        dump prepared in it."""
        self.rollback_prepared(name)  # connects to `name` only if it holds prepared transactions
        with self.autocommit() as cur:
            cur.execute(
                "SELECT datistemplate FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) %s",
                (name,),
            )
            row = cur.fetchone()
            if row and row[0]:
                cur.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def is_empty(self, name: str, owner: RoleLogin) -> bool:
        """Whether `name` holds no user objects, read as its owner (the project role)."""
        with self.role_connection(name, owner, CATALOG_STATEMENT_TIMEOUT) as conn:
            empty = inventory.is_empty(conn)
            conn.rollback()
            return empty

    def swap(
        self,
        *,
        live: str,
        preview: str,
        replaced: str,
        attempts: int = 5,
        hold: Callable[[], None] | None = None,
    ) -> None:
        """Make `preview` the live database, keeping the old live one as `replaced`.

        One transaction, so a crash anywhere in it changes nothing: sessions in the live
        database are ended, then both renames commit together and the project's database
        name always points to a complete database. Nothing is set outside it (an
        `ALLOW_CONNECTIONS false` that only the crashed process could undo would leave
        the live database refusing everyone). New connections cannot slip in once the
        first rename holds its lock: RENAME takes an AccessExclusiveLock on the database,
        which a starting session must share (postinit.c), and a session that waited
        finds the name renamed and retries. One that connects between the termination
        and the rename makes it fail with ObjectInUse: then it is tried again.
        `hold` (tests only) runs inside the transaction, before the commit.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._swap_once(live=live, preview=preview, replaced=replaced, hold=hold)
                return
            except psycopg2.errors.ObjectInUse as err:
                if attempt == attempts:
                    raise TransientError(
                        f"the project's database {live!r} is still in use by other sessions; "
                        "the swap will be retried"
                    ) from err
                time.sleep(0.5 * attempt)

    def _swap_once(self, *, live: str, preview: str, replaced: str, hold: Callable[[], None] | None) -> None:
        live_id, preview_id, replaced_id = map(sql.Identifier, (live, preview, replaced))
        with self.connection() as conn, conn.cursor() as cur:
            try:
                cur.execute(
                    "SELECT 1 FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) %s", (preview,)
                )
                if cur.fetchone() is None:
                    raise PermanentError(f"the preview database {preview!r} no longer exists")
                cur.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
                    "WHERE datname OPERATOR(pg_catalog.=) ANY(%s) AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
                    ([live, preview],),
                )
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live_id, replaced_id))
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(preview_id, live_id))
                if hold is not None:
                    hold()
                conn.commit()
            except BaseException:
                conn.rollback()
                raise

    def reopen_disabled(self, names: list[str]) -> list[str]:
        """Let those of `names` that refuse every connection (ALLOW_CONNECTIONS false,
        left by a swap that crashed before swaps were one transaction) accept them
        again; returns the ones it changed."""
        if not names:
            return []
        with self.autocommit() as cur:
            cur.execute(
                "SELECT datname FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) ANY(%s) "
                "AND NOT datallowconn ORDER BY 1",
                (list(names),),
            )
            disabled = [name for (name,) in cur.fetchall()]
            for name in disabled:
                cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
        return disabled

    def terminate_sessions(self, name: str) -> int:
        """End every session in database `name` (a stopped tool's backend may still be
        running its last statement), and roll back the transactions a dump prepared
        there; returns how many sessions there were."""
        self.rollback_prepared(name)
        with self.autocommit() as cur:
            cur.execute(
                "SELECT pg_catalog.count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                "WHERE datname OPERATOR(pg_catalog.=) %s AND pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
                (name,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0
