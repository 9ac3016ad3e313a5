"""Hostile: a table a rehearsed entry's SQL names must not be implied
(stages.preflight.implied: "is rehearsed anyway when a rehearsed entry ... names it")."""

from __future__ import annotations

import pytest

from stages.preflight.implied import implied_entries
from tests.support.rehearsing import Entry


def table(name: str) -> str:
    return f"CREATE TABLE public.{name} (\n    code text\n);"


@pytest.mark.parametrize(
    "body",
    [
        # A double quote inside string literals: names_in reads from it to the next one as one name.
        "BEGIN\n    IF z = '\"' THEN RETURN false; END IF;\n"
        "    RETURN EXISTS (SELECT 1 FROM public.zone_codes WHERE code = replace(z, '\"', ''));\nEND ",
        # The same in a comment of the body.
        'BEGIN\n    -- strip "quotes\n    RETURN EXISTS (SELECT 1 FROM public.zone_codes WHERE code = z); -- "\nEND ',
    ],
    ids=["quotes-in-strings", "quotes-in-comments"],
)
def test_a_table_a_function_body_reads_is_named_whatever_quotes_the_body_holds(body):
    blocks = {
        1: table("aaa_first"),
        2: table("zone_codes"),
        3: "CREATE FUNCTION public.known_zone(z text) RETURNS boolean\n    LANGUAGE plpgsql\n"
        f"    AS $$\n{body}$$;",
    }
    entries = [
        Entry(1, "TABLE", name="aaa_first"),
        Entry(2, "TABLE", name="zone_codes"),
        Entry(3, "FUNCTION"),
    ]
    assert 2 not in implied_entries(entries, blocks)


def test_a_table_named_unquoted_with_any_non_ascii_character_is_named():
    # PostgreSQL takes every non-ASCII character into an unquoted identifier (U+00B7 here).
    blocks = {
        1: table("aaa_first"),
        2: table('"zone·codes"'),
        3: "CREATE FUNCTION public.known_zone(z text) RETURNS boolean\n    LANGUAGE plpgsql\n"
        "    AS $$BEGIN RETURN EXISTS (SELECT 1 FROM public.zone·codes WHERE code = z); END$$;",
    }
    entries = [
        Entry(1, "TABLE", name="aaa_first"),
        Entry(2, "TABLE", name="zone·codes"),
        Entry(3, "FUNCTION"),
    ]
    assert 2 not in implied_entries(entries, blocks)


class CountingEntry:
    """An entry that counts how often its kind is read (implied_entries reads it once per
    implied entry on every pass of its `while True` loop)."""

    reads = 0

    def __init__(self, dump_id: int, desc: str, name: str = "") -> None:
        self.dump_id, self._desc, self.name = dump_id, desc, name
        self.depends_on: tuple[int, ...] = ()
        self.namespace = "public"

    @property
    def desc(self) -> str:
        CountingEntry.reads += 1
        return self._desc


def test_a_chain_of_tables_each_naming_the_next_in_a_column_takes_linear_work_not_quadratic():
    # A table rehearsed because it is named adds its own column names to `named`; a
    # column named after the next table makes that one named on the next pass, and so
    # on: one pass per table, each pass over every implied entry. 8,000 such tables take
    # 3.6 s of CPU here, 20,000 about 22 s (unbounded by the rehearsal's deadline).
    n = 3000
    blocks = {
        0: "CREATE FUNCTION public.f() RETURNS integer\n    LANGUAGE sql\n    AS $$ SELECT 1 FROM t1 $$;"
    }
    entries = [CountingEntry(0, "FUNCTION"), CountingEntry(1, "TABLE", "a")]
    blocks[1] = "CREATE TABLE public.a (\n    x integer\n);"
    for i in range(1, n + 1):
        blocks[i + 1] = f"CREATE TABLE public.t{i} (\n    t{i + 1} integer\n);"
        entries.append(CountingEntry(i + 1, "TABLE", f"t{i}"))
    CountingEntry.reads = 0
    assert implied_entries(entries, blocks) == set()
    assert CountingEntry.reads <= 20 * len(entries), CountingEntry.reads
