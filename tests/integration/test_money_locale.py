"""A live source whose `lc_monetary` is not the preview's. `money` is the one type whose
text depends on a locale: '1.234,56 €' in de_DE is not money in the C locale (pg_dump |
pg_restore fails on it), and a locale that writes no decimals could be read back as
another amount. The copy prints and reads money in the C locale's format on both
sides, so the stored amounts arrive exact, whichever locale each side has."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

import stages.copy.live as live
import stages.copy.stream as stream
from tests.support.imports import run_import
from tests.support.pgcluster import TempCluster, cluster_with_locales
from tests.support.world import make_world

MONEY = """
CREATE TABLE prices (id int PRIMARY KEY, amount money, note text);
INSERT INTO prices VALUES
    (1, 1234.56, 'thousands'), (2, -7.5, 'negative'), (3, NULL, 'null'), (4, 0, 'zero'),
    (5, 92233720368547758.07, 'largest'), (6, -92233720368547758.08, 'smallest'), (7, 0.01, 'a cent');
"""


@pytest.fixture(scope="module")
def german_source() -> Iterator[TempCluster]:
    """A cluster that knows de_DE.UTF-8 (tests/support/pgcluster.py), holding `moneysrc`
    with lc_monetary de_DE.UTF-8."""
    with cluster_with_locales(["de_DE.UTF-8"]) as cluster:
        admin = psycopg2.connect(cluster.url())
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE moneysrc")
            cur.execute("ALTER DATABASE moneysrc SET lc_monetary = 'de_DE.UTF-8'")
        admin.close()
        conn = psycopg2.connect(cluster.url("moneysrc"))
        with conn, conn.cursor() as cur:
            cur.execute(MONEY)
            cur.execute("SELECT amount::text FROM prices WHERE id = 1")
            assert cur.fetchone() == ("1.234,56 €",)  # the source writes money in German
        conn.close()
        yield cluster


def _amounts(url: str) -> list[tuple]:
    """Each row's amount in cents (money's stored integer, whatever the locale prints)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, (amount::numeric * 100)::bigint, note FROM prices ORDER BY id")
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("way", ["memory", "pipe", "pipe-text", "psql"])
def test_money_from_a_source_with_another_lc_monetary_arrives_exact(
    control_db, german_source, monkeypatch, way
):
    """Through each way a table's rows travel (read whole into memory, the pipe, psql),
    in COPY's binary format (money is a built-in type) and its text format ("-text",
    psql), which prints money in the session's locale."""
    if way != "memory":
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
    if way in ("psql", "pipe-text"):
        monkeypatch.setattr(live, "BINARY_COPY", False)
    if way == "psql":
        monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 0)
    world = make_world(control_db)
    job = run_import(control_db, world, german_source.url("moneysrc"))
    assert job.state == "completed", (job.error, job.last_stderr)
    target = f"postgresql://postgres@127.0.0.1:5432/{world.project.database_name}"
    assert _amounts(target) == _amounts(german_source.url("moneysrc"))
    assert job.facts.report["tables"]["public.prices"]["source_rows"] == 7
