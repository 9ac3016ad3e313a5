"""Hostile review of f84d809 (a live copy moves the rows of tables of built-in types in
COPY's binary format) and f1d88f6 (CAPY_MAINTENANCE_WORK_MEM defaults to 64MB).

Every comparison reads both databases with the same fixed display settings
(DISPLAY), so two tables print the same text exactly when they hold the same values.

Found by the review and fixed (the text format, BINARY_COPY off, is each one's control):
- reg* columns (regclass, regtype, regprocedure, regnamespace, regconfig, … and arrays)
  were marked binary; their binary form is a bare OID, so the preview held the source's
  OIDs (dangling, or naming another object), and a generated column computed from one
  failed the import ("cache lookup failed for text search configuration …");
- an empty int2vector/oidvector (pg_proc.proargtypes of a function of no arguments)
  is refused by int2vectorrecv/oidvectorrecv: the import failed ("invalid oidvector data");
- the progress counted the binary trailer's write as a row (one row too many while a
  table streamed);
- (older, both formats) a count mismatch came out as a bare exception, retried as an
  internal error: it is a PermanentError now.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import sql

import stages.copy.live as live
import stages.copy.stream as stream
from stages.copy.catalog import read_tables
from stages.copy.stream import CountMismatch, Flow, SourceTable, stream_table
from stages.errors import PermanentError
from tests.support import pg
from tests.support.copying import CopyRun, record_formats, source_url
from tests.support.imports import run_import
from tests.support.world import make_world

DISPLAY = (
    "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; "
    "SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'; "
    "SET search_path = pg_catalog; SET xmloption = content"
)


def rows(dbname: str, table: str) -> list[tuple]:
    """Every row of `table` as text (cut at 4000 characters, with the md5 of the whole)."""
    conn = psycopg2.connect(pg.url_for(dbname))
    conn.set_client_encoding("UTF8")  # (psycopg2 decodes by what it set, not by a SET)
    try:
        with conn.cursor() as cur:
            cur.execute(DISPLAY)
            schema, name = table.split(".")
            cur.execute(
                sql.SQL(
                    "SELECT left(r_o_w::text, 4000), md5(convert_to(r_o_w::text, 'UTF8')) FROM {} r_o_w ORDER BY 2"
                ).format(sql.Identifier(schema, name))
            )
            return cur.fetchall()
    finally:
        conn.close()


def assert_same_rows(source: str, target: str, tables: list[str] | None = None) -> None:
    tables = tables if tables is not None else sorted(pg.row_counts(source))
    for table in tables:
        assert rows(target, table) == rows(source, table), table


def marked(dbname: str) -> dict[str, bool]:
    conn = psycopg2.connect(pg.url_for(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute("SET search_path = pg_catalog, pg_temp")
        return {t.key: t.binary for t in read_tables(conn)}
    finally:
        conn.close()


@pytest.fixture
def formats(monkeypatch) -> dict[str, bool]:
    """The format each table's rows travelled in (True: binary), by table."""
    return record_formats(monkeypatch)


@pytest.fixture(params=["memory", "pipe"])
def way(request, monkeypatch) -> str:
    """Small tables are read into memory; any table may stream through the pipe."""
    if request.param == "pipe":
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
    return request.param


@pytest.fixture
def encoded_db() -> Iterator:
    """Databases of a given encoding (template0, C locale), dropped after the test."""
    made: list[str] = []

    def make(prefix: str, encoding: str) -> str:
        name = pg.scratch_name(prefix)
        pg.admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C'").format(
                sql.Identifier(name), sql.Literal(encoding)
            )
        )
        made.append(name)
        return name

    yield make
    for name in made:
        pg.drop_db(name)


# --------------------------------------------------------------------------------------
# reg* types: built-in base types with binary I/O whose binary form is a bare OID.

REFS = r"""
CREATE SCHEMA app;
CREATE TABLE app.pointed (id int);
CREATE TYPE app.mood AS ENUM ('a', 'b');
CREATE FUNCTION app.f(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE TEXT SEARCH CONFIGURATION app.conf (COPY = pg_catalog.simple);
CREATE TABLE public.refs (
    id int PRIMARY KEY,
    rel regclass,
    typ regtype,
    fn regprocedure,
    ns regnamespace,
    cfg regconfig,
    rels regclass[]
);
INSERT INTO public.refs VALUES
    (1, 'app.pointed', 'app.mood', 'app.f(int)', 'app', 'app.conf', '{app.pointed,pg_catalog.pg_class}'),
    (2, 'pg_catalog.pg_class', 'int4', 'pg_catalog.now()', 'pg_catalog', 'pg_catalog.simple', NULL);
"""


