"""Spare databases (stages.database.spares): a database taken from a spare is the
database CREATE DATABASE makes; takers side by side never share one; a cluster holds
the number configured, kept by one process at a time; an import's rehearsal and
preview take spares, and the worker makes them again once the job has ended."""

from __future__ import annotations

import secrets
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

from pipeline.sealing import Sealer
from pipeline.sweep import sweep
from stages.database import spares
from stages.database.cluster import ClusterAdmin
from tests.support import pg
from tests.support.imports import run_import
from tests.support.world import make_world


@pytest.fixture
def admin(spare_admin):
    return spare_admin


spare_names = pg.spare_names
described = pg.database_facts


def catalog_of(name: str) -> list[tuple]:
    """Every relation of the database, by name and kind: template0's, nothing more."""
    conn = psycopg2.connect(pg.url_for(name))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT relnamespace::regnamespace::text, relname, relkind FROM pg_class ORDER BY 1, 2"
            )
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture
def owner(scratch_role):
    return scratch_role


def test_a_database_taken_from_a_spare_is_the_database_create_makes(admin, owner):
    assert admin.keep_spares(1)[0] != []
    [spare] = spare_names()
    taken, made = pg.scratch_name("capy_t_taken"), pg.scratch_name("capy_t_made")
    try:
        admin.create_database(taken, owner=owner, spare=True)
        assert spare_names() == [] and not pg.database_exists(spare)
        admin.create_database(made, owner=owner, spare=True)  # no spare left: created
        assert described(taken) == described(made)
        assert described(taken)[0] == owner and described(taken)[6] is True
        assert catalog_of(taken) == catalog_of(made)
        # Its owner may connect; nobody else may (PUBLIC's CONNECT is revoked).
        other = pg.scratch_name("capy_t_other")
        pg.admin(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(other)))
        try:
            psycopg2.connect(pg.url_for(taken).replace("postgres@", f"{owner}@")).close()
            with pytest.raises(psycopg2.OperationalError, match="permission denied"):
                psycopg2.connect(pg.url_for(taken).replace("postgres@", f"{other}@"))
        finally:
            pg.admin(sql.SQL("DROP ROLE {}").format(sql.Identifier(other)))
    finally:
        pg.drop_db(taken)
        pg.drop_db(made)


def test_without_spare_the_database_is_created_and_spares_are_left_alone(admin, owner):
    admin.keep_spares(1)
    name = pg.scratch_name("capy_t_plain")
    try:
        admin.create_database(name, owner=owner)
        assert len(spare_names()) == 1 and described(name)[0] == owner
    finally:
        pg.drop_db(name)


def test_takers_side_by_side_never_share_a_spare(admin, owner):
    admin.keep_spares(3)
    names = [pg.scratch_name("capy_t_race") for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(names))

    def take(name: str) -> None:
        try:
            start.wait()
            ClusterAdmin(pg.ADMIN_URL).create_database(name, owner=owner, spare=True)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=take, args=(name,)) for name in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert spare_names() == []
        assert all(described(name)[0] == owner and described(name)[6] for name in names)
    finally:
        for name in names:
            pg.drop_db(name)


def test_a_cluster_holds_the_spares_configured_kept_by_one_process_at_a_time(admin):
    made, dropped = admin.keep_spares(3)
    assert len(made) == 3 and dropped == [] and sorted(spare_names()) == sorted(made)
    assert admin.keep_spares(3) == ([], [])
    made, dropped = admin.keep_spares(1)
    assert made == [] and len(dropped) == 2 and len(spare_names()) == 1
    # Another process keeping them (its advisory lock): this one does nothing.
    other = psycopg2.connect(pg.ADMIN_URL)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (spares.KEEP_LOCK,))
        assert admin.keep_spares(4) == ([], []) and len(spare_names()) == 1
    finally:
        other.close()
    assert len(admin.keep_spares(0)[1]) == 1 and spare_names() == []


def test_a_database_named_like_a_spare_that_is_not_one_is_never_handed_out(admin, owner):
    """Only a database the admin owns and that refuses connections is a spare: one a
    tenant could enter, or owns, keeps its name and its contents."""
    opened = spares.SPARE_PREFIX + "open_" + secrets.token_hex(3)
    owned = spares.SPARE_PREFIX + "owned_" + secrets.token_hex(3)
    pg.create_db(opened)
    pg.admin(
        sql.SQL("CREATE DATABASE {} OWNER {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(owned), sql.Identifier(owner)
        )
    )
    name = pg.scratch_name("capy_t_notspare")
    try:
        admin.create_database(name, owner=owner, spare=True)
        assert pg.database_exists(opened) and pg.database_exists(owned)
        assert admin.keep_spares(0) == ([], [])  # not counted, not dropped
    finally:
        for db in (name, opened, owned):
            pg.drop_db(db)


def test_the_sweep_keeps_each_clusters_spares(control_db, store, admin):
    make_world(control_db)  # the cluster the sweep visits
    done = sweep(control_db.replace(spare_databases=2), Sealer(control_db.secret_key), store)
    assert len(done["spares_made"]) == 2 and sorted(spare_names()) == sorted(done["spares_made"])
    again = sweep(control_db.replace(spare_databases=2), Sealer(control_db.secret_key), store)
    assert again["spares_made"] == [] and again["spares_dropped"] == []
    done = sweep(control_db.replace(spare_databases=0), Sealer(control_db.secret_key), store)
    assert len(done["spares_dropped"]) == 2 and spare_names() == []


def test_an_import_takes_spares_for_its_rehearsal_and_preview_and_the_worker_makes_them_again(
    control_db, corpus_source, admin
):
    settings = control_db.replace(spare_databases=2)
    world = make_world(settings)
    before = set(admin.keep_spares(2)[0])
    assert len(before) == 2
    job = run_import(settings, world, pg.url_for(corpus_source("chinook"), sslmode="disable"))
    assert job.state == "completed", job.error
    assert pg.row_counts(world.project.database_name) == pg.row_counts(corpus_source("chinook"))
    deadline = time.monotonic() + 30
    while len(set(spare_names()) - before) < 2:  # made again in the background
        assert time.monotonic() < deadline, spare_names()
        time.sleep(0.1)
    # Both were taken (the rehearsal's database and the preview), two new ones made.
    assert set(spare_names()).isdisjoint(before) and len(spare_names()) == 2


def test_the_keeper_drops_what_an_interrupted_keeper_or_a_mistake_left_and_nothing_else(admin):
    """A half-made spare (a keeper killed before its rename) and a closed database of
    the admin's with a spare's name that is not one are dropped; one that admits
    connections (someone may be in it) is left alone."""
    half = spares.MAKING_PREFIX + secrets.token_hex(3)
    limited = spares.SPARE_PREFIX + "limited_" + secrets.token_hex(3)
    opened = spares.SPARE_PREFIX + "open_" + secrets.token_hex(3)
    pg.admin(sql.SQL("CREATE DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(half)))
    pg.admin(
        sql.SQL("CREATE DATABASE {} ALLOW_CONNECTIONS false CONNECTION LIMIT 0").format(
            sql.Identifier(limited)
        )
    )
    pg.create_db(opened)
    try:
        made, dropped = admin.keep_spares(1)
        assert sorted(dropped) == sorted([half, limited]) and len(made) == 1
        assert not pg.database_exists(half) and not pg.database_exists(limited) and pg.database_exists(opened)
        assert sorted(spare_names()) == sorted([*made, opened])
        assert admin.keep_spares(1) == ([], [])  # the one that admits connections is not counted either
    finally:
        for db in (half, limited, opened):
            pg.drop_db(db)
