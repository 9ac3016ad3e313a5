"""The plain-SQL reader: statements, COPY data and meta-commands as psql splits them."""

import pytest

from stages.dumps.sqlscript import COPY, META, SPACE, STATEMENT, Script, read_script, statement_words

HOSTILE = (
    b"SET standard_conforming_strings = on;\n"
    b"INSERT INTO public.t VALUES (1, 'a\n"
    b"GRANT ALL ON TABLE public.t TO evil;\n"
    b"COPY public.t FROM stdin;\n"
    b"\\.\n"
    b"\\restrict abc\n"
    b"', E'it\\'s; \\\\', $$x;\nALTER TABLE t OWNER TO y;\n$$, $a$ $$ ; $a$, \"q\"\"; \");\n"
    b"/* outer /* inner ; */ still ; */ SELECT 1;\n"
    b"CREATE FUNCTION f() RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n SELECT 1;\n SELECT CASE WHEN true THEN 2 END;\nEND;\n"
    b"\\restrict abc\n"
    b"COPY public.t (a) FROM stdin;\n"
    b"x\\\\.\n"
    b"GRANT y TO z;\n"
    b"\\.\n"
    b"SELECT 2 -- trailing; comment\n;\n"
    b"select a$b$c from t;\n"
)


def split(data: bytes, size: int = 1 << 20, script: Script | None = None):
    pieces = list(read_script((data[i : i + size] for i in range(0, len(data), size)), script))
    assert b"".join(p.data for p in pieces) == data  # the reader never changes a byte
    return pieces


def shape(pieces):
    return [(p.kind, p.line, p.data) for p in pieces if p.kind != SPACE]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_hostile_script_splits_as_psql_does_in_any_chunking(size):
    found = shape(split(HOSTILE, size))
    assert found == shape(split(HOSTILE))
    kinds = [(kind, line) for kind, line, _ in found]
    assert kinds == [
        (STATEMENT, 1),
        (STATEMENT, 2),
        (STATEMENT, 10),
        (STATEMENT, 11),
        (META, 16),
        (STATEMENT, 17),
        (COPY, 18),
        (STATEMENT, 21),
        (STATEMENT, 23),
    ]
    assert found[1][2].endswith(b'"q""; ");')
    assert found[3][2].endswith(b"END;\nEND;")
    assert found[6][2] == b"x\\\\.\nGRANT y TO z;\n\\.\n"


def test_backslash_escapes_follow_standard_conforming_strings():
    off = b"SET standard_conforming_strings = off;\nSELECT 'a\\';b';\nSELECT 2;\n"
    assert [p.data for p in split(off) if p.kind == STATEMENT][1] == b"SELECT 'a\\';b';"
    on = b"SELECT 'a\\';\nSELECT 2;\n"
    assert [p.data for p in split(on) if p.kind == STATEMENT] == [b"SELECT 'a\\';", b"SELECT 2;"]
    # An identifier ending in e is not an E'' prefix.
    assert len([p for p in split(b"SELECT name'x\\';\nSELECT 2;\n") if p.kind == STATEMENT]) == 2


def test_crlf_bom_and_header_footer():
    data = (
        b"\xef\xbb\xbf--\r\n-- PostgreSQL database dump\r\n--\r\n\r\nCOPY t (a) FROM stdin;\r\n1\r\n\\.\r\n"
        b"\\unrestrict k\r\n--\r\n-- PostgreSQL database dump complete\r\n--\r\n"
    )
    script = Script()
    pieces = split(data, 5, script)
    assert [p.kind for p in pieces if p.kind != SPACE] == [STATEMENT, COPY, META]
    assert script.pg_dump_header and script.footer and not script.cut_short
    assert script.lines == 11


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.97])
def test_a_dump_cut_at_a_line_boundary_is_cut_short(cut):
    dump = (
        b"--\n-- PostgreSQL database dump\n--\n"
        + b"CREATE TABLE t (a int);\n" * 100
        + (b"\n--\n-- PostgreSQL database dump complete\n--\n\n")
    )
    end = dump.rfind(b"\n", 0, int(len(dump) * cut)) + 1
    script = Script()
    split(dump[:end], script=script)
    assert script.cut_short and not script.footer
    whole = Script()
    split(dump, script=whole)
    assert not whole.cut_short


@pytest.mark.parametrize(
    ("tail", "inside"),
    [
        (b"SELECT 'abc", "a quoted string"),
        (b"CREATE FUNCTION f() AS $body$ begin", "a dollar-quoted body"),
        (b"COPY t (a) FROM stdin;\n1\n2\n", "the data of a COPY statement"),
        (b"SELECT /* never closed", "a /* comment */"),
    ],
)
def test_ending_inside_a_token_is_cut_short(tail, inside):
    script = Script()
    split(b"SELECT 1;\n" + tail, 3, script)
    assert script.unfinished == inside and script.unfinished_line == 2 and script.cut_short


