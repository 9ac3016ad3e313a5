"""Hostile review of spare databases (stages.database.spares): the database a taker
gets must be exactly the one ClusterAdmin.create_database makes (owner, ACL, encoding,
connection limit, template0's content), and a spare that cannot be taken must never
fail the job: spares are an optimization, "never an error of a job".

Each test leaves a spare in a state an admin's mistake, an interrupted command or a
concurrent keeper leaves it in, then takes it with create_database(..., spare=True)."""

from __future__ import annotations

import secrets
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

from stages.database import spares
from stages.database.cluster import ClusterAdmin
from tests.support import pg


@pytest.fixture
def admin(spare_admin):
    return spare_admin


spare_names = pg.spare_names
described = pg.database_facts


@pytest.fixture
def roles():
    names = [pg.scratch_name("capy_t_hsp_role") for _ in range(2)]
    for name in names:
        pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield names
    for name in names:
        pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def databases(scratch_databases):
    return scratch_databases


def one_spare(admin: ClusterAdmin) -> str:
    admin.keep_spares(1)
    [spare] = spare_names()
    return spare


def relations(name: str) -> list[tuple]:
    return pg.admin(
        "SELECT relnamespace::regnamespace::text, relname FROM pg_class ORDER BY 1, 2", dbname=name
    )


def connects_as(role: str, dbname: str) -> bool:
    try:
        psycopg2.connect(pg.url_for(dbname).replace("postgres@", f"{role}@")).close()
    except psycopg2.OperationalError:
        return False
    return True


def test_a_grant_on_a_spare_does_not_reach_the_database_taken_from_it(roles, admin, databases):
    """create_database revokes CONNECT/TEMPORARY from every role but the owner
    (_lock_down); a take revokes only PUBLIC's, so a grant an admin made on a spare
    (GRANT CONNECT ON DATABASE capy_spare_… TO some_role) lets that role into the
    rehearsal or the preview that takes it."""
    owner, other = roles
    spare = one_spare(admin)
    pg.admin(
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
            sql.Identifier(spare), sql.Identifier(other)
        )
    )
    taken, made = databases(), databases()
    admin.create_database(taken, owner=owner, spare=True)
    admin.create_database(made, owner=owner)
    assert not connects_as(other, made)
    assert not connects_as(other, taken), described(taken)
    assert described(taken) == described(made)


def test_a_spare_someone_opened_and_filled_is_not_handed_out(roles, admin, databases):
    """A spare that was opened (ALLOW_CONNECTIONS true), filled and closed again passes
    for a spare: its tables reach the preview taken from it."""
    owner, _ = roles
    spare = one_spare(admin)
    pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(spare)))
    pg.admin("CREATE TABLE public.planted (x int)", dbname=spare)
    pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(spare)))
    taken, made = databases(), databases()
    admin.create_database(taken, owner=owner, spare=True)
    admin.create_database(made, owner=owner)
    assert relations(taken) == relations(made)


@pytest.mark.parametrize(
    "made_as",
    [
        "CONNECTION LIMIT 0",
        "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'",
    ],
)
def test_a_spare_named_database_made_otherwise_is_not_handed_out(admin, roles, databases, made_as):
    """A database the admin made with a spare's name but not as create_database makes
    one (another encoding, a connection limit) is handed out as is: a preview with
    CONNECTION LIMIT 0 refuses its restore role, a SQL_ASCII one takes any bytes."""
    owner, _ = roles
    odd = spares.SPARE_PREFIX + "odd_" + secrets.token_hex(3)
    pg.admin(
        sql.SQL("CREATE DATABASE {} TEMPLATE template0 ALLOW_CONNECTIONS false " + made_as).format(
            sql.Identifier(odd)
        )
    )
    taken, made = databases(), databases()
    admin.create_database(taken, owner=owner, spare=True)
    admin.create_database(made, owner=owner)
    assert described(taken) == described(made)


def test_a_session_inside_a_spare_does_not_fail_the_taker(roles, admin, databases):
    """A session left in a spare (one opened a moment by mistake, then closed to new
    connections: existing sessions stay) makes its RENAME fail with "is being accessed
    by other users", an OperationalError that comes out as ClusterUnavailable: the
    rehearsal or preview fails instead of taking another spare or creating the
    database, and every retry that picks that spare fails the same way."""
    owner, _ = roles
    spare = one_spare(admin)
    pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(spare)))
    inside = psycopg2.connect(pg.url_for(spare))
    try:
        pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(spare)))
        name = databases()
        admin.create_database(name, owner=owner, spare=True)
        assert described(name)[0] == owner and described(name)[6] is True
    finally:
        inside.close()


def test_an_invalid_spare_left_by_an_interrupted_drop_is_not_handed_out(roles, admin, databases):
    """An interrupted DROP DATABASE (a sweep lowering CAPY_SPARE_DATABASES, killed
    mid-drop) leaves the spare invalid (datconnlimit -2, PostgreSQL >= 15.4): it still
    passes for a spare, a take renames it and then ALTER … ALLOW_CONNECTIONS ends the
    session (FATAL "cannot alter invalid database") -> ClusterUnavailable; and `keep`
    counts it, so it is never replaced. Simulated with the catalog update the server
    makes when a drop is interrupted."""
    owner, _ = roles
    spare = one_spare(admin)
    pg.admin("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (spare,))
    name = databases()
    try:
        admin.create_database(name, owner=owner, spare=True)
        assert described(name)[0] == owner and described(name)[7] == -1
        assert admin.keep_spares(1)[0] != [], "the invalid spare is counted as a spare"
    finally:
        pg.drop_db(spare)


def test_a_lock_on_one_spare_does_not_fail_the_taker(roles, admin, databases):
    """A taker waits the admin session's lock_timeout (10 s) on a spare another session
    holds (a keeper's DROP of a surplus spare during a long checkpoint, a stalled
    taker's open RENAME), then fails with a TransientError instead of taking another
    spare or creating the database."""
    owner, _ = roles
    spare = one_spare(admin)
    holder = psycopg2.connect(pg.ADMIN_URL)
    try:
        with holder.cursor() as cur:  # a transaction of another session that locks the spare's row
            cur.execute(sql.SQL("COMMENT ON DATABASE {} IS 'held'").format(sql.Identifier(spare)))
        name = databases()
        admin.create_database(name, owner=owner, spare=True)
        assert described(name)[0] == owner
    finally:
        holder.rollback()
        holder.close()


def test_a_keepers_revoke_racing_a_take_does_not_fail_the_taker(roles, admin, databases):
    """keep() makes a spare (CREATE, committed) and then REVOKEs PUBLIC's access in a
    second statement; a taker that saw the spare in between renames it while that
    REVOKE (GRANT/REVOKE take no lock on the database) updates the same catalog row:
    the RENAME fails with "tuple concurrently updated" (InternalError), and the
    rehearsal or preview with it. Seen under load (keepers and takers side by side);
    made certain here by holding the keeper's REVOKE open until the RENAME waits on it."""
    owner, _ = roles
    spare = one_spare(admin)
    keeper = psycopg2.connect(pg.ADMIN_URL)
    with keeper.cursor() as cur:
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(spare)))

    def commit_soon() -> None:
        time.sleep(1.0)
        keeper.commit()

    committer = threading.Thread(target=commit_soon)
    committer.start()
    name = databases()
    try:
        admin.create_database(name, owner=owner, spare=True)
        assert described(name)[0] == owner and described(name)[6] is True
    finally:
        committer.join()
        keeper.close()
