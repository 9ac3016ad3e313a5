"""Which schema entries the rehearsal need not run (stages.preflight.implied)."""

from __future__ import annotations

import pytest

from stages.preflight.implied import implied_entries, is_plain_key, is_plain_table
from tests.support.rehearsing import Entry

HEADER = "--\n-- TOC entry 7 (class 2606 OID 16440)\n-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\n"


@pytest.mark.parametrize(
    ("desc", "sql"),
    [
        (
            "CONSTRAINT",
            "ALTER TABLE ONLY public.many_0001\n    ADD CONSTRAINT many_0001_pkey PRIMARY KEY (id);",
        ),
        ("CONSTRAINT", 'ALTER TABLE ONLY "My Schema"."T"\n    ADD CONSTRAINT "T_u" UNIQUE (a, "B c");'),
        ("INDEX", "CREATE INDEX many_0001_label ON public.many_0001 USING btree (label);"),
        ("INDEX", "CREATE UNIQUE INDEX u ON ONLY public.parted USING btree (a, b);"),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.many_0001\n    ADD CONSTRAINT many_0001_parent_id_fkey FOREIGN KEY (parent_id) "
            "REFERENCES public.many_parent(id);",
        ),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT c_fk FOREIGN KEY (a, b) REFERENCES public.p(a, b) "
            "ON UPDATE CASCADE ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED NOT VALID;",
        ),
    ],
)
def test_plain_keys_and_btree_indexes_as_pg_dump_writes_them_are_implied(desc, sql):
    assert is_plain_key(desc, HEADER + sql + "\n\n")


@pytest.mark.parametrize(
    ("desc", "sql"),
    [
        ("INDEX", "CREATE INDEX i ON public.t USING btree (lower(label));"),  # an expression
        (
            "INDEX",
            "CREATE INDEX i ON public.t USING btree (label) WHERE (public.f(label) > 0);",
        ),  # a predicate
        ("INDEX", "CREATE INDEX i ON public.t USING gin (body public.gin_trgm_ops);"),  # another method
        ("INDEX", 'CREATE INDEX i ON public.t USING btree (label COLLATE "C");'),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (label text_pattern_ops);"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a) INCLUDE (b);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT u UNIQUE NULLS NOT DISTINCT (a);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT x EXCLUDE USING gist (r WITH &&);"),
        ("CONSTRAINT", "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT c CHECK ((public.f(a) > 0));"),
        (
            "FK CONSTRAINT",
            "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES public.p(a) MATCH FULL;",
        ),
        # A second statement after a plain one: rehearsed.
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a);\nALTER TABLE public.t OWNER TO postgres;"),
        ("INDEX", "CREATE INDEX i ON public.t USING btree (a); SELECT public.evil();"),
        # The right text under another kind of entry.
        ("TRIGGER", "CREATE INDEX i ON public.t USING btree (a);"),
    ],
)
def test_anything_else_is_rehearsed(desc, sql):
    assert not is_plain_key(desc, HEADER + sql + "\n")


def test_a_plain_key_that_a_rehearsed_entry_needs_is_rehearsed():
    blocks = {
        1: "CREATE TABLE public.p (id integer);",
        2: "ALTER TABLE ONLY public.p\n    ADD CONSTRAINT p_pkey PRIMARY KEY (id);",
        3: "CREATE VIEW public.v AS SELECT p.id FROM public.p GROUP BY p.id;",
        4: "CREATE TABLE public.c (id integer);",
        5: "ALTER TABLE ONLY public.c\n    ADD CONSTRAINT c_pkey PRIMARY KEY (id);",
        6: "CREATE INDEX c_id ON public.c USING btree (id);",
    }
    entries = [
        Entry(1, "TABLE"),
        Entry(2, "CONSTRAINT", (1,)),
        Entry(3, "VIEW", (1, 2)),  # groups by p's primary key: needs it
        Entry(4, "TABLE"),
        Entry(5, "CONSTRAINT", (4,)),
        Entry(6, "INDEX", (4,)),
    ]
    assert implied_entries(entries, blocks) == {5, 6}


