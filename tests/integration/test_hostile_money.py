"""Hostile review of 30629b6 (money printed and read in the C locale on a live copy).

Every comparison reads `money` in a session with lc_monetary = 'C', so it compares the
stored integer (C prints two decimals of every stored unit), whatever each side's locale."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import psycopg2
import pytest

import stages.copy.live as live
import stages.copy.stream as stream
from tests.support.imports import run_import, upload_and_import
from tests.support.pgcluster import TempCluster, cluster_with_locales
from tests.support.world import make_world

LOCALES = ("de_DE.UTF-8", "ja_JP.UTF-8", "ar_BH.UTF-8")

VALUES = "(1, 1234.56), (2, -7.5), (3, NULL), (4, 0), (5, 92233720368547758.07), (6, -92233720368547758.08), (7, 0.01)"


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    """A cluster that knows de_DE (2 decimals), ja_JP (0 decimals) and ar_BH (3 decimals)."""
    with cluster_with_locales(LOCALES) as made:
        yield made


def _make_source(
    cluster: TempCluster, name: str, ddl: str, *, lc: str | None = None, role_lc: str | None = None
) -> str:
    admin = psycopg2.connect(cluster.url())
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
        if lc:
            cur.execute(f"ALTER DATABASE {name} SET lc_monetary = %s", (lc,))
        if role_lc:
            cur.execute(f"ALTER ROLE capy_admin IN DATABASE {name} SET lc_monetary = %s", (role_lc,))
    admin.close()
    conn = psycopg2.connect(cluster.url(name))
    with conn, conn.cursor() as cur:
        cur.execute("SET lc_monetary = 'C'")  # the literals below are in C
        cur.execute(ddl)
    conn.close()
    if lc or role_lc:  # the locale is real: the source prints money its own way
        conn = psycopg2.connect(cluster.url(name))
        with conn.cursor() as cur:
            cur.execute("SELECT 1234::numeric::money::text")
            assert not cur.fetchone()[0].startswith("$")
        conn.close()
    return cluster.url(name)


def _rows(url: str, tables: list[str]) -> dict[str, list[str]]:
    """Each table's rows as text, money printed in C (the stored integer)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET lc_monetary = 'C'")
            out = {}
            for t in tables:
                cur.execute(f"SELECT t::text FROM {t} t ORDER BY 1")
                out[t] = [r[0] for r in cur.fetchall()]
            return out
    finally:
        conn.close()


def _target(world) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{world.project.database_name}"


def _imported_as_source(control_db, url, tables):
    """Import `url`; the job completed and `tables` hold the source's rows. (world, job)"""
    world, job = _import(control_db, url)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert _rows(_target(world), tables) == _rows(url, tables)
    return world, job


def _import(control_db, url):
    world = make_world(control_db)
    job = run_import(control_db, world, url)
    return world, job


CONTAINERS = f"""
CREATE DOMAIN amount_d AS money;
CREATE TYPE priced AS (label text, amount money);
CREATE TABLE plain (id int PRIMARY KEY, amount money);
INSERT INTO plain VALUES {VALUES};
CREATE TABLE arr (id int PRIMARY KEY, amounts money[], items priced[]);
INSERT INTO arr VALUES (1, ARRAY[1234.56, -0.01, NULL, 92233720368547758.07]::money[],
                        ARRAY[ROW('a, b', 1234.56)::priced, ROW(NULL, -92233720368547758.08)::priced]),
                       (2, '{{}}', NULL);
CREATE TABLE dom (id int PRIMARY KEY, amount amount_d);
INSERT INTO dom VALUES {VALUES};
CREATE TABLE comp (id int PRIMARY KEY, p priced);
INSERT INTO comp VALUES (1, ROW('x', 1234.56)), (2, ROW('y', NULL)), (3, NULL), (4, ROW('"q"', -7.5));
CREATE TABLE parted (id int, amount money) PARTITION BY RANGE (id);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES FROM (0) TO (4);
CREATE TABLE parted_b PARTITION OF parted FOR VALUES FROM (4) TO (100);
INSERT INTO parted VALUES {VALUES};
CREATE INDEX ON parted (amount);
CREATE TABLE gen (id int PRIMARY KEY, amount money, doubled money GENERATED ALWAYS AS (amount * 2) STORED);
INSERT INTO gen (id, amount) VALUES (1, 1234.56), (2, -7.5), (3, NULL);
CREATE TABLE checked (id int PRIMARY KEY, amount money CHECK (amount > 0::numeric::money));
INSERT INTO checked VALUES (1, 1234.56), (2, 0.01);
CREATE UNIQUE INDEX ON plain (amount);
CREATE MATERIALIZED VIEW summed AS SELECT sum(amount) AS total, count(*) AS n FROM plain WHERE id < 5;
"""
CONTAINER_TABLES = [
    "plain",
    "arr",
    "dom",
    "comp",
    "parted",
    "parted_a",
    "parted_b",
    "gen",
    "checked",
    "summed",
]


