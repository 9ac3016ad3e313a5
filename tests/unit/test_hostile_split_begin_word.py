"""Hostile: split_script must give every "-- TOC entry N" header of pg_restore's
rendering its own block.

The scanner follows psql's BEGIN … END heuristic for SQL-standard function bodies: in a
statement starting CREATE FUNCTION, an unquoted word `begin` at parenthesis depth 0
holds the following semicolons. pg_dump deparses a body that reads a column or a
parameter named begin (an unreserved keyword, so left unquoted) as `RETURN (r).begin;`,
and every entry after it (until an `end`, i.e. usually the end of the script) becomes
part of that function's "statement": their headers are never looked for, and they all
run, and fail, as the function's block."""

from __future__ import annotations

from stages.preflight.rehearsal import split_script


def _entry(n: int, desc: str, name: str, sql: str) -> str:
    return (
        f"--\n-- TOC entry {n} (class 1255 OID {n})\n-- Name: {name}; Type: {desc}; Schema: public; Owner: -\n--\n\n"
        f"{sql}\n\n\n"
    )


SCRIPT = (
    "SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;\n\n"
    + _entry(214, "TABLE", "t", "CREATE TABLE public.t (\n    id integer NOT NULL,\n    begin integer\n);")
    # pg_dump 15's rendering of: CREATE FUNCTION f(r t) RETURNS int LANGUAGE sql RETURN r.begin;
    + _entry(
        216,
        "FUNCTION",
        "f(public.t)",
        "CREATE FUNCTION public.f(r public.t) RETURNS integer\n    LANGUAGE sql\n    RETURN (r).begin;",
    )
    # ... and of: CREATE FUNCTION g(begin int) RETURNS int LANGUAGE sql RETURN begin + 1;
    + _entry(
        228,
        "FUNCTION",
        "g(integer)",
        "CREATE FUNCTION public.g(begin integer) RETURNS integer\n    LANGUAGE sql\n    RETURN (begin + 1);",
    )
    + _entry(215, "TABLE", "u", "CREATE TABLE public.u (\n    id integer NOT NULL\n);")
    + _entry(
        3203,
        "CONSTRAINT",
        "t t_pkey",
        "ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY (id);",
    )
)


def test_a_function_body_reading_a_column_named_begin_does_not_swallow_the_next_entries():
    _, blocks = split_script(SCRIPT)
    assert sorted(blocks) == [214, 215, 216, 228, 3203]
    for n, block in blocks.items():
        assert block.count("CREATE") + block.count("ALTER") == 1, (n, block)


def test_a_parameter_named_begin_alone_does_not_swallow_the_next_entries():
    script = (
        "SET client_encoding = 'UTF8';\n\n"
        + _entry(
            228,
            "FUNCTION",
            "g(integer)",
            "CREATE FUNCTION public.g(begin integer) RETURNS integer\n    LANGUAGE sql\n    RETURN begin;",
        )
        + _entry(215, "TABLE", "u", "CREATE TABLE public.u (\n    id integer NOT NULL\n);")
    )
    _, blocks = split_script(script)
    assert sorted(blocks) == [215, 228]
