"""A live copy moves the rows of tables of built-in types in COPY's binary format
(stages.copy.live.BINARY_COPY), every other table in the text format; both arrive exactly.

Binary COPY is only safe for types whose binary form both servers read alike: a type of
PostgreSQL's own with binary I/O, between servers of one major version and encoding
(an array's elements and a record's fields carry their type's oid, which differs between
clusters for a user's type; aclitem has no binary I/O at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg2
import pytest

import stages.copy.live as live
import stages.copy.stream as stream
from stages.copy.catalog import read_tables
from stages.copy.live import _binary_format
from stages.copy.stream import Flow, SourceTable, _Sink
from tests.support import pg
from tests.support.copying import TRICKY, CopyRun, record_formats, rows_as_text, source_url

KINDS = r"""
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN public.positive AS int CHECK (VALUE > 0);
CREATE TYPE public.pair AS (a int, b text);
CREATE TABLE public.builtin (id int PRIMARY KEY, tags int[], names text[], at timestamptz, m money, b bytea,
                             c "char", v varchar(5), j jsonb, n numeric(8, 2), f float4);
CREATE TABLE public.with_enum (id int, m public.mood);
CREATE TABLE public.with_enum_array (id int, ms public.mood[]);
CREATE TABLE public.with_domain (id int, p public.positive);
CREATE TABLE public.with_composite (id int, p public.pair);
CREATE TABLE public.with_acl (id int, a aclitem);
CREATE TABLE public.with_generated (id int, twice int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE public.without_columns ();
INSERT INTO public.builtin VALUES
    (1, '{1,NULL,3}', '{"a b",NULL,"c\"d"}', '2024-02-29 12:00:00+01', '12.34', '\x00ff', 'x', 'abc', '{"k": [1]}',
     123456.78, 'NaN'),
    (2, NULL, '{}', 'infinity', '-92233720368547758.08', '', '\001', '', 'null', -0.01, '-Infinity');
INSERT INTO public.with_enum VALUES (1, 'happy'), (2, NULL);
INSERT INTO public.with_enum_array VALUES (1, '{sad,ok}');
INSERT INTO public.with_domain VALUES (1, 7);
INSERT INTO public.with_composite VALUES (1, ROW(1, 'x')), (2, NULL);
INSERT INTO public.with_acl VALUES (1, 'postgres=r/postgres');
INSERT INTO public.with_generated (id) VALUES (1), (2);
INSERT INTO public.without_columns DEFAULT VALUES;
"""

BINARY = {"public.builtin", "public.with_generated"}


def test_only_tables_of_built_in_types_with_binary_io_are_marked_binary(scratch_db):
    source = scratch_db("capysrc_bin")
    pg.psql(source, text=KINDS)
    conn = psycopg2.connect(pg.url_for(source))
    try:
        with conn.cursor() as cur:
            cur.execute("SET search_path = pg_catalog, pg_temp")
        marked = {t.key: t.binary for t in read_tables(conn)}
    finally:
        conn.close()
    assert marked == {
        "public.builtin": True,
        "public.with_generated": True,  # its generated column is not copied
        "public.with_enum": False,
        "public.with_enum_array": False,
        "public.with_domain": False,
        "public.with_composite": False,
        "public.with_acl": False,
        "public.without_columns": False,
    }


@pytest.fixture
def formats(monkeypatch) -> dict[str, bool]:
    """The format each table's rows travelled in (True: binary), by table."""
    return record_formats(monkeypatch)


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "pipe"])
def test_every_kind_of_table_arrives_exactly_each_in_its_format(
    scratch_db, tmp_path, monkeypatch, formats, memory
):
    if not memory:
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
    source, target = scratch_db("capysrc_bin"), scratch_db("capytgt_bin")
    pg.psql(source, text=KINDS)
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert result.source_counts == result.target_counts == pg.row_counts(source)
    assert {key for key, binary in formats.items() if binary} == BINARY
    for table in pg.row_counts(source):
        assert _rows(target, table) == _rows(source, table), table


def test_tricky_values_arrive_exactly_in_the_binary_format(scratch_db, tmp_path, formats):
    """The values whose text form depends on the session (test_copy_by_command), in
    the binary format, from a source whose database asks for other display settings."""
    source, target = scratch_db("capysrc_bin"), scratch_db("capytgt_bin")
    pg.psql(
        source,
        text=TRICKY
        + f"""
        ALTER DATABASE {source} SET DateStyle = 'SQL, DMY';
        ALTER DATABASE {source} SET extra_float_digits = -3;
        ALTER DATABASE {source} SET IntervalStyle = 'sql_standard';
        ALTER DATABASE {source} SET TimeZone = 'Pacific/Chatham';
        """,
    )
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.tricky": True}
    assert result.source_counts == result.target_counts == {"public.tricky": 4}
    assert rows_as_text(target) == rows_as_text(source)


def test_switched_off_every_table_travels_as_text(scratch_db, tmp_path, monkeypatch, formats):
    monkeypatch.setattr(live, "BINARY_COPY", False)
    source, target = scratch_db("capysrc_bin"), scratch_db("capytgt_bin")
    pg.psql(source, text=KINDS)
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert result.source_counts == result.target_counts
    assert formats and not any(formats.values())


