"""Hostile: the rehearsal leaves plain tables out unless a rehearsed entry names them
(stages.preflight.implied.names_in); the CHECK-reads-another-table guard
(rehearsal.risky_checks) only sees tables that exist in the scratch database."""

from __future__ import annotations

import pytest

from tests.support import pg
from tests.support.rehearsing import rehearse_source

# A CHECK whose function reads another table, exactly like test_rehearsal_plain_tables'
# zone_codes, except that the body holds a double quote inside a string literal before
# the table's name (a body that escapes CSV or JSON does). names_in() reads the text
# from that quote to the next one as ONE quoted name, so `zone_codes` is not "named",
# the plain table is left out of the scratch database, and risky_checks cannot see it.
SOURCE = """
CREATE TABLE public.aaa_first (id int);
CREATE TABLE public.zone_codes (code text);
CREATE FUNCTION public.known_zone(z text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF z = '"' THEN RETURN false; END IF;
    RETURN EXISTS (SELECT 1 FROM public.zone_codes WHERE code = replace(z, '"', ''));
END $$;
CREATE TABLE public.deliveries (id int, zone text CHECK (public.known_zone(zone)));
"""

# The same with the name written unquoted with a character PostgreSQL takes in an
# unquoted identifier (any non-ASCII byte) but Python's \\w does not (U+00B7).
SOURCE_DOT = """
CREATE TABLE public.aaa_first (id int);
CREATE TABLE public."zone·codes" (code text);
CREATE FUNCTION public.known_zone(z text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM public.zone·codes WHERE code = z);
END $$;
CREATE TABLE public.deliveries (id int, zone text CHECK (public.known_zone(zone)));
"""


@pytest.fixture(params=[SOURCE, SOURCE_DOT], ids=["stray-quote", "unquoted-middle-dot"])
def source(request):
    name = pg.create_db(pg.scratch_name("capysrc_hostile_plain"))
    pg.psql(name, text=request.param)
    yield name
    pg.drop_db(name)


def test_a_check_reading_a_plain_table_is_refused_whatever_else_its_function_body_holds(source, tmp_path):
    result = rehearse_source(source, tmp_path)
    # The table the CHECK's function reads is plain and not its schema's first: only its
    # name in the function's body has it created in the scratch database, where the
    # CHECK is judged. A quote in a string, or a name in another script, once hid it.
    assert len(result.refused) == 1 and "zone" in result.refused[0], (result.refused, result.implied)
