"""Hostile, end to end: a function whose SQL-standard body reads a column named `begin`
(`RETURN (r).begin`) makes the rehearsal's split (stages.preflight.rehearsal.split_script)
run every later entry inside that function's block: a later entry's managed-target error
is then blamed on the harmless function, which is skipped, and what a table's data needs
(a CHECK calling a LEAKPROOF function, superuser-only) is not refused. Without the
function, the same source is refused."""

from __future__ import annotations

from tests.support import pg
from tests.support.rehearsing import rehearse_source

SOURCE = """
CREATE TABLE t (id int PRIMARY KEY, "begin" int);
CREATE FUNCTION f(r t) RETURNS int LANGUAGE sql RETURN r.begin;
CREATE FUNCTION lp(x int) RETURNS boolean LANGUAGE sql IMMUTABLE LEAKPROOF RETURN x > 0;
CREATE TABLE w (x int CHECK (lp(x)));
"""


def test_a_body_reading_a_column_named_begin_does_not_hide_a_refusal(scratch_db, tmp_path):
    name = scratch_db("capysrc_hostile_begin")
    pg.psql(name, text=SOURCE)
    result = rehearse_source(name, tmp_path)
    assert not [
        item for item in result.skipped if item["key"][0] == "FUNCTION" and item["key"][2] == "f(public.t)"
    ]
    assert any("lp(integer)" in line and "public.w" in line for line in result.refused), result