@dataclass
class _Server:
    """What _binary_format reads of a session."""

    server_version: int
    encoding: str

    def get_parameter_status(self, name: str) -> str | None:
        return self.encoding if name == "server_encoding" else None


@pytest.mark.parametrize(
    ("preview", "binary"),
    [
        (_Server(150020, "UTF8"), True),
        (_Server(150003, "UTF8"), True),  # another minor release
        (_Server(160001, "UTF8"), False),  # another major version
        (_Server(140011, "UTF8"), False),
        (_Server(150020, "LATIN1"), False),  # another encoding: a "char" is its raw byte
    ],
)
def test_binary_only_between_servers_of_one_major_version_and_encoding(preview, binary):
    loading = _loading()
    table = SourceTable("public.t", "public", "t", ("id",), 100, 1, binary=True)
    chosen = loading._format(table, live.Lane(preview), psql=True)  # type: ignore[arg-type]
    assert chosen.binary is binary
    assert chosen.key == table.key and chosen.oid == table.oid
    # A table whose types do not allow it never travels in binary.
    assert (
        loading._format(
            SourceTable("public.u", "public", "u", ("id",), 100, 2), live.Lane(preview), psql=True
        ).binary
        is False
    )


def _loading() -> live._LiveLoading:
    loading = object.__new__(live._LiveLoading)
    loading._source_format = _binary_format(_Server(150020, "UTF8"))  # type: ignore[arg-type]
    return loading


@pytest.mark.parametrize(
    ("size", "rows", "psql", "binary"),
    [
        (live.COMMAND_MIN_BYTES, live.COMMAND_MIN_BYTES // 44, True, False),  # narrow's rows: psql's text
        (live.COMMAND_MIN_BYTES, live.COMMAND_MIN_BYTES // 44, False, True),  # no psql: binary still
        (live.COMMAND_MIN_BYTES, live.COMMAND_MIN_BYTES // 134, True, True),  # events' rows
        (
            live.COMMAND_MIN_BYTES - 1,
            live.COMMAND_MIN_BYTES // 44,
            True,
            True,
        ),  # small: this process either way
        (live.COMMAND_MIN_BYTES, 0, True, True),  # never analyzed: no estimate
    ],
)
def test_a_large_table_of_short_rows_goes_psqls_way_in_text(size, rows, psql, binary):
    """Binary rows cross the worker with a Python call each; a large table of short rows
    (stages.copy.live.SHORT_ROW_BYTES) costs less as psql's text."""
    table = SourceTable("public.t", "public", "t", ("id",), size, 1, binary=True, rows=rows)
    preview = live.Lane(_Server(150020, "UTF8"))  # type: ignore[arg-type]
    assert _loading()._format(table, preview, psql=psql).binary is binary


def test_short_rows_and_long_rows_of_large_tables_each_arrive_exactly(
    scratch_db, tmp_path, monkeypatch, formats
):
    """Both tables large enough for psql (the limit lowered): the one of short rows travels
    in text through psql, the one of long rows in binary through the worker."""
    monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 1)
    source, target = scratch_db("capysrc_bin"), scratch_db("capytgt_bin")
    pg.psql(
        source,
        text="""
        CREATE TABLE public.short (id bigint PRIMARY KEY, n int);
        INSERT INTO public.short SELECT g, g % 7 FROM generate_series(1, 5000) g;
        CREATE TABLE public.long (id bigint PRIMARY KEY, body text, at timestamptz);
        INSERT INTO public.long SELECT g, repeat(md5(g::text), 8), '2024-01-01'::timestamptz + g * interval '1 s'
            FROM generate_series(1, 2000) g;
        ANALYZE;
        """,
    )
    result = CopyRun(source_url(source), target, tmp_path, by_command=True).run()
    assert formats == {"public.short": False, "public.long": True}
    assert result.source_counts == result.target_counts == {"public.short": 5000, "public.long": 2000}
    for table in ("public.short", "public.long"):
        assert _rows(target, table) == _rows(source, table), table


def test_binary_rows_are_counted_for_the_progress_while_they_stream():
    """No newline ends a binary row: each write psycopg2 makes is counted as it passes
    (the progress's rows per second) but the first, since the format's trailer is a
    write of its own (the count never runs ahead of the rows); the COPY's own count is
    the table's once it is in."""
    read_fd, write_fd = os.pipe()
    flow = Flow()
    sink = _Sink(write_fd, flow)
    for row in (b"a", b"bb", b"ccc"):
        sink.write(row)
    sink.close()
    with os.fdopen(read_fd, "rb") as fh:
        assert fh.read() == b"abbccc"
    assert flow.rows == 2
    # A whole table's count, never ahead of its rows: test_hostile_binary_copy.py.


def _rows(dbname: str, table: str) -> list[tuple[str]]:
    conn = psycopg2.connect(pg.url_for(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET lc_monetary = 'C'"
            )
            schema, name = table.split(".")
            cur.execute(f'SELECT t::text FROM "{schema}"."{name}" t ORDER BY 1')
            return cur.fetchall()
    finally:
        conn.close()
