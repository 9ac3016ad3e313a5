"""Hostile review of large live tables of short rows (bytes / reltuples under
stages.copy.live.SHORT_ROW_BYTES), of built-in types only, which travel through psql in
COPY's text format instead of binary: their rows arrive exactly, whatever the source's
database asks its sessions to print; an estimate the source forges never breaks the
copy; a table with an interval stays binary. COMMAND_MIN_BYTES is lowered so a small
table takes that way.

Found by the review and fixed: a NaN or Infinity reltuples failed the copy (int() of
it); the smallest interval, whose text PostgreSQL 15 cannot read back, failed the import
once its table went psql's way.
"""

from __future__ import annotations

import psycopg2
import pytest

import stages.copy.live as live
from stages.copy.catalog import read_tables
from tests.support import pg
from tests.support.copying import CopyRun, record_formats, rows_as_text, source_url

EXTREMES = r"""
CREATE TABLE public.ext (
    id int PRIMARY KEY, f4 float4, f8 float8, tz timestamptz, ts timestamp, d date, m money,
    c "char", b bytea, t text, n numeric, tt timetz, a float8[], ta timestamptz[], x xml, v tsvector,
    q tsquery, l pg_lsn, bits varbit, ip inet, p point, j json
);
SET TimeZone = 'UTC';
INSERT INTO public.ext VALUES
  (1, '-0', '-0', '4714-11-24 00:00:00+00 BC', '4714-11-24 00:00:00 BC', '4714-11-24 BC', '-92233720368547758.08',
   E'\\200', '\x005c0a', E'a\\b\tc\nd\r\\.\n\\.', 'NaN', '24:00:00-15:59', '{-0,NaN,Infinity,-Infinity,5e-324}',
   '{"4714-11-24 00:00:00+00 BC",infinity}', '<a x="1">&amp;</a>text', 'a:1A b:2B ''c d'':3',
   '!(a & b) <-> c:*', '0/0', B'101', '::ffff:1.2.3.4/128', '(1e-320,-0)', '{"k" : 1.0e1}'),
  (2, '1.4e-45', '1.7976931348623157e308', '294276-12-31 23:59:59.999999+00', '294276-12-31 23:59:59.999999',
   'infinity', '92233720368547758.07',
   E'\\377', '', repeat('x', 100), 'Infinity', '00:00:00+15:59', '{}', '{-infinity}', NULL, '', 'a',
   'FFFFFFFF/FFFFFFFF', B'', '10.0.0.0/8', '(NaN,Infinity)', 'null'),
  (3, 'NaN', '-Infinity', '1901-12-13 20:45:51.5+00', '2000-02-29 23:59:59.999999', '0001-01-01 BC', '0', E'\\001', NULL, '', '-0.0000000000000000000000001', NULL, NULL, NULL,
   '<?xml version="1.0"?><r/>', NULL, NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO public.ext (id, t, f8) SELECT g, 'x', g / 3.0 FROM generate_series(4, 3000) g;
ANALYZE public.ext;
"""


def rendered(dbname: str) -> list[tuple[str]]:
    """Every row as text, and its floats' exact bits."""
    return rows_as_text(
        dbname, "SELECT e::text, float8send(e.f8)::text, float4send(e.f4)::text FROM public.ext e ORDER BY id"
    )


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "DateStyle": "'SQL, DMY'",
            "IntervalStyle": "'iso_8601'",
            "extra_float_digits": "-15",
            "TimeZone": "'America/St_Johns'",
            "bytea_output": "'escape'",
            "lc_monetary": "'de_DE.UTF-8'",
            "xmloption": "document",
        },
    ],
    ids=["defaults", "source-database-display-settings"],
)
def test_a_short_rowed_table_of_built_in_extremes_arrives_exactly_through_psqls_text(
    scratch_db, tmp_path, monkeypatch, settings
):
    """Every built-in type's extreme and special values (an interval's apart: below) of a
    binary-eligible table that takes psql's text."""
    monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 1)
    formats = record_formats(monkeypatch)
    source, target = scratch_db("capysrc_short"), scratch_db("capytgt_short")
    pg.psql(source, text=EXTREMES)
    for name, value in settings.items():
        try:
            pg.admin(f"ALTER DATABASE {source} SET {name} = {value}")
        except psycopg2.Error:  # a locale this machine lacks
            pass
    result = CopyRun(source_url(source), target, tmp_path, by_command=True).run()
    assert formats == {"public.ext": False}  # psql's text, not binary
    assert result.source_counts == result.target_counts == {"public.ext": 3000}
    assert rendered(target) == rendered(source)