def test_tables_of_reg_types_are_not_marked_binary(scratch_db):
    """FIXED: regclass, regtype, regprocedure, regnamespace, regconfig (and their arrays)
    are base types of PostgreSQL's own with binary send/receive, so the catalog marks
    the table binary; but their binary form is the referenced object's OID, which is
    not the same object (or no object) in the preview: pg_dump copies them as names."""
    source = scratch_db("capysrc_hbin")
    pg.psql(source, text=REFS)
    assert marked(source) == {"app.pointed": True, "public.refs": False}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_reg_values_still_name_the_same_objects_in_the_preview(
    scratch_db, tmp_path, monkeypatch, formats, binary
):
    """FIXED (binary): the preview's refs hold the source's OIDs (printed as bare numbers,
    or as whatever object has that OID in the preview). The text way (BINARY_COPY off)
    is the control: it keeps the names."""
    monkeypatch.setattr(live, "BINARY_COPY", binary)
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(source, text=REFS)
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert result.source_counts == result.target_counts
    assert rows(target, "public.refs") == rows(source, "public.refs")


def test_live_import_through_the_service_keeps_reg_values(control_db, scratch_db):
    """FIXED, end to end: a whole live import (project role, real pipeline) of a table
    holding regclass/regtype/regprocedure values completes, reports equal counts, and
    the project's database holds dangling OIDs instead of the named objects."""
    source = scratch_db("capysrc_hbin")
    pg.psql(source, text=REFS)
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", (job.error, job.last_stderr)
    project = world.project.database_name
    assert rows(project, "public.refs") == rows(source, "public.refs")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_live_import_of_a_regconfig_column_feeding_a_generated_tsvector(
    control_db, scratch_db, monkeypatch, binary
):
    """FIXED (binary; text is the control), end to end: the common full-text pattern (a regconfig column per row, a
    stored generated tsvector computed from it) with a configuration of the user's: the
    preview computes the generated column from the source's OID of the configuration
    (binary), which names nothing in the preview."""
    monkeypatch.setattr(live, "BINARY_COPY", binary)
    source = scratch_db("capysrc_hbin")
    pg.psql(
        source,
        text="""
        CREATE TEXT SEARCH CONFIGURATION public.mine (COPY = pg_catalog.english);
        CREATE TABLE public.docs (
            id int PRIMARY KEY, cfg regconfig NOT NULL, body text,
            tsv tsvector GENERATED ALWAYS AS (to_tsvector(cfg, body)) STORED);
        INSERT INTO public.docs (id, cfg, body) VALUES (1, 'public.mine', 'The running foxes'),
            (2, 'pg_catalog.simple', 'The running foxes');
        """,
    )
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", (job.error, job.last_stderr)
    assert rows(world.project.database_name, "public.docs") == rows(source, "public.docs")


# --------------------------------------------------------------------------------------
# Which tables are marked binary (things that held).

KINDS_CATALOG = r"""
CREATE EXTENSION citext;
CREATE EXTENSION hstore;
CREATE DOMAIN public.positive AS int CHECK (VALUE > 0);
CREATE DOMAIN public.ints AS int[];
CREATE TABLE public.ranges (id int, r int4range, t tstzrange);
CREATE TABLE public.multiranges (id int, r int4multirange);
CREATE TABLE public.domain_array (id int, a public.positive[]);
CREATE TABLE public.array_domain (id int, a public.ints);
CREATE TABLE public.with_citext (id int, c citext);
CREATE TABLE public.with_hstore (id int, h hstore);
CREATE TABLE public.with_citext_array (id int, c citext[]);
CREATE TABLE public.vectors (id int, a int2vector, b oidvector);
CREATE TABLE public.internals (id int, c "char", n name, l pg_lsn, s txid_snapshot);
CREATE TABLE public.acls (id int, a aclitem[]);
CREATE TABLE public.geometry (p point, g polygon, c circle, l line, b box, pa path, s lseg);
CREATE TABLE public.dropped_odd (id int, c citext, v text);
ALTER TABLE public.dropped_odd DROP COLUMN c;
CREATE TABLE public.generated_odd (id int, c citext GENERATED ALWAYS AS (id::text::citext) STORED);
"""