@pytest.mark.parametrize("lc", ["de_DE.UTF-8", "ja_JP.UTF-8", "ar_BH.UTF-8"])
@pytest.mark.parametrize("way", ["memory", "psql"])
def test_money_in_arrays_domains_composites_partitions_matviews_arrives_exact(
    control_db, cluster, monkeypatch, lc, way
):
    if way == "psql":
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
        monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 0)
        monkeypatch.setattr(live, "BINARY_COPY", False)  # psql copies in text only
    name = "hm_c_" + lc[:2] + "_" + way
    url = _make_source(cluster, name, CONTAINERS, lc=lc)
    _world, job = _imported_as_source(control_db, url, CONTAINER_TABLES)
    assert job.facts.report["tables"]["public.plain"]["source_rows"] == 7


@pytest.mark.parametrize("lc", ["de_DE.UTF-8", "ja_JP.UTF-8"])
def test_money_with_lc_monetary_set_for_the_role_in_the_source_database(control_db, cluster, lc):
    url = _make_source(
        cluster,
        "hm_role_" + lc[:2],
        f"CREATE TABLE plain (id int PRIMARY KEY, amount money); INSERT INTO plain VALUES {VALUES};",
        role_lc=lc,
    )
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SHOW lc_monetary")
        assert cur.fetchone() == (lc,)
    conn.close()
    _imported_as_source(control_db, url, ["plain"])


@pytest.mark.parametrize("lc", ["de_DE.UTF-8", "ja_JP.UTF-8"])
def test_money_default_constant_from_a_source_in_another_locale(control_db, cluster, lc):
    """A money column's DEFAULT '12.50'::money is a Const: its text in the schema the
    import reads is written by cash_out in the source session's locale."""
    url = _make_source(
        cluster,
        "hm_def_" + lc[:2],
        "CREATE TABLE d (id int PRIMARY KEY, amount money DEFAULT '12.50'::money); INSERT INTO d (id) VALUES (1);",
        lc=lc,
    )
    world, _job = _imported_as_source(control_db, url, ["d"])
    conn = psycopg2.connect(_target(world))
    with conn, conn.cursor() as cur:
        cur.execute(
            "SET lc_monetary = 'C'; INSERT INTO d (id) VALUES (2); SELECT amount::text FROM d WHERE id = 2"
        )
        assert cur.fetchone() == ("$12.50",)
    conn.close()


@pytest.mark.parametrize("lc", ["de_DE.UTF-8", "ja_JP.UTF-8"])
def test_money_check_constant_from_a_source_in_another_locale(control_db, cluster, lc):
    url = _make_source(
        cluster,
        "hm_chk_" + lc[:2],
        "CREATE TABLE c (id int PRIMARY KEY, amount money CHECK (amount > '1000.25'::money)); INSERT INTO c VALUES (1, 1234.56);",
        lc=lc,
    )
    _imported_as_source(control_db, url, ["c"])


