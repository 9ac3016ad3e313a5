"""Hostile checks of the pre-data section restored in slices beside the copy, in the
order `stages.copy.predata._order` gives it (FK-referenced tables first, each table
followed by what depends on it), and of what each copy and post-data entry waits for.

The contract (predata's docstring): the slices are restored "in an order their
dependencies allow", and the copy is the source, schema and rows, as a plain pre-data
restore before the copy would make it. Each test sets up a schema whose plain
restore works and checks that the sliced copy does as well.
"""

from __future__ import annotations

import pytest

from tests.support import pg
from tests.support.copying import (
    CopyRun,
    copied_as_source,
    hold_copy_until_loaded,
    in_small_slices,
    source_url,
)


@pytest.fixture
def small_slices(monkeypatch):
    in_small_slices(monkeypatch)


def test_hostile_a_view_using_a_cast_over_a_referenced_table_is_restored_after_the_cast(
    scratch_db, tmp_path, small_slices
):
    """A view over a table foreign keys reference, that casts a column with a CREATE
    CAST … WITH FUNCTION, restores as a plain pre-data restore restores it: after the
    cast. The view's recorded dependencies name the cast's function, not the cast
    (pg_dump relies on CASTs sorting before tables and views); `_order` brings the
    referenced table and its view to the front, before the CAST entry, and pg_restore
    fails with 'cannot cast type numeric to public.money2'."""
    source, target = scratch_db("capysrc_hcast"), scratch_db("capytgt_hcast")
    pg.psql(
        source,
        text="CREATE TYPE public.money2 AS (amount numeric);"
        "CREATE FUNCTION public.to_money2(numeric) RETURNS public.money2 LANGUAGE sql IMMUTABLE"
        " AS 'SELECT ROW($1)::public.money2';"
        "CREATE CAST (numeric AS public.money2) WITH FUNCTION public.to_money2(numeric);"
        "CREATE TABLE public.parent (id int PRIMARY KEY, amount numeric);"
        "CREATE TABLE public.child (id int PRIMARY KEY, parent_id int REFERENCES public.parent);"
        "CREATE VIEW public.priced AS SELECT id, amount::public.money2 AS m FROM public.parent;"
        "INSERT INTO public.parent VALUES (1, 2.5); INSERT INTO public.child VALUES (1, 1);",
    )
    copied_as_source(source, target, tmp_path)


def test_hostile_a_later_table_loads_while_a_default_partition_is_copying(scratch_db, tmp_path, monkeypatch):
    """A later table's rows load while a default partition is still copying. Attaching
    any other partition to its parent takes an ACCESS EXCLUSIVE lock on the default
    partition (its constraint changes), yet the archive records the ATTACH as depending
    on the parent and the new partition only: the default partition's copy waits for its
    own ATTACH's slice, not for the later ATTACHes', so a later slice waits for the whole
    copy of the default partition, and every table after it with it (here: orders_us is
    attached in the slice after orders_other's, with z_later)."""
    in_small_slices(monkeypatch, by_command=True, frozen=True)
    source, target = scratch_db("capysrc_hdefpart"), scratch_db("capytgt_hdefpart")
    pg.psql(
        source,
        text="CREATE TABLE public.orders (id int NOT NULL, region text NOT NULL) PARTITION BY LIST (region);"
        "CREATE TABLE public.orders_at PARTITION OF public.orders FOR VALUES IN ('at');"
        "CREATE TABLE public.orders_other PARTITION OF public.orders DEFAULT;"
        "CREATE TABLE public.orders_us PARTITION OF public.orders FOR VALUES IN ('us');"
        "CREATE TABLE public.orders_vn PARTITION OF public.orders FOR VALUES IN ('vn');"
        "CREATE TABLE public.z_later (id int PRIMARY KEY);"
        "INSERT INTO public.orders SELECT g, (ARRAY['at', 'fr', 'us', 'vn'])[g % 4 + 1]"
        " FROM generate_series(1, 100) g;"
        "INSERT INTO public.z_later SELECT generate_series(1, 10);",
    )
    seen = hold_copy_until_loaded(monkeypatch, "orders_other", "z_later")
    result = CopyRun(source_url(source), target, tmp_path, by_command=True, sliced=True).run()
    assert result.source_counts == result.target_counts == pg.row_counts(source)
    assert not seen["timed_out"], (
        "z_later's copy could not start until orders_other's copy ended: a later slice's "
        "ATTACH PARTITION waited for the default partition's lock"
    )