def test_a_last_statement_without_semicolon_is_not_cut_short():
    script = Script()
    pieces = split(b"SELECT 1;\nSELECT 2\n", script=script)
    assert pieces[-1].data == b"SELECT 2\n" and script.trailing_statement == 2 and not script.cut_short


def test_very_long_lines_come_in_bounded_pieces():
    value = b"x" * (5 * 1024 * 1024)
    data = (
        b"INSERT INTO t VALUES ('" + value + b"');\nCOPY t (a) FROM stdin;\n" + value + b"\n\\.\nSELECT 1;\n"
    )
    pieces = split(data, 1 << 20)
    assert max(len(p.data) for p in pieces) < 3 * 1024 * 1024
    statements = [p for p in pieces if p.kind == STATEMENT]
    assert statements[0].first and not statements[0].last and statements[-1].data == b"SELECT 1;"
    copy = [p for p in pieces if p.kind == COPY]
    assert b"".join(p.data for p in copy) == value + b"\n\\.\n"
    assert copy[0].first and copy[-1].last


def test_statement_words_skip_comments():
    assert statement_words(b"/* x */ ALTER -- y\n table ONLY t", 3) == ["ALTER", "TABLE", "ONLY"]


@pytest.mark.parametrize("size", [1, 5, 1 << 20])
def test_a_dollar_body_holding_copy_from_stdin_is_one_statement(size):
    data = (
        b"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $fn$\nbegin\n"
        b"COPY public.t (a) FROM stdin;\n\\.\nEXECUTE $x$ GRANT a TO b; $x$;\nend\n$fn$;\n"
        b"COPY public.t (a) FROM stdin;\n\\\\.\n\\.\n"
    )
    pieces = [p for p in split(data, size) if p.kind != SPACE]
    assert [(p.kind, p.line) for p in pieces] == [(STATEMENT, 1), (STATEMENT, 8), (COPY, 9)]
    assert pieces[2].data == b"\\\\.\n\\.\n"  # a value "\." is escaped in COPY data


def test_a_doubled_quote_at_a_chunk_boundary_stays_inside_the_string():
    data = b"SELECT 'a'';b';\nSELECT 2;\n"
    for size in range(1, len(data)):
        statements = [p.data for p in split(data, size) if p.kind == STATEMENT]
        assert statements == [b"SELECT 'a'';b';", b"SELECT 2;"], size


def test_standard_conforming_strings_changed_other_than_by_set_is_refused_not_guessed():
    """psql follows set_config too; a reader that did not would take the middle of
    'a\\'; GRANT …; --\\'' for a statement (and the filter would drop it)."""
    from stages.dumps.sqlscript import ScriptError

    script = (
        b"SELECT pg_catalog.set_config('standard_conforming_strings', 'off', false);\n"
        b"INSERT INTO t VALUES ('a\\'; GRANT ALL ON t TO bob; --\\'');\n"
    )
    with pytest.raises(ScriptError, match="standard_conforming_strings"):
        list(read_script([script]))


def test_set_reset_and_default_forms_of_standard_conforming_strings_are_followed():
    script = (
        b"SET standard_conforming_strings = off;\n"
        b"INSERT INTO t VALUES ('a\\'; b');\n"
        b"RESET ALL;\n"
        b"INSERT INTO t VALUES ('c\\');\n"
        b"SET standard_conforming_strings TO off;\n"
        b"SET standard_conforming_strings = DEFAULT;\n"
        b"INSERT INTO t VALUES ('d\\');\n"
    )
    statements = [p.data for p in read_script([script]) if p.kind == "statement"]
    assert statements[1] == b"INSERT INTO t VALUES ('a\\'; b');"
    assert statements[3] == b"INSERT INTO t VALUES ('c\\');"
    assert statements[6] == b"INSERT INTO t VALUES ('d\\');"


def test_a_rolled_back_change_of_standard_conforming_strings_is_undone_and_one_inside_a_block_refused():
    from stages.dumps.sqlscript import ScriptError

    rolled_back = (
        b"SET standard_conforming_strings = off;\nBEGIN;\nROLLBACK;\nINSERT INTO t VALUES ('a\\'; b');\n"
    )
    statements = [p.data for p in read_script([rolled_back]) if p.kind == "statement"]
    assert statements[-1] == b"INSERT INTO t VALUES ('a\\'; b');"
    inside = (
        b"SET standard_conforming_strings = off;\nBEGIN;\nSET standard_conforming_strings = on;\nROLLBACK;\n"
    )
    with pytest.raises(ScriptError, match="inside a transaction block"):
        list(read_script([inside]))


def test_a_functions_own_standard_conforming_strings_setting_is_not_the_sessions():
    script = (
        b"CREATE FUNCTION public.g() RETURNS int LANGUAGE sql\n    SET standard_conforming_strings TO 'off'\n"
        b"    AS $$SELECT 1$$;\n"
        b"INSERT INTO t VALUES ('c\\');\n"
    )
    statements = [p.data for p in read_script([script]) if p.kind == "statement"]
    assert statements[-1] == b"INSERT INTO t VALUES ('c\\');"
