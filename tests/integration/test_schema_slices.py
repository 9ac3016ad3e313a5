"""The pre-data section restored in slices beside the copy (stages.copy.predata): every
table's rows load once its slice is in, and the copy is the source, schema and rows,
whatever the slices' sizes.

pagila has what a slice boundary can fall between: a partitioned table and its
partitions attached later, column defaults and sequences owned by tables set after
them, domains, views over the tables, functions and triggers.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import stages.copy.predata as predata
from tests.support import pg
from tests.support.copying import CopyRun, in_small_slices, source_url


@pytest.mark.parametrize(("first", "by_command"), [(1, False), (3, True)])
def test_pagila_copied_with_its_schema_in_small_slices_is_the_source(
    scratch_db, tmp_path, monkeypatch, caplog, first, by_command
):
    # by_command: the large tables' way, whose TRUNCATE holds its table through the copy
    in_small_slices(monkeypatch, first=first, by_command=by_command)
    source, target = scratch_db("capysrc_slices"), scratch_db("capytgt_slices")
    pg.load_corpus("pagila", source)
    with caplog.at_level("DEBUG", logger="stages.copy.engine"):
        result = CopyRun(source_url(source), target, tmp_path, sliced=True, by_command=by_command).run()
    slices = [
        r.getMessage()
        for r in caplog.records
        if "schema, slice" in r.getMessage() and "done" in r.getMessage()
    ]
    assert len(slices) >= 4, slices
    expected = pg.row_counts(source)
    assert result.source_counts == result.target_counts == expected
    assert pg.row_counts(target) == expected
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)


def test_a_failing_slice_fails_the_copy_and_stops_the_lanes(scratch_db, tmp_path, monkeypatch):
    """A slice pg_restore cannot restore (here: a table already there) fails the copy
    with pg_restore's error, and the lanes stop."""
    from stages.errors import CapyError

    in_small_slices(monkeypatch)
    source, target = scratch_db("capysrc_slicefail"), scratch_db("capytgt_slicefail")
    pg.psql(
        source,
        text="CREATE TABLE public.a (id int PRIMARY KEY); INSERT INTO public.a VALUES (1);"
        "CREATE TABLE public.b (id int PRIMARY KEY); INSERT INTO public.b VALUES (1);"
        "CREATE TABLE public.c (id int PRIMARY KEY); INSERT INTO public.c VALUES (1);",
    )
    pg.psql(target, text="CREATE TABLE public.c (other text)")
    with pytest.raises(CapyError) as info:
        CopyRun(source_url(source), target, tmp_path, sliced=True).run()
    assert "pg_restore of the schema's pre-data into the preview database failed" in info.value.message
    assert 'relation "c" already exists' in info.value.message
    assert [t for t in __import__("threading").enumerate() if t.name.startswith("copy-lane-")] == []


def test_an_index_waits_for_a_function_restored_in_a_later_slice_than_its_table(
    scratch_db, tmp_path, monkeypatch
):
    """A function of a table's row type is restored after the table (it depends on it);
    an index on the table that calls it waits for the slice that defines it, though the
    table's rows loaded earlier. The tables of plain slices need no such wait."""
    in_small_slices(monkeypatch)
    source, target = scratch_db("capysrc_slicefn"), scratch_db("capytgt_slicefn")
    pg.psql(
        source,
        text="""
        CREATE TABLE public.item (id int PRIMARY KEY, name text);
        INSERT INTO public.item SELECT g, 'n' || g FROM generate_series(1, 300) g;
        CREATE TABLE public.other (id int PRIMARY KEY);
        INSERT INTO public.other SELECT g FROM generate_series(1, 50) g;
        CREATE FUNCTION public.label(public.item) RETURNS text LANGUAGE sql IMMUTABLE
            AS $$ SELECT upper($1.name) $$;
        CREATE INDEX item_label ON public.item (public.label(item));
        """,
    )
    restore_section = predata.restore_section

    def late_definitions(*args, **kwargs):
        # The function's slice comes late: without the wait, the index would be built first.
        if "FUNCTION" in Path(kwargs["list_file"]).read_text(encoding="utf-8"):
            time.sleep(1.5)
        return restore_section(*args, **kwargs)

    monkeypatch.setattr(predata, "restore_section", late_definitions)
    result = CopyRun(source_url(source), target, tmp_path, sliced=True).run()
    assert result.target_counts == {"public.item": 300, "public.other": 50}
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
