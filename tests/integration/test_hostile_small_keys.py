"""Hostile: small tables' primary keys and unique constraints are added by their own
ALTER TABLE (stages.copy.engine.SEPARATE_KEY_MIN_BYTES), big ones' built as indexes then attached: the preview's schema
must still equal the source's whatever the keys are."""

from __future__ import annotations

from tests.support import pg
from tests.support.copying import CopyRun, source_url

SOURCE = r'''
CREATE SCHEMA "Odd ""Schema""";
CREATE TABLE "Odd ""Schema"""."Small Parent" (
    "Id" int CONSTRAINT "Small Parent PK ""x""" PRIMARY KEY,
    code text NOT NULL CONSTRAINT "code unique" UNIQUE,
    alt int,
    CONSTRAINT alt_unique UNIQUE NULLS NOT DISTINCT (alt),
    CONSTRAINT alt_deferred UNIQUE (alt, code) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO "Odd ""Schema"""."Small Parent" SELECT g, 'c' || g, g FROM generate_series(1, 200) g;
ALTER TABLE "Odd ""Schema"""."Small Parent" REPLICA IDENTITY USING INDEX "code unique";
ALTER TABLE "Odd ""Schema"""."Small Parent" CLUSTER ON "Small Parent PK ""x""";
CREATE TABLE public.big_child (
    id bigint PRIMARY KEY,
    parent int REFERENCES "Odd ""Schema"""."Small Parent" DEFERRABLE,
    code text REFERENCES "Odd ""Schema"""."Small Parent" (code),
    alt int REFERENCES "Odd ""Schema"""."Small Parent" (alt),
    pad text
);
INSERT INTO public.big_child SELECT g, 1 + g % 200, 'c' || (1 + g % 200), 1 + g % 200, repeat('x', 200)
    FROM generate_series(1, 60000) g;
CREATE TABLE public.small_child (
    id int PRIMARY KEY,
    big bigint UNIQUE REFERENCES public.big_child,
    parent int REFERENCES "Odd ""Schema"""."Small Parent"
);
INSERT INTO public.small_child SELECT g, g, g FROM generate_series(1, 100) g;
CREATE TABLE public.self_ref (id int PRIMARY KEY, up int REFERENCES public.self_ref);
INSERT INTO public.self_ref VALUES (1, NULL), (2, 1);
CREATE TABLE public.parted (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE TABLE public.parted_b PARTITION OF public.parted FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
ALTER TABLE public.parted_a ADD CONSTRAINT parted_a_id UNIQUE (id);
INSERT INTO public.parted SELECT g, date '2020-01-01' + g FROM generate_series(1, 600) g;
CREATE TABLE public.to_parted (id int, at date, FOREIGN KEY (id, at) REFERENCES public.parted);
INSERT INTO public.to_parted VALUES (1, date '2020-01-02');
'''


def test_keys_of_small_and_big_tables_copy_to_the_same_schema(scratch_db, tmp_path):
    source, target = scratch_db("capysrc_h2keys"), scratch_db("capytgt_h2keys")
    pg.psql(source, text=SOURCE)
    result = CopyRun(source_url(source), target, tmp_path, lanes=3).run()
    expected = pg.row_counts(source)
    assert result.target_counts == expected
    assert pg.row_counts(target) == expected
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