def test_only_built_in_base_types_are_marked_binary_ranges_extensions_and_domains_stay_text(scratch_db):
    source = scratch_db("capysrc_hbin")
    pg.psql(source, text=KINDS_CATALOG)
    assert marked(source) == {
        "public.ranges": False,  # typtype 'r'
        "public.multiranges": False,  # typtype 'm'
        "public.domain_array": False,
        "public.array_domain": False,
        "public.with_citext": False,
        "public.with_hstore": False,
        "public.with_citext_array": False,
        "public.acls": False,  # aclitem has no binary I/O (aclitem[] has: array_send)
        "public.vectors": False,  # their binary receive refuses an empty value
        "public.internals": True,
        "public.geometry": True,
        "public.dropped_odd": True,  # its citext column is dropped
        "public.generated_odd": True,  # its citext column is generated, not copied
    }


# --------------------------------------------------------------------------------------
# Exactness of the binary way, type by type.

KINDS = r"""
CREATE TABLE public.kinds (
    id int PRIMARY KEY,
    c "char", nm name, tv tsvector, tq tsquery, x xml, lsn pg_lsn, snap txid_snapshot, psnap pg_snapshot,
    i2v text, oidv text,  -- (int2vector and oidvector travel as text: test_an_empty_int2vector_or_oidvector_arrives)
    pt point, pg polygon, cir circle, ln line, bx box, pa path, ls lseg,
    ip inet, cn cidr, mac macaddr, mac8 macaddr8, u uuid, j json, jb jsonb, jp jsonpath, m money,
    f4 float4, f8 float8, n numeric, n52 numeric(5, 2), d date, tsp timestamp(2), tstz timestamptz(0),
    iv interval, ivd interval day to second(1), iy interval year to month, tm time(3), tz timetz,
    b3 bit(3), vb varbit, bp bpchar(4), vc varchar(3), bo bool, ti tid, xi xid, x8 xid8, cmd cid, o oid,
    rc refcursor, by bytea, tx text,
    a2 int[], alb int[], atext text[], apt point[], achar "char"[], aname name[], auuid uuid[],
    aiv interval[], abit bit(3)[], avc varchar(3)[], anum numeric(5, 2)[], ajb jsonb[], axml xml[],
    ats tsvector[], af8 float8[]
);
INSERT INTO public.kinds VALUES
(1, 'x', 'ünïcødé name', 'a:1A fat:2,3B cat:4C,5D', '!(a & b) <-> c:*', '<a x="1">é &amp; <b/></a>',
 '16/B374D848', '10:20:10,14,15', '10:20:10,14,15', '1 2 3', '1 2 4294967295',
 '(1.5,-2)', '((0,0),(1,1),(1,0))', '<(1,1),5>', '{1,-1,0}', '(2,2),(0,0)', '[(0,0),(1,1)]', '[(0,0),(1,1)]',
 '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '{"a": [1, 2.50, "é"], "a": 2}', '{"k": "v\n", "n": [1, 2.5e10], "z": null}', '$.a[*] ? (@ > 1)', '-92233720368547758.08',
 1.17549435e-38, 2.2250738585072014e-308, 12345678901234567890.123456789012345678901234567890, 123.45,
 '4713-01-01 BC', '294276-12-31 23:59:59.99', '1999-12-31 23:59:59.5+14', '-178000000 years 3 mons -2 days 04:05:06.789',
 '1 day 00:00:01.15', '3 years 11 mons', '24:00:00', '00:00:00.123456+15:59',
 B'101', B'', 'é', 'abc', true, '(4294967295,65535)', '4294967295', '18446744073709551615', '4294967295', 4294967295,
 'cursor "x"', '\x00ff10', E'line\nbreak\ttab\\back\rcr ✓ 𝄞',
 '{1,NULL,3}', '[0:2]={1,2,3}', '{"",NULL,"a\"b","{}","NULL", "a,b"}', '{"(1,2)","(3,4)"}', '{a,b}', '{x,ü}',
 '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}', '{"1 day","-1 mon"}', '{101,010}', '{abc,""}', '{1.25,NaN}',
 '{"{\"a\": 1}",null}', '{"<a/>","text"}', '{"a b","c:1"}', '{NaN,Infinity,-Infinity,-0}'),
(2, E'\\351', repeat('é', 31), '', '', '', '0/0', '1:1:', '1:1:', '0', '0',
 '(NaN,Infinity)', '((0,0))', '<(0,0),0>', '{0,1,0}', '(0,0),(0,0)', '((0,0),(1,1),(2,0))', '[(0,0),(0,0)]',
 '::1/128', '::/0', '00:00:00:00:00:00', '00:00:00:00:00:00:00:00', '00000000-0000-0000-0000-000000000000',
 '""', '"\u00e9"', '$', '0',
 'NaN', '-0', 'NaN', 'NaN', 'infinity', '-infinity', 'infinity', '0', '-0.05', '-1 mon', '00:00:00', '24:00:00-15:59',
 B'000', B'1010101010101010101', '', '', false, '(0,0)', '0', '0', '0', 0,
 '', '', '',
 '{}', '[-5:-4][2:3]={{1,2},{3,4}}', '{{a,b},{c,NULL}}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}'),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 '{NULL,NULL}', '{{NULL},{NULL}}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}',
 '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}'),
(4, E'\\001', '', 'x', 'x', '<?xml version="1.0" standalone="yes"?><r>é</r>', 'FFFFFFFF/FFFFFFFF', '1:2:1', '1:2:1', '-1 0 32767', '0',
 '(-0,0)', '((1,1),(2,2))', '<(1,2),0.5>', '{1,0,-3}', '(1,1),(1,1)', '[(1,1)]', '[(1,2),(3,4)]',
 '255.255.255.255', '192.168.0.0/16', 'ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff:ff:ff', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
 '[]', '[]', 'strict $.a', '92233720368547758.07',
 'Infinity', '-Infinity', '-Infinity', '-999.99', '5874897-12-31', '1999-01-08 04:05:06.01', '-infinity',
 '-0.000001 seconds', '-1 day -00:00:00.1', '-178000000 years', '23:59:59.999', '12:00:00-00:00:01',
 B'111', B'1', 'abcd', 'é✓𝄞', NULL, '(1,1)', '1', '1', '1', 1,
 'c', '\x', '\N',
 '{2147483647,-2147483648}', '[1000000:1000001]={1,2}', '{"\\\\","\t"}', '{"(NaN,-0)"}', E'{"\\\\351"}', '{""}',
 '{}', '{"178000000 years","-00:00:00.000001"}', '{111}', '{é✓𝄞}', '{-999.99}', '{"[]"}', '{"<?xml version=\"1.0\" standalone=\"no\"?><r/>"}', '{""}', '{1.7976931348623157e308}');
-- Large values, stored out of line (TOAST), compressed and not.
INSERT INTO public.kinds (id, by, tx, atext, jb)
SELECT 10 + g, decode(string_agg(lpad(to_hex((g * 7919 + i * 25) % 256), 2, '0'), ''), 'hex'),
       repeat('é✓', 100000 * g), ARRAY[repeat('y', 5000), NULL], jsonb_build_object('big', repeat('z', 100000))
FROM generate_series(1, 3) g, generate_series(1, 200000) i GROUP BY g;
"""


