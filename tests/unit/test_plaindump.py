"""How a plain dump was made, judged from its statements (stages.dumps.plaindump)."""

import pytest

from stages.dumps.plaindump import PlainDumpShape, create_extension, language_statement
from stages.dumps.plainsql import user_terms
from stages.dumps.sqlscript import Script, read_script

HEADER = b"--\n-- PostgreSQL database dump\n--\n\\restrict k1\nSET client_encoding = 'UTF8';\n"
FOOTER = b"--\n-- PostgreSQL database dump complete\n--\n\\unrestrict k1\n"


def refusal(body: bytes, *, whole: bool = True) -> str | None:
    shape = PlainDumpShape()
    for piece in read_script([HEADER + body + FOOTER]):
        shape.see(piece)
    return shape.refusal(script_of(HEADER + body + FOOTER), whole=whole)


def script_of(data: bytes) -> Script:
    script = Script()
    for _ in read_script([data], script):
        pass
    return script


@pytest.mark.parametrize(
    ("body", "fix"),
    [
        (
            b"CREATE DATABASE app WITH TEMPLATE = template0;\n\\connect app\nCREATE TABLE t (id int);\n",
            "--create (-C): at line 6",
        ),
        (b"\\connect app\nCREATE TABLE t (id int);\n", "without --create"),
        (
            b"ALTER TABLE ONLY public.t DROP CONSTRAINT t_pkey;\nDROP TABLE public.t;\nCREATE TABLE public.t (id int);\n",
            "(from line 6)",
        ),
        (
            b"COPY public.t (id) FROM stdin;\n1\n\\.\n",
            "line 6 loads rows into a table the dump never creates",
        ),
        (b"INSERT INTO public.t VALUES (1);\n", "without --data-only"),
        (b"CREATE ROLE app;\n\\connect a\n", "pg_dumpall output"),
    ],
)
def test_refusals_name_the_pg_dump_options(body, fix):
    assert fix in (refusal(body) or "")


@pytest.mark.parametrize(
    "body",
    [
        b"ALTER TABLE IF EXISTS ONLY public.t DROP CONSTRAINT IF EXISTS t_pkey;\nDROP TABLE IF EXISTS public.t;\n"
        b"CREATE TABLE public.t (id int);\nCOPY public.t (id) FROM stdin;\n1\n\\.\n",
        b"CREATE TABLE public.t (id int);\nINSERT INTO public.t VALUES (1);\nDROP TABLE public.t;\n",
        b"CREATE TABLE public.t (note text);\nINSERT INTO public.t VALUES ('\n\\connect other\nCREATE DATABASE x;\n');\n",
    ],
)
def test_dumps_an_import_can_restore_are_not_refused(body):
    assert refusal(body) is None


def test_a_head_is_not_refused_for_a_missing_footer():
    data = HEADER + b"CREATE TABLE t (id int);\n"
    shape = PlainDumpShape()
    for piece in read_script([data]):
        shape.see(piece)
    assert shape.refusal(script_of(data), whole=False) is None
    assert "cut short" in (shape.refusal(script_of(data), whole=True) or "")


def test_statement_parsers_read_whole_statements():
    assert (
        create_extension(b'CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;').name
        == "uuid-ossp"
    )
    split = create_extension(b"create\nextension\n  hstore;")
    assert split is not None and (split.name, split.schema, split.if_not_exists) == ("hstore", None, False)
    assert language_statement(b"CREATE OR REPLACE PROCEDURAL LANGUAGE plperlu;") == ("CREATE", "plperlu")
    assert language_statement(b"COMMENT ON LANGUAGE plperlu IS 'x';") == ("COMMENT ON", "plperlu")


def test_psql_errors_are_put_in_the_users_terms():
    message = 'psql:/work/job_1/dump.sql:1234: ERROR:  relation "nowhere" does not exist'
    assert user_terms(message) == 'line 1234 of your dump: ERROR:  relation "nowhere" does not exist'
    assert user_terms("psql:<dump>:7: ERROR:  x\npsql:<dump>:9: FATAL:  y") == (
        "line 7 of your dump: ERROR:  x\nline 9 of your dump: FATAL:  y"
    )
    assert user_terms("pg_restore: error: x") == "pg_restore: error: x"