TABLE_HEADER = (
    "--\n-- TOC entry 214 (class 1259 OID 16386)\n-- Name: t; Type: TABLE; Schema: public; Owner: -\n--\n\n"
)


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE public.many_0001 (\n    id integer NOT NULL,\n    parent_id integer NOT NULL,\n"
        "    label text NOT NULL\n);",
        "CREATE TABLE public.nocols (\n);",
        'CREATE TABLE "My Schema"."T" (\n    "User" text COLLATE pg_catalog."C",\n'
        '    b character varying(3) COLLATE pg_catalog."POSIX",\n    c numeric(10,2),\n'
        "    d timestamp(3) with time zone,\n    e integer[],\n    f interval,\n    g bit varying(5),\n"
        "    h character(2),\n    i jsonb[][],\n    j uuid NOT NULL,\n    k tstzrange\n);",
    ],
)
def test_plain_tables_as_pg_dump_writes_them_are_implied(sql):
    assert is_plain_table("TABLE", TABLE_HEADER + sql + "\n\n")


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE public.t (\n    a public.citext\n);",  # a type of an extension
        "CREATE TABLE public.t (\n    a abstime\n);",  # a type PostgreSQL 15 lacks
        "CREATE TABLE public.t (\n    a integer DEFAULT 0\n);",
        "CREATE TABLE public.t (\n    a integer DEFAULT public.f()\n);",
        "CREATE TABLE public.t (\n    a integer,\n    CONSTRAINT c CHECK ((public.f(a) > 0))\n);",
        "CREATE TABLE public.t (\n    a integer GENERATED ALWAYS AS (public.f(0)) STORED\n);",
        'CREATE TABLE public.t (\n    a text COLLATE public."x-icu"\n);',
        'CREATE TABLE public.t (\n    a text COLLATE pg_catalog."en_US"\n);',  # a locale the target may lack
        "CREATE TABLE public.t (\n    a integer\n)\nPARTITION BY RANGE (a);",
        "CREATE TABLE public.t (\n    a integer\n)\nINHERITS (public.p);",
        "CREATE TABLE public.t (\n    a integer\n)\nWITH (fillfactor='50');",
        "CREATE UNLOGGED TABLE public.t (\n    a integer\n);",
        "CREATE TABLE public.t OF public.ty;",
        "CREATE TABLE public.t (\n    a integer\n);\nALTER TABLE ONLY public.t ALTER COLUMN a SET STATISTICS 5;",
        "CREATE TABLE public.t (\n    a integer\n); SELECT public.evil();",
        "CREATE TABLE public.t (\n    user integer\n);",  # a reserved word, unquoted: not a name
        "CREATE TABLE public.t (\n    a interval day to second(3)\n);",
    ],
)
def test_any_other_table_is_rehearsed(sql):
    assert not is_plain_table("TABLE", TABLE_HEADER + sql + "\n")


def table(name: str, schema: str = "public") -> str:
    return f"CREATE TABLE {schema}.{name} (\n    id integer NOT NULL,\n    label text\n);"


def test_plain_tables_but_the_first_of_each_schema_are_implied():
    blocks = {1: table("a"), 2: table("b"), 3: table("c", "other"), 4: table("d", "other"), 5: table("e")}
    entries = [
        Entry(1, "TABLE", name="a"),
        Entry(2, "TABLE", name="b"),
        Entry(3, "TABLE", namespace="other", name="c"),
        Entry(4, "TABLE", namespace="other", name="d"),
        Entry(5, "TABLE", name="e"),
    ]
    assert implied_entries(entries, blocks) == {2, 4, 5}