def test_every_kind_of_built_in_value_arrives_exactly_in_binary(scratch_db, tmp_path, formats, way):
    """HELD: "char" (high-bit byte), name, tsvector/tsquery, xml (with a declaration),
    pg_lsn, snapshots, int2vector/oidvector, geometry, network types, uuid, json/jsonb/
    jsonpath, money, float NaN/±Infinity/-0, numeric NaN/±Infinity, BC and infinite
    dates/timestamps, typmods (numeric(p,s), timestamp(p), interval fields, time(p),
    bit(n), varchar(n), bpchar(n)), tid/xid/xid8/cid/oid, arrays with other lower bounds
    and dimensions, NULLs everywhere, empty strings, toasted bytea/text/jsonb."""
    _copies_kinds_exactly(scratch_db, tmp_path, formats)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
@pytest.mark.parametrize("kind", ["int2vector", "oidvector"])
def test_an_empty_int2vector_or_oidvector_arrives(
    scratch_db, tmp_path, monkeypatch, formats, way, kind, binary
):
    """FIXED: an empty int2vector/oidvector (e.g. pg_proc.proargtypes of a function
    without arguments, kept in a table of the user's) is sent by array_send as an array
    of no dimensions, which int2vectorrecv/oidvectorrecv refuse ("invalid int2vector
    data"): the whole import failed in binary. Such a table now travels as text."""
    monkeypatch.setattr(live, "BINARY_COPY", binary)
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text=f"""
        CREATE TABLE public.vec (id int, v {kind});
        INSERT INTO public.vec VALUES (1, '1 2'), (2, ''), (3, NULL);
        CREATE TABLE public.procs AS SELECT p.oid::int AS id, p.proargtypes FROM pg_catalog.pg_proc p
            WHERE p.proname IN ('now', 'pi', 'random');
        """,
    )
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.vec": False, "public.procs": False}
    assert result.source_counts == result.target_counts == {"public.vec": 3, "public.procs": 3}
    assert_same_rows(source, target)


