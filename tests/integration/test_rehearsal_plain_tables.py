"""The rehearsal leaves plain tables to their schema (stages.preflight.implied): what it
runs, and that what depends on such a table, or names it, still finds it there."""

from __future__ import annotations

import re

import pytest

import stages.preflight.rehearsal as rehearsal
from tests.support import pg
from tests.support.rehearsing import rehearse_source

SOURCE = """
CREATE SCHEMA other;
CREATE TABLE public.first (id int PRIMARY KEY, label text NOT NULL);
CREATE TABLE public.plain_a (id int PRIMARY KEY, first_id int REFERENCES public.first, note text);
CREATE TABLE public.plain_b (id bigint NOT NULL, at timestamptz, amount numeric(10,2));
CREATE INDEX plain_b_at ON public.plain_b (at);
CREATE TABLE public.viewed (id int, body text);
CREATE VIEW public.recent AS SELECT id FROM public.viewed;
CREATE TABLE public.named (code text);
CREATE FUNCTION public.codes() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM public.named $$;
CREATE TABLE public.zone_codes (code text PRIMARY KEY);
CREATE FUNCTION public.known_zone(text) RETURNS boolean LANGUAGE sql
    AS $$ SELECT EXISTS (SELECT 1 FROM public.zone_codes WHERE code = $1) $$;
CREATE TABLE public.deliveries (id int, zone text CHECK (public.known_zone(zone)));
CREATE TABLE other.one (id int);
CREATE TABLE other.two (id int);
"""


@pytest.fixture
def source():
    name = pg.create_db(pg.scratch_name("capysrc_plain_tables"))
    pg.psql(name, text=SOURCE)
    yield name
    pg.drop_db(name)


def test_plain_tables_but_the_first_of_each_schema_are_not_run_and_checks_still_see_every_table(
    source, tmp_path, monkeypatch
):
    ran: list[str] = []
    real = rehearsal.run_entries

    def spying(scratch, preamble, blocks, deadline):
        ran.extend(blocks.values())
        return real(scratch, preamble, blocks, deadline)

    monkeypatch.setattr(rehearsal, "run_entries", spying)
    result = rehearse_source(source, tmp_path)
    created = {m for block in ran for m in re.findall(r"CREATE TABLE (\S+) \(", block)}
    assert created == {
        "public.first",  # the schema's first plain table
        "other.one",
        "public.viewed",  # a view depends on it
        "public.named",  # a function names it
        "public.zone_codes",  # a CHECK's function reads it: the check is judged against it
        "public.deliveries",  # not plain: a CHECK
    }
    # The CHECK that reads another table is still found, and refused.
    assert len(result.refused) == 1 and "public.zone_codes" in result.refused[0], result.refused
    # plain_a, plain_b, other.two, and the keys and index.
    assert result.implied == 3 + 5
