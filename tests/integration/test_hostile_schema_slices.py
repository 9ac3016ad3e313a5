"""Hostile checks of the pre-data section restored in slices beside the copy
(stages.copy.predata, stages.copy.engine.SchemaSlice).

The contract (SchemaSlice, predata's docstring): "the first tables' rows stream while
the later tables are created"; a table's rows load once the slice holding its CREATE
TABLE is in. A slice is a pg_restore beside the lanes, and the lanes hold their tables
(TRUNCATE … COPY FREEZE; or DELETE, which an ALTER TABLE still waits for) until their
copy commits: a slice entry that touches a table being copied (a view over it, a
column default set after it, a partition attached to it, a child inheriting it) waits
for that whole copy, and every table after it in the archive waits with it.

Each test holds one table's copy open (its preview transaction, its lock taken) until
a later table has loaded, with a bounded wait: under the contract the later table
loads while the first is still held; when the slice waits for the held copy, the wait
runs out and the test says so.
"""

from __future__ import annotations

import threading

import pytest

import stages.copy.live as live
import stages.copy.predata as predata
from tests.support import pg
from tests.support.copying import HOLD_SECONDS, CopyRun, hold_copy_until_loaded, in_small_slices, source_url


@pytest.fixture
def sliced_by_command(monkeypatch):
    # The large tables' way: >= 64 MB streams through psql and loads frozen (TRUNCATE).
    in_small_slices(monkeypatch, by_command=True, frozen=True)


@pytest.mark.parametrize(
    ("schema", "held", "later"),
    [
        pytest.param(
            # pg_dump orders tables and views by name: a_big, b_view, c_later.
            "CREATE TABLE public.a_big (id int PRIMARY KEY, v text);"
            "CREATE VIEW public.b_view AS SELECT id FROM public.a_big;"
            "CREATE TABLE public.c_later (id int PRIMARY KEY);",
            "a_big",
            "c_later",
            id="view-over-a-table-being-copied",
        ),
        pytest.param(
            # A materialized view (CREATE … WITH NO DATA reads a_big) between them, and a
            # serial column whose DEFAULT entry (ALTER TABLE … SET DEFAULT) needs a_big too.
            "CREATE TABLE public.a_big (id serial PRIMARY KEY, v text);"
            "CREATE TABLE public.b_mid (id int PRIMARY KEY);"
            "CREATE MATERIALIZED VIEW public.b_mv AS SELECT count(*) AS n FROM public.a_big;"
            "CREATE TABLE public.c_later (id int PRIMARY KEY);",
            "a_big",
            "c_later",
            id="materialized-view-over-a-table-being-copied",
        ),
        pytest.param(
            # The control: nothing between the two names a_big; this holds today.
            "CREATE TABLE public.a_big (id int PRIMARY KEY, v text);"
            "CREATE TABLE public.b_mid (id int PRIMARY KEY);"
            "CREATE TABLE public.c_later (id int PRIMARY KEY);",
            "a_big",
            "c_later",
            id="nothing-between-names-it",
        ),
    ],
)
def test_hostile_a_later_table_loads_while_an_earlier_large_table_is_still_copying(
    scratch_db, tmp_path, monkeypatch, sliced_by_command, schema, held, later
):
    """A later table's rows load while an earlier large table is still copying: a slice
    between them that names the earlier table (a view over it) must not make every later
    table wait for the earlier table's whole copy."""
    source, target = scratch_db("capysrc_hslice"), scratch_db("capytgt_hslice")
    pg.psql(
        source,
        text=schema + "INSERT INTO public.a_big SELECT g, 'x' FROM generate_series(1, 100) g;"
        "INSERT INTO public.c_later SELECT generate_series(1, 10);",
    )
    seen = hold_copy_until_loaded(monkeypatch, held, later)
    result = CopyRun(source_url(source), target, tmp_path, by_command=True, sliced=True).run()
    assert result.source_counts == result.target_counts == pg.row_counts(source)
    assert not seen["timed_out"], (
        f"{later}'s copy could not start until {held}'s copy ended: a slice holding its "
        f"CREATE TABLE waited for {held}'s lock"
    )


def test_hostile_a_check_that_reads_a_later_table_still_loads(scratch_db, tmp_path, monkeypatch):
    """A table whose CHECK calls a function that reads another table (created later in
    the archive, by name) loads as pg_restore would load it: with the whole schema in,
    the other table exists when the rows are checked. Sliced, its copy may run before
    the slice creating that table: COPY fails with 'relation … does not exist'.

    (Here the later slice is held until the checked table's copy has ended, with a
    bounded wait, so the order is certain; a slow slice does the same by itself.)"""
    in_small_slices(monkeypatch)
    source, target = scratch_db("capysrc_hcheck"), scratch_db("capytgt_hcheck")
    pg.psql(
        source,
        text="CREATE TABLE public.z_banned (id int PRIMARY KEY);"
        "CREATE FUNCTION public.allowed(v int) RETURNS boolean LANGUAGE sql STABLE AS "
        "'SELECT NOT EXISTS (SELECT 1 FROM public.z_banned b WHERE b.id = v)';"
        "CREATE TABLE public.b_checked (id int PRIMARY KEY CHECK (public.allowed(id)));"
        "CREATE TABLE public.c_other (id int PRIMARY KEY);"
        "CREATE TABLE public.d_other (id int PRIMARY KEY);"
        "INSERT INTO public.b_checked SELECT generate_series(1, 10);"
        "INSERT INTO public.z_banned VALUES (100);",
    )
    checked_done = threading.Event()
    original_restore = predata.restore_section
    original_copy = live.stream_table

    def restore(tools, target_url, archive, section, *, list_file, **options):
        with open(list_file, encoding="utf-8") as fh:
            if "z_banned" in fh.read():
                checked_done.wait(HOLD_SECONDS)  # bounded: at most this late, never wrong
        original_restore(tools, target_url, archive, section, list_file=list_file, **options)

    def copy(table, source_conn, target_conn, flow):
        try:
            return original_copy(table, source_conn, target_conn, flow)
        finally:
            if table.name == "b_checked":
                checked_done.set()

    monkeypatch.setattr(predata, "restore_section", restore)
    monkeypatch.setattr(live, "stream_table", copy)
    result = CopyRun(source_url(source), target, tmp_path, sliced=True).run()
    assert result.source_counts == result.target_counts == pg.row_counts(source)