def _wide_table(columns: int) -> str:
    defs = ", ".join(f"c{i} {'int' if i % 2 else 'text'}" for i in range(columns))
    values = ", ".join(
        (
            f"CASE WHEN g % {i % 7 + 2} = 0 THEN NULL ELSE g * {i} END"
            if i % 2
            else f"chr(65 + (g + {i}) % 26)"
        )
        for i in range(columns)
    )
    return f"""
    CREATE TABLE public.wide (id int GENERATED ALWAYS AS IDENTITY, {defs}, doubled int GENERATED ALWAYS AS (c1 * 2) STORED);
    INSERT INTO public.wide ({", ".join(f"c{i}" for i in range(columns))}) SELECT {values} FROM generate_series(1, 60) g;
    ALTER TABLE public.wide DROP COLUMN c500, DROP COLUMN c501, DROP COLUMN c2;
    """


def test_a_table_of_1200_columns_with_dropped_generated_and_identity_columns_arrives_exactly(
    scratch_db, tmp_path, formats, way
):
    """HELD: the column list leaves out the dropped and generated ones in both formats."""
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(source, text=_wide_table(1200))
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.wide": True}
    assert result.source_counts == result.target_counts == {"public.wide": 60}
    assert_same_rows(source, target)


PARTITIONS = r"""
CREATE TABLE public.p (id int, gone text, at date, v text, n numeric) PARTITION BY RANGE (at);
ALTER TABLE public.p DROP COLUMN gone;
CREATE TABLE public.p_a (n numeric, junk int, v text, at date, id int);
ALTER TABLE public.p_a DROP COLUMN junk;
ALTER TABLE public.p ATTACH PARTITION public.p_a FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE TABLE public.p_b PARTITION OF public.p FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
INSERT INTO public.p SELECT g, date '2020-01-01' + g, 'v' || g, g / 7.0 FROM generate_series(1, 700) g;
CREATE TABLE public.parent (id int, v text);
CREATE TABLE public.kid (extra numeric, v text, id int);
ALTER TABLE public.kid INHERIT public.parent;
CREATE TABLE public.grandkid (deep bool) INHERITS (public.kid);
INSERT INTO public.parent SELECT g, 'p' || g FROM generate_series(1, 50) g;
INSERT INTO public.kid SELECT g / 3.0, 'k' || g, g FROM generate_series(1, 50) g;
INSERT INTO public.grandkid SELECT g / 3.0, 'g' || g, g, g % 2 = 0 FROM generate_series(1, 50) g;
CREATE TABLE public.secret (id int, owner text);
ALTER TABLE public.secret ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.secret FORCE ROW LEVEL SECURITY;
CREATE POLICY nobody ON public.secret USING (false);
INSERT INTO public.secret SELECT g, 'o' FROM generate_series(1, 30) g;
"""


