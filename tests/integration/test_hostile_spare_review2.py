"""Second hostile review of spare databases (stages.database.spares): what `_USABLE`
let through (another locale provider), and broken spares that stopped the keeper from
making any. (A spare an admin opened and filled, then hid by resetting the statistics
or by a crash, passes: like template0, a spare is trusted to hold what the admin made;
see the module's docstring.)"""

from __future__ import annotations

import secrets
import time

import psycopg2
import pytest
from psycopg2 import sql

from stages.database import spares
from tests.support import pg

described = pg.database_facts


@pytest.fixture
def owner(scratch_role):
    return scratch_role


@pytest.fixture
def databases(scratch_databases):
    return scratch_databases


def relations(name: str) -> list[tuple]:
    return pg.admin(
        "SELECT relnamespace::regnamespace::text, relname FROM pg_class ORDER BY 1, 2", dbname=name
    )


def filled_spare(admin) -> str:
    admin.keep_spares(1)
    [spare] = pg.spare_names()
    pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(spare)))
    return spare


def close(spare: str) -> None:
    pg.admin(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(spare)))


def test_a_spare_named_database_with_another_locale_provider_is_not_handed_out(spare_admin, owner, databases):
    """_USABLE compares encoding, datcollate and datctype with template0, not
    datlocprovider / daticulocale: an ICU database on a libc cluster (or another ICU
    locale on an ICU cluster) is handed out, with another collation than
    create_database makes."""
    [(provider,)] = pg.admin("SELECT datlocprovider FROM pg_database WHERE datname = 'template0'")
    other = "LOCALE_PROVIDER libc" if provider == "i" else "LOCALE_PROVIDER icu ICU_LOCALE 'de-DE'"
    if provider == "i":
        other = "ICU_LOCALE 'tr-TR'"
    odd = spares.SPARE_PREFIX + "icu_" + secrets.token_hex(3)
    pg.admin(
        sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' ALLOW_CONNECTIONS false " + other
        ).format(sql.Identifier(odd))
    )
    pg.admin(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(odd)))
    taken, made = databases(), databases()
    spare_admin.create_database(taken, owner=owner, spare=True)
    spare_admin.create_database(made, owner=owner)
    facts = "SELECT datlocprovider, daticulocale FROM pg_database WHERE datname = %s"
    assert pg.admin(facts, (taken,)) == pg.admin(facts, (made,))


def test_one_undroppable_broken_spare_does_not_stop_the_keeper_making_spares(spare_admin):
    """keep drops the broken ones first and lets the first failure escape: one closed
    database of the admin's with a spare's name that DROP refuses (here a template;
    a session or a prepared transaction inside does the same) means no spare is ever
    made again on that cluster (every job's keeper and every sweep fail the same way)."""
    odd = spares.SPARE_PREFIX + "tpl_" + secrets.token_hex(3)
    pg.admin(
        sql.SQL("CREATE DATABASE {} ALLOW_CONNECTIONS false IS_TEMPLATE true").format(sql.Identifier(odd))
    )
    try:
        spare_admin.keep_spares(2)  # the failed drop is logged, not raised
        assert len([n for n in pg.spare_names() if n != odd]) == 2
    finally:
        pg.admin(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(odd)))
        pg.drop_db(odd)


def test_a_session_left_in_a_broken_spare_does_not_stop_the_keeper_making_spares(spare_admin):
    """A spare opened by mistake, entered, closed again with the session still there:
    it is broken (entered), DROP waits 5 s then fails ObjectInUse, keep raises before
    making anything."""
    spare = filled_spare(spare_admin)
    inside = psycopg2.connect(pg.url_for(spare))
    inside.autocommit = True
    try:
        with inside.cursor() as cur:
            cur.execute("SELECT 1")
        time.sleep(0.3)
        close(spare)
        spare_admin.keep_spares(2)  # the failed drop is logged, not raised
        assert len([n for n in pg.spare_names() if n != spare]) == 2
    finally:
        inside.close()
