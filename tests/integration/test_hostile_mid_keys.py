"""Hostile (found by review): keys of tables of 1 MB and more are built as unique indexes,
then attached (stages.copy.engine `_constraint_sql`). Names that hold "ON", "ADD
CONSTRAINT" or a newline broke the attach when it read them back out of the dump's SQL;
the preview's schema must equal the source's whatever the keys are."""

from __future__ import annotations

import pytest

import stages.copy.engine as engine
from tests.support import pg
from tests.support.copying import CopyRun, source_url

PAD = "repeat('x', 200)"

CASES = {
    "hostile_parent": r'''
CREATE SCHEMA "Odd ""Schema""";
CREATE TABLE "Odd ""Schema"""."Mid Parent" (
    "Id" int CONSTRAINT "Mid Parent PK ""x""" PRIMARY KEY,
    code text NOT NULL CONSTRAINT "code unique" UNIQUE,
    alt int,
    pad text,
    CONSTRAINT alt_unique UNIQUE NULLS NOT DISTINCT (alt),
    CONSTRAINT alt_deferred UNIQUE (alt, code) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO "Odd ""Schema"""."Mid Parent" SELECT g, 'c' || g, g, repeat('x', 200) FROM generate_series(1, 10000) g;
ALTER TABLE "Odd ""Schema"""."Mid Parent" REPLICA IDENTITY USING INDEX "code unique";
ALTER TABLE "Odd ""Schema"""."Mid Parent" CLUSTER ON "Mid Parent PK ""x""";
CREATE TABLE public.child (id int PRIMARY KEY, parent int REFERENCES "Odd ""Schema"""."Mid Parent" DEFERRABLE,
    code text REFERENCES "Odd ""Schema"""."Mid Parent" (code), alt int REFERENCES "Odd ""Schema"""."Mid Parent" (alt));
INSERT INTO public.child SELECT g, g, 'c' || g, g FROM generate_series(1, 100) g;
''',
    "deferred_pk_include": r"""
CREATE TABLE public.dpk (id int, b int, c text, pad text,
    CONSTRAINT dpk_pkey PRIMARY KEY (id) INCLUDE (b) WITH (fillfactor = 70) DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT dpk_bc UNIQUE (b) INCLUDE (c, id), CONSTRAINT dpk_c UNIQUE (c) DEFERRABLE);
INSERT INTO public.dpk SELECT g, g, 'c' || g, repeat('x', 200) FROM generate_series(1, 10000) g;
CREATE TABLE public.ref (y int REFERENCES public.dpk (b));
INSERT INTO public.ref VALUES (2);
""",
    "on_in_name": r"""
CREATE TABLE public.onn (id int, code text, pad text, CONSTRAINT "k ON x" UNIQUE (code), CONSTRAINT "p ON q" PRIMARY KEY (id));
INSERT INTO public.onn SELECT g, 'c' || g, repeat('x', 200) FROM generate_series(1, 10000) g;
""",
    "add_constraint_in_table_name": r"""
CREATE TABLE public."t ADD CONSTRAINT u" (id int PRIMARY KEY, pad text);
INSERT INTO public."t ADD CONSTRAINT u" SELECT g, repeat('x', 200) FROM generate_series(1, 10000) g;
""",
    "newline_names": 'CREATE SCHEMA "s\nADD CONSTRAINT";\n'
    'CREATE TABLE "s\nADD CONSTRAINT"."t\n x" (id int CONSTRAINT "pk\n y" PRIMARY KEY, pad text);\n'
    'INSERT INTO "s\nADD CONSTRAINT"."t\n x" SELECT g, repeat(\'x\', 200) FROM generate_series(1, 10000) g;\n',
    "partitions": r"""
CREATE TABLE public.parted (id int, at date, pad text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES FROM ('2000-01-01') TO ('2100-01-01');
CREATE TABLE public.parted_b PARTITION OF public.parted FOR VALUES FROM ('2100-01-01') TO ('2200-01-01');
ALTER TABLE public.parted_a ADD CONSTRAINT parted_a_id UNIQUE (id);
ALTER TABLE public.parted_a REPLICA IDENTITY USING INDEX parted_a_pkey;
INSERT INTO public.parted SELECT g, date '2000-01-01' + (g % 30000), repeat('x', 200) FROM generate_series(1, 10000) g;
CREATE TABLE public.to_parted (id int, at date, FOREIGN KEY (id, at) REFERENCES public.parted);
INSERT INTO public.to_parted VALUES (1, date '2000-01-02');
CREATE TABLE public.inh_parent (id int PRIMARY KEY, pad text);
CREATE TABLE public.inh_child (extra int, CONSTRAINT inh_child_pkey PRIMARY KEY (id)) INHERITS (public.inh_parent);
INSERT INTO public.inh_child SELECT g, repeat('x', 200), g FROM generate_series(1, 10000) g;
""",
    "collation_and_exclusion": r"""
CREATE TABLE public.coll (id int, name text COLLATE "C", r int4range, pad text,
    CONSTRAINT coll_name UNIQUE (name, id), CONSTRAINT coll_excl EXCLUDE USING btree (id WITH =),
    CONSTRAINT coll_ex2 EXCLUDE USING gist (r WITH &&));
INSERT INTO public.coll SELECT g, 'n' || g, int4range(g, g + 1), repeat('x', 200) FROM generate_series(1, 10000) g;
COMMENT ON CONSTRAINT coll_name ON public.coll IS 'commented';
""",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_of_mid_sized_tables_copy_to_the_same_schema(scratch_db, tmp_path, case):
    source, target = scratch_db("capysrc_midkeys"), scratch_db("capytgt_midkeys")
    pg.psql(source, text=CASES[case])
    sizes = pg.admin(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
        dbname=source,
    )
    # Some table's keys take the attach path (1 MB and more), below the old 8 MB threshold.
    assert any(engine.SEPARATE_KEY_MIN_BYTES <= size < 8 << 20 for _name, size in sizes), sizes
    result = CopyRun(source_url(source), target, tmp_path, lanes=3).run()
    expected = pg.row_counts(source)
    assert result.target_counts == expected
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