def test_partitions_children_of_other_column_orders_and_rls_tables_arrive_exactly(
    scratch_db, tmp_path, formats, way
):
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(source, text=PARTITIONS)
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert set(formats) == {
        "public.p_a",
        "public.p_b",
        "public.parent",
        "public.kid",
        "public.grandkid",
        "public.secret",
    }
    assert all(formats.values())
    expected = pg.row_counts(source)
    assert result.source_counts == result.target_counts == expected
    assert expected["public.secret"] == 30
    # ONLY each table (a parent's SELECT would include its children's rows), by column
    # name (jsonb): pg_dump restores an inheritance child's inherited columns first.
    for table in expected:
        schema, name = table.split(".")
        query = f"SELECT md5(string_agg(to_jsonb(t)::text, '|' ORDER BY to_jsonb(t)::text)) FROM ONLY {schema}.{name} t"
        assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source), table


def test_extension_types_travel_as_text_beside_binary_tables_in_a_whole_import(
    control_db, scratch_db, formats
):
    """HELD, end to end (project role): citext/hstore tables as text, the rest in binary."""
    source = scratch_db("capysrc_hbin")
    pg.psql(
        source,
        text=r"""
        CREATE EXTENSION citext; CREATE EXTENSION hstore;
        CREATE TABLE public.ext (id int, c citext, h hstore, cs citext[]);
        INSERT INTO public.ext VALUES (1, 'ÉcOle', 'a=>1, "b c"=>NULL', '{X,y}'), (2, NULL, '', '{}');
        """
        + KINDS
        + PARTITIONS,
    )
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", (job.error, job.last_stderr)
    project = world.project.database_name
    assert formats.pop("public.ext") is False
    assert formats and all(formats.values())
    assert_same_rows(
        source, project, ["public.ext", "public.kinds", "public.p_a", "public.p_b", "public.secret"]
    )
    report = job.facts.report
    assert report["tables"] == {
        t: {"source_rows": n, "target_rows": n} for t, n in pg.row_counts(source).items()
    }


# --------------------------------------------------------------------------------------
# Encodings.


def high_bits(encoding: str) -> str:
    """Rows with bytes above 127 in text, "char", name, bpchar, varchar, tsvector, jsonb,
    xml and arrays (xml and the typmod'ed columns kept to what a SQL_ASCII database,
    which counts bytes, accepts)."""
    xml = "<a>é</a>" if encoding != "SQL_ASCII" else "<a>x</a>"
    char = "é" if encoding != "SQL_ASCII" else "e"  # (bpchar pads SQL_ASCII's by bytes)
    return f"""
CREATE TABLE public.latin (id int, t text, c "char", n name, b bpchar(3), v varchar(2), tv tsvector, j jsonb,
                           x xml, a text[]);
INSERT INTO public.latin VALUES
    (1, 'café ÿ ', '\\351', 'naïve', '{char}', 'ü', 'été:1', '{{"k": "é"}}', '{xml}', '{{à,NULL}}'),
    (2, '', '\\377', '', '', '', '', '{{}}', '', '{{}}'),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"""


def _loaded(dbname: str, text: str) -> None:
    conn = psycopg2.connect(pg.url_for(dbname))
    conn.set_client_encoding("UTF8")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(text)
    finally:
        conn.close()


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_source_of_another_encoding_travels_as_text_into_a_utf8_preview(
    encoded_db, scratch_db, tmp_path, formats, way, encoding
):
    """HELD: a LATIN1 (or SQL_ASCII) source and a UTF8 preview: every table as text."""
    source, target = encoded_db("capysrc_hbin", encoding), scratch_db("capytgt_hbin")
    _loaded(source, high_bits(encoding))
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.latin": False}
    assert result.source_counts == result.target_counts == {"public.latin": 3}
    assert_same_rows(source, target)


def test_a_whole_live_import_of_a_latin1_source_arrives_exactly(control_db, encoded_db, formats):
    """HELD, end to end: a LATIN1 source into the project's UTF8 database: text format,
    every high-bit value (text, "char", name, bpchar, tsvector, jsonb, xml) the same."""
    source = encoded_db("capysrc_hbin", "LATIN1")
    _loaded(source, high_bits("LATIN1"))
    world = make_world(control_db)
    job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
    assert job.state == "completed", (job.error, job.last_stderr)
    assert formats == {"public.latin": False}
    assert_same_rows(source, world.project.database_name)