LEAK = """
CREATE TABLE prices (id int PRIMARY KEY, amount money);
INSERT INTO prices VALUES (1, 1234.56);
CREATE MATERIALIZED VIEW shown AS SELECT id, amount::text AS shown, current_setting('lc_monetary') AS lc FROM prices;
"""


def test_matview_refreshed_in_the_preview_sees_the_previews_own_lc_monetary(control_db, cluster):
    """The rest (matview refresh) runs on lane 0, which now has lc_monetary = 'C': a
    matview that prints money (or reads the setting) gets the lane's value, not what a
    refresh in the preview (or pg_restore) computes."""
    url = _make_source(cluster, "hm_leak", LEAK)
    world, job = _import(control_db, url)
    assert job.state == "completed", (job.error, job.last_stderr)
    conn = psycopg2.connect(_target(world))
    with conn, conn.cursor() as cur:
        cur.execute("SHOW lc_monetary")
        (own,) = cur.fetchone()
        cur.execute("SELECT lc FROM shown")
        landed = cur.fetchone()[0]
        cur.execute("REFRESH MATERIALIZED VIEW shown; SELECT lc FROM shown")
        refreshed = cur.fetchone()[0]
    conn.close()
    assert refreshed == own
    assert landed == own, f"matview refreshed with lc_monetary={landed!r}, the preview's is {own!r}"


def test_expression_index_built_on_a_lane_matches_queries_in_the_preview(control_db, cluster):
    """An index on an (IMMUTABLE-declared) function of money's text, built on a lane."""
    ddl = """
    CREATE FUNCTION shown(money) RETURNS text IMMUTABLE LANGUAGE sql AS 'SELECT $1::text';
    CREATE TABLE prices (id int PRIMARY KEY, amount money);
    INSERT INTO prices SELECT g, g * 1.01 FROM generate_series(1, 2000) g;
    CREATE INDEX prices_shown ON prices (shown(amount));
    """
    url = _make_source(cluster, "hm_idx", ddl)
    world, job = _import(control_db, url)
    assert job.state == "completed", (job.error, job.last_stderr)
    conn = psycopg2.connect(_target(world))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT shown(amount) FROM prices WHERE id = 7")
        (text,) = cur.fetchone()
        cur.execute("SET enable_seqscan = off; SET enable_bitmapscan = on")
        cur.execute("SELECT count(*) FROM prices WHERE shown(amount) = %s", (text,))
        assert cur.fetchone() == (1,)
    conn.close()


# Uploads: read in the preview's own locale, as pg_restore reads them.


def _dump(cluster: TempCluster, name: str) -> bytes:
    env = dict(os.environ, PGPASSWORD=cluster.password)
    return subprocess.run(
        ["pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", cluster.superuser, name],
        check=True,
        capture_output=True,
        env=env,
    ).stdout


def test_upload_of_a_c_locale_dump_reads_money_in_the_previews_locale(control_db, store, cluster):
    url = _make_source(
        cluster, "hm_up", CONTAINERS + LEAK.replace("prices", "prices2").replace("shown", "shown2")
    )
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, _dump(cluster, "hm_up"))
    assert job.state == "completed", (job.error, job.last_stderr)
    assert _rows(_target(world), CONTAINER_TABLES) == _rows(url, CONTAINER_TABLES)
    conn = psycopg2.connect(_target(world))
    with conn, conn.cursor() as cur:
        cur.execute("SHOW lc_monetary")
        (own,) = cur.fetchone()
        cur.execute("SELECT lc FROM shown2")
        assert cur.fetchone() == (own,)
    conn.close()


def test_upload_of_a_german_dump_fails_as_pg_restore_does(control_db, store, cluster):
    """A custom archive whose money pg_dump wrote in de_DE ('1.234,56 €') is not read in
    C: the upload fails, as pg_restore into the preview does (no silent other amount)."""
    _make_source(
        cluster,
        "hm_up_de",
        "CREATE TABLE p (id int PRIMARY KEY, amount money); INSERT INTO p VALUES (1, 1234.56);",
        lc="de_DE.UTF-8",
    )
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, _dump(cluster, "hm_up_de"))
    assert job.state == "failed", job.state