@pytest.mark.parametrize("forged", ["NaN", "Infinity", "1e38"])
def test_a_forged_row_estimate_does_not_break_the_copy(scratch_db, tmp_path, monkeypatch, forged):
    """The source's owner may be its superuser, and pg_class.reltuples is only an estimate
    (a float4): whatever it says, the table is read and copied, never an error of ours
    (NaN and Infinity are no estimate)."""
    monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 1)
    source, target = scratch_db("capysrc_short"), scratch_db("capytgt_short")
    pg.psql(
        source,
        text="CREATE TABLE public.t (id bigint PRIMARY KEY, n int); "
        "INSERT INTO public.t SELECT g, g FROM generate_series(1, 1000) g; ANALYZE public.t;",
    )
    pg.admin(f"UPDATE pg_class SET reltuples = '{forged}' WHERE oid = 'public.t'::regclass", dbname=source)
    conn = psycopg2.connect(pg.url_for(source))
    try:
        with conn.cursor() as cur:
            cur.execute("SET search_path = pg_catalog, pg_temp")
        [table] = read_tables(conn)
    finally:
        conn.close()
    assert table.key == "public.t"
    assert table.rows == (int(1e38) if forged == "1e38" else 0)
    result = CopyRun(source_url(source), target, tmp_path, by_command=True).run()
    assert result.source_counts == result.target_counts == {"public.t": 1000}


@pytest.mark.parametrize("column", ["span interval", "spans interval[]"])
@pytest.mark.parametrize("short_row_bytes", [0, live.SHORT_ROW_BYTES], ids=["binary", "short-rows"])
def test_an_interval_whose_text_postgres_cannot_read_back_still_arrives(
    scratch_db, tmp_path, monkeypatch, short_row_bytes, column
):
    """The smallest interval time (INT64_MIN microseconds) prints as
    '-2562047788:00:54.775808', which interval input refuses ("invalid input syntax").
    Binary COPY carries it; psql's text cannot: a table with an interval (or an array of
    them) stays binary however short its rows (SourceTable.keeps_binary)."""
    monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 1)
    monkeypatch.setattr(live, "SHORT_ROW_BYTES", short_row_bytes)
    formats = record_formats(monkeypatch)
    source, target = scratch_db("capysrc_short"), scratch_db("capytgt_short")
    smallest = "interval '-2562047788 hours' - interval '54.775808 s'"
    value = smallest if column.startswith("span ") else f"ARRAY[{smallest}, NULL]"
    pg.psql(
        source,
        text=f"CREATE TABLE public.spans (id bigint PRIMARY KEY, {column}); "
        "INSERT INTO public.spans (id) SELECT g FROM generate_series(1, 2000) g; "
        f"UPDATE public.spans SET {column.split()[0]} = {value} WHERE id = 1; "
        "ANALYZE public.spans;",
    )
    result = CopyRun(source_url(source), target, tmp_path, by_command=True).run()
    assert formats == {"public.spans": True}
    assert result.source_counts == result.target_counts == {"public.spans": 2000}
    query = "SELECT string_agg(s::text, ',' ORDER BY s.id) FROM public.spans s"
    assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source)