def test_latin1_to_latin1_travels_in_binary_and_arrives_exactly(encoded_db, tmp_path, formats, way):
    """HELD: the same encoding on both sides (as a preview created in the source's
    encoding would be): binary, high-bit text, "char", name, bpchar, tsvector, jsonb,
    xml and arrays exact. The preview's sessions read UTF8, as a UTF8 preview's do."""
    source, target = encoded_db("capysrc_hbin", "LATIN1"), encoded_db("capytgt_hbin", "LATIN1")
    pg.admin(sql.SQL("ALTER DATABASE {} SET client_encoding = 'UTF8'").format(sql.Identifier(target)))
    _loaded(source, high_bits("LATIN1"))
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.latin": True}
    assert result.source_counts == result.target_counts == {"public.latin": 3}
    assert_same_rows(source, target)
    # The stored bytes too (convert_to from the same encoding on both sides).
    query = "SELECT id, convert_to(t, 'LATIN1'), c::int, convert_to(n::text, 'LATIN1') FROM public.latin ORDER BY id"
    assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source)


# --------------------------------------------------------------------------------------
# Counts, failures and the progress.


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_rows_the_preview_drops_are_a_count_mismatch_in_binary(
    scratch_db, tmp_path, monkeypatch, formats, way, binary
):
    """HELD: a BEFORE trigger in the preview that drops rows makes COPY n smaller than the
    source's: the copy fails naming the table and the table is left empty (in both
    formats), permanently: CountMismatch is a PermanentError (it came out bare before)."""
    monkeypatch.setattr(live, "BINARY_COPY", binary)
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text="CREATE TABLE public.t (id int, v text); INSERT INTO public.t SELECT g, 'x' FROM generate_series(1, 500) g;",
    )

    def dropping_trigger() -> None:
        pg.psql(
            target,
            text="""
            CREATE FUNCTION public.drop_odd() RETURNS trigger LANGUAGE plpgsql AS
            $$BEGIN IF NEW.id % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END$$;
            CREATE TRIGGER drop_odd BEFORE INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.drop_odd();
            """,
        )

    with pytest.raises(CountMismatch) as info:
        CopyRun(source_url(source), target, tmp_path, before_copy=dropping_trigger).run()
    assert formats == {"public.t": binary}
    assert "the source sent 500 rows of table public.t and the preview received 250" in str(info.value)
    assert isinstance(info.value, PermanentError)
    assert pg.row_counts(target) == {"public.t": 0}


def test_a_snapshot_copy_ignores_rows_written_to_the_source_during_the_copy(
    scratch_db, tmp_path, formats, way
):
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text="CREATE TABLE public.t (id int, v text); INSERT INTO public.t SELECT g, 'x' FROM generate_series(1, 500) g;",
    )
    before = rows(source, "public.t")

    def write() -> None:
        pg.psql(
            source,
            text="INSERT INTO public.t SELECT g, 'late' FROM generate_series(1, 100) g; UPDATE public.t SET v = 'changed' WHERE id < 10;",
        )

    result = CopyRun(source_url(source), target, tmp_path, before_copy=write).run()
    assert formats == {"public.t": True}
    assert result.source_counts == result.target_counts == {"public.t": 500}
    assert rows(target, "public.t") == before


class _Watched(Flow):
    """A flow that remembers the most rows it was ever said to hold."""

    def __init__(self) -> None:
        self.most = 0
        super().__init__()

    @property
    def rows(self) -> int:
        return self._rows

    @rows.setter
    def rows(self, value: int) -> None:
        self._rows = value
        self.most = max(self.most, value)


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_the_progress_never_counts_more_rows_than_a_binary_table_has(scratch_db, monkeypatch, count):
    """FIXED: the progress counted every write psycopg2 makes as a row; the binary
    format's trailer is a message (a write) of its own, so while a table streamed the
    progress showed one row more than it has (1 row for an empty table), then dropped
    back at the commit: rows_done was not monotonic."""
    monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text=f"CREATE TABLE public.t (id int); INSERT INTO public.t SELECT generate_series(1, {count});",
    )
    pg.psql(target, text="CREATE TABLE public.t (id int)")
    table = SourceTable("public.t", "public", "t", ("id",), 1 << 30, 1, binary=True)
    flow = _Watched()
    src, tgt = psycopg2.connect(pg.url_for(source)), psycopg2.connect(pg.url_for(target))
    try:
        copied = stream_table(table, src, tgt, flow)
    finally:
        src.close()
        tgt.close()
    assert copied.source_rows == copied.target_rows == flow.rows == count
    assert flow.most <= count