def test_a_plain_table_a_rehearsed_entry_needs_or_names_is_rehearsed_with_what_it_needs():
    blocks = {
        1: table("first"),
        2: table("viewed"),
        3: "CREATE VIEW public.v AS\n SELECT viewed.id FROM public.viewed;",
        4: table("Named"),
        5: table("keyed"),
        6: "ALTER TABLE ONLY public.keyed\n    ADD CONSTRAINT keyed_pkey PRIMARY KEY (id);",
        7: "CREATE VIEW public.w AS\n SELECT 1 AS one\n  GROUP BY public.keyed_by();",
        # A function whose body reads a table, with no dependency recorded: named, so rehearsed.
        8: 'CREATE FUNCTION public.f() RETURNS bigint\n    LANGUAGE sql\n    AS $$SELECT count(*) FROM public."Named"$$;',
        9: table("alone"),
        10: table('"café"'),
        11: "CREATE FUNCTION public.g() RETURNS bigint\n    LANGUAGE sql\n    AS $$SELECT count(*) FROM Café$$;",
    }
    blocks[4] = blocks[4].replace("public.Named", 'public."Named"')
    entries = [
        Entry(1, "TABLE", name="first"),
        Entry(2, "TABLE", name="viewed"),
        Entry(3, "VIEW", (2,)),
        Entry(4, "TABLE", name="Named"),
        Entry(5, "TABLE", name="keyed"),
        Entry(6, "CONSTRAINT", (5,)),
        Entry(7, "VIEW", (6,)),  # needs keyed's primary key, which needs keyed
        Entry(8, "FUNCTION"),
        Entry(9, "TABLE", name="alone"),
        Entry(10, "TABLE", name="café"),
        Entry(11, "FUNCTION"),
    ]
    assert implied_entries(entries, blocks) == {9}


@pytest.mark.parametrize(
    "columns",
    [
        "    a integer,\n    a text",  # a column twice
        '    a integer,\n    "a" text',  # the same name, quoted
        "    a character varying(0)",
        "    a numeric(1001)",
        "    a numeric(10,1001)",
        "    a bit(0)",
        "    a character(10485761)",
        "    a timestamp(7) with time zone",
        "    a integer(4)",  # a modifier the type has not
        "    a text with time zone",
        "    a time",  # pg_dump always says with or without time zone
        ",\n".join(f"    c{i} integer" for i in range(1601)),  # more columns than a table may have
    ],
)
def test_a_table_that_cannot_be_created_is_not_plain(columns):
    assert not is_plain_table("TABLE", f"CREATE TABLE public.t (\n{columns}\n);")


def test_the_most_columns_and_modifiers_a_table_may_have_are_plain():
    columns = ",\n".join(f"    c{i} numeric(1000,-1000)" for i in range(1600))
    assert is_plain_table("TABLE", f"CREATE TABLE public.t (\n{columns}\n);")


def test_entries_the_rehearsal_does_not_run_need_no_table():
    """Table data (and anything else outside the rendered schema) depends on its table
    but is not run: it keeps no plain table rehearsed (an upload's archive holds data)."""
    blocks = {1: table("a"), 2: table("b")}
    entries = [
        Entry(1, "TABLE", name="a"),
        Entry(2, "TABLE", name="b"),
        Entry(3, "TABLE DATA", (2,), name="b"),
    ]
    assert implied_entries(entries, blocks) == {2}


def test_past_a_hundred_names_that_need_quotes_every_such_table_is_rehearsed():
    names = [f"t {i}" for i in range(101)]
    blocks = {0: table("first"), **{i + 1: table(f'"{name}"') for i, name in enumerate(names)}}
    entries = [Entry(0, "TABLE", name="first")] + [
        Entry(i + 1, "TABLE", name=name) for i, name in enumerate(names)
    ]
    assert implied_entries(entries, blocks) == set()
    assert implied_entries(entries[:100], {k: v for k, v in blocks.items() if k < 100}) == set(range(1, 100))


def test_each_schema_is_told_by_the_tables_sql_not_the_listings_words():
    """A schema named "a b" lists as namespace "a": its first plain table is still
    rehearsed apart from schema a's."""
    blocks = {1: table("x", "a"), 2: table("y", '"a b"'), 3: table("z", '"a b"')}
    entries = [
        Entry(1, "TABLE", namespace="a", name="x"),
        Entry(2, "TABLE", namespace="a", name="y"),
        Entry(3, "TABLE", namespace="a", name="z"),
    ]
    assert implied_entries(entries, blocks) == {3}
