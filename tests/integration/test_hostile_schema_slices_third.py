"""Hostile checks (third review) of the pre-data section restored in slices beside the
copy (stages.copy.predata): what the archive files outside the pre-data section but
pg_restore restores with it, and a default partition that is itself partitioned.

The contract (predata's docstring, SchemaPlan's): the copy is the source, schema and
rows, as a plain pre-data restore before the copy would make it; and a table's copy
waits for the last slice holding anything that would lock it (a slice never waits
behind a copy).
"""

from __future__ import annotations

import threading

import pytest

import stages.copy.live as live
from tests.support import pg
from tests.support.copying import HOLD_SECONDS, CopyRun, copied_as_source, in_small_slices, source_url


@pytest.fixture
def small_slices(monkeypatch):
    in_small_slices(monkeypatch)


def test_hostile_comments_on_tables_columns_and_views_survive_the_slices(scratch_db, tmp_path, small_slices):
    """COMMENT ON TABLE / COLUMN / VIEW column are in the target as in the source, as a
    plain pre-data restore puts them. pg_dump files a comment in no section (section
    NONE: pg_restore restores it with the section it follows); the slices take only
    the entries marked pre-data, so the comments fall to the rest, restored with
    --section=post-data, which leaves them out: every such comment is lost."""
    source, target = scratch_db("capysrc_hcomment"), scratch_db("capytgt_hcomment")
    pg.psql(
        source,
        text="CREATE TABLE public.a (id int PRIMARY KEY, x int);"
        "COMMENT ON TABLE public.a IS 'table a'; COMMENT ON COLUMN public.a.x IS 'the x';"
        "CREATE TABLE public.b (id int PRIMARY KEY, a_id int REFERENCES public.a);"
        "COMMENT ON COLUMN public.b.a_id IS 'which a';"
        "COMMENT ON CONSTRAINT b_a_id_fkey ON public.b IS 'a post-data comment';"
        "CREATE VIEW public.v AS SELECT id, x FROM public.a; COMMENT ON COLUMN public.v.x IS 'view column';"
        "INSERT INTO public.a VALUES (1, 1); INSERT INTO public.b VALUES (1, 1);",
    )
    copied_as_source(source, target, tmp_path)


def test_hostile_a_later_table_loads_while_a_partitioned_default_partitions_leaf_is_copying(
    scratch_db, tmp_path, monkeypatch
):
    """No slice waits for the copy of a leaf under a default partition that is itself
    partitioned (here orders_a_fr, under the default orders_a of orders; a foreign key
    references it, so it is created early). Attaching any other partition to orders
    takes ACCESS EXCLUSIVE on the default partition and on every leaf under it (it
    validates them); the wait added for a default partition covers the partitions
    attached to orders itself, not their sub-partitions, so orders_a_fr's copy starts
    after its own ATTACH only, and a later slice's ATTACH to orders waits for it: it
    holds orders_a and waits for orders_a_fr, while the COPY into orders_a_fr reads
    its parent orders_a for its partition constraint, and the server reports a
    deadlock (or, with a warm relcache, every later slice waits for the whole copy)."""
    in_small_slices(monkeypatch, by_command=True, frozen=True)
    source, target = scratch_db("capysrc_hsubdef"), scratch_db("capytgt_hsubdef")
    pg.psql(
        source,
        text="CREATE TABLE public.orders (id int NOT NULL, region text NOT NULL) PARTITION BY LIST (region);"
        "CREATE TABLE public.orders_a PARTITION OF public.orders DEFAULT PARTITION BY LIST (region);"
        "CREATE TABLE public.orders_a_fr PARTITION OF public.orders_a FOR VALUES IN ('fr');"
        "ALTER TABLE public.orders_a_fr ADD PRIMARY KEY (id);"
        "CREATE TABLE public.fr_notes (id int PRIMARY KEY, order_id int REFERENCES public.orders_a_fr);"
        + "".join(
            f"CREATE TABLE public.orders_{c} PARTITION OF public.orders FOR VALUES IN ('{c}');"
            for c in "bcdefghijk"
        )
        + "CREATE TABLE public.z_later (id int PRIMARY KEY);"
        "INSERT INTO public.orders SELECT g, (ARRAY['fr', 'b', 'k'])[g % 3 + 1] FROM generate_series(1, 100) g;"
        "INSERT INTO public.z_later SELECT generate_series(1, 10);",
    )
    loaded = threading.Event()
    seen = {"blocked": False}
    original = live.stream_from_command

    def waiting_behind(name: str) -> bool:  # a session of the target waits for a lock on `name`
        return bool(
            pg.admin(
                "SELECT 1 FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (name,), dbname=target
            )
        )

    def patched(table, run_source, target_conn, flow):
        if table.name == "orders_a_fr":
            with target_conn.cursor() as cur:
                cur.execute(table.emptying())  # the lock the copy holds through its rows
            # Until z_later is in, or a slice waits for this copy's lock (HOLD_SECONDS bounds a wait for either).
            for _ in range(HOLD_SECONDS * 20):
                if loaded.wait(0.05):
                    break
                if waiting_behind(f"public.{table.name}"):
                    seen["blocked"] = True
                    break
        copied = original(table, run_source, target_conn, flow)
        if table.name == "z_later":
            loaded.set()
        return copied

    monkeypatch.setattr(live, "stream_from_command", patched)
    result = CopyRun(source_url(source), target, tmp_path, by_command=True, sliced=True).run()
    assert not seen["blocked"], (
        "a later slice (an ATTACH PARTITION to orders) waited for the lock orders_a_fr's copy holds"
    )
    assert result.source_counts == result.target_counts == pg.row_counts(source)
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