# --------------------------------------------------------------------------------------
# f1d88f6: maintenance_work_mem.


def test_the_copy_sessions_build_with_the_configured_maintenance_work_mem(scratch_db, tmp_path, monkeypatch):
    """HELD: the default is 64MB, a setting still overrides it, and the preview's lane
    sessions use what copy_rows is given (CopyRun passes 64MB)."""
    from pipeline.config import Settings

    assert Settings.from_env({"CAPY_ENV": "development"}).maintenance_work_mem == "64MB"
    assert (
        Settings.from_env(
            {"CAPY_ENV": "development", "CAPY_MAINTENANCE_WORK_MEM": "1GB"}
        ).maintenance_work_mem
        == "1GB"
    )
    seen: list[str] = []
    original = stream_table

    def recording(table, source, target, flow):
        with target.cursor() as cur:
            cur.execute("SHOW maintenance_work_mem")
            seen.append(cur.fetchone()[0])
        return original(table, source, target, flow)

    monkeypatch.setattr(live, "stream_table", recording)
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text="CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t SELECT generate_series(1, 10);",
    )
    CopyRun(source_url(source), target, tmp_path).run()
    assert seen == ["64MB"]


# --------------------------------------------------------------------------------------
# A binary copy that stalls mid-table; a frozen binary load.


def test_a_binary_copy_that_stalls_mid_table_is_stopped_and_its_progress_counted_rows(
    scratch_db, tmp_path, formats
):
    """HELD: the stall watchdog still sees a binary table's rows stop (the pipe's reads),
    and before that the progress counted its rows as they streamed (the writes), never
    more than the table has; the preview's table is left empty."""
    import threading

    from stages.copy.engine import CopyStalled
    from stages.copy.live import SourceSettings
    from tests.support.muteproxy import cut_off_relay

    big_rows = 300_000
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(
        source,
        text=f"CREATE TABLE public.big (id int PRIMARY KEY, pad text); "
        f"INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, {big_rows}) g;",
    )
    outcome: dict = {}
    with cut_off_relay(after_bytes=4 * 1024 * 1024) as relay:
        run = CopyRun(
            source_url(source, port=relay.port),
            target,
            tmp_path,
            settings=SourceSettings(stall_seconds=5, read_timeout=600),
        )

        def go() -> None:
            try:
                outcome["result"] = run.run()
            except BaseException as err:  # noqa: BLE001
                outcome["error"] = err

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        thread.join(90)
        assert not thread.is_alive(), "the copy went on waiting for a source that stopped sending"
    assert formats == {"public.big": True}
    assert isinstance(outcome.get("error"), CopyStalled), outcome
    streamed = [r["rows_done"] for r in run.progress if r.get("step") == "data"]
    assert streamed and max(streamed) > 0, run.progress
    assert max(streamed) < big_rows
    assert all(r["rows_per_second"] >= 0 for r in run.progress)
    assert pg.row_counts(target) == {"public.big": 0}


def _copies_kinds_exactly(scratch_db, tmp_path, formats) -> str:
    """Copy KINDS in binary; the rows arrive exactly. The target's name."""
    source, target = scratch_db("capysrc_hbin"), scratch_db("capytgt_hbin")
    pg.psql(source, text=KINDS)
    result = CopyRun(source_url(source), target, tmp_path).run()
    assert formats == {"public.kinds": True}
    assert result.source_counts == result.target_counts == {"public.kinds": 7}
    assert_same_rows(source, target)
    return target


def test_a_frozen_binary_load_arrives(scratch_db, tmp_path, monkeypatch, formats, way):
    """HELD: COPY … WITH (FORMAT binary, FREEZE) after TRUNCATE (tables of FREEZE_MIN_BYTES)."""
    monkeypatch.setattr(stream, "FREEZE_MIN_BYTES", 0)
    target = _copies_kinds_exactly(scratch_db, tmp_path, formats)
    pg.admin("CREATE EXTENSION IF NOT EXISTS pg_visibility", dbname=target)
    assert pg.admin(
        "SELECT all_frozen > 0 FROM pg_visibility_map_summary('public.kinds')", dbname=target
    ) == [(True,)]
