import gzip

import pytest

from stages.dumps.plainsql import prepare_plain_sql
from stages.errors import ObjectTooLarge, PermanentError

DUMP = b"""--
-- PostgreSQL database dump
--
\\restrict AbC123
SET client_encoding = 'UTF8';
CREATE TABLE public.t (id integer, note text);
ALTER TABLE public.t OWNER TO postgres;
ALTER FUNCTION public.f(integer) OWNER TO "Some Owner";
COPY public.t (id, note) FROM stdin;
1\tGRANT ALL ON TABLE public.t TO x;
2\t\\\\restrict AbC123
\\.
GRANT ALL ON TABLE public.t TO app_user;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO reader;
\\unrestrict AbC123
-- PostgreSQL database dump complete
"""

# Removed statements leave their newlines: the prepared file keeps the user's line numbers.
EXPECTED = b"""--
-- PostgreSQL database dump
--

SET client_encoding = 'UTF8';
CREATE TABLE public.t (id integer, note text);


COPY public.t (id, note) FROM stdin;
1\tGRANT ALL ON TABLE public.t TO x;
2\t\\\\restrict AbC123
\\.




-- PostgreSQL database dump complete
"""


def test_owner_grant_and_restrict_statements_are_dropped_outside_copy_data(tmp_path):
    src, dst = tmp_path / "d.sql", tmp_path / "out.sql"
    src.write_bytes(DUMP)
    assert prepare_plain_sql(str(src), str(dst), gzipped=False, max_bytes=10_000).bytes == len(EXPECTED)
    assert dst.read_bytes() == EXPECTED


SUPERUSER_DUMP = b"""CREATE SCHEMA ext;
CREATE SCHEMA IF NOT EXISTS other;
CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA ext;
CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;
COMMENT ON EXTENSION citext IS 'data type for case-insensitive character strings';
CREATE FUNCTION public.evt() RETURNS event_trigger
    LANGUAGE plpgsql
    AS $$begin end$$;
CREATE EVENT TRIGGER et ON ddl_command_start
   EXECUTE FUNCTION public.evt();
COMMENT ON EVENT TRIGGER et IS 'audits';
CREATE OR REPLACE PROCEDURAL LANGUAGE plperlu;
CREATE TABLE public.kept (id integer);
"""


def test_superuser_objects_are_skipped_and_reported(tmp_path):
    src, dst = tmp_path / "d.sql", tmp_path / "out.sql"
    src.write_bytes(SUPERUSER_DUMP)
    result = prepare_plain_sql(str(src), str(dst), gzipped=False, max_bytes=10_000)
    assert dst.read_bytes() == (
        b"CREATE SCHEMA IF NOT EXISTS ext;\n"
        b"CREATE SCHEMA IF NOT EXISTS other;\n"
        b"CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA ext;\n"
        b'CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;\n'
        b"\n"
        b"CREATE FUNCTION public.evt() RETURNS event_trigger\n"
        b"    LANGUAGE plpgsql\n"
        b"    AS $$begin end$$;\n"
        b"\n\n\n\n"
        b"CREATE TABLE public.kept (id integer);\n"
    )
    assert result.extensions == {"citext": "ext", "uuid-ossp": "public"}
    assert result.extension_comments == {"citext": "data type for case-insensitive character strings"}
    assert [s["object"] for s in result.skipped] == ["EVENT TRIGGER et", "PROCEDURAL LANGUAGE plperlu"]
    assert (
        result.skipped[0]["reason"]
        == "event triggers need superuser, which a managed database does not grant"
    )


def test_gzip_is_decompressed_in_pieces(tmp_path):
    src, dst = tmp_path / "d.sql.gz", tmp_path / "out.sql"
    long_row = b"3\t" + b"x" * (3 * 1024 * 1024) + b"\n"
    src.write_bytes(gzip.compress(DUMP.replace(b"\\.\n", long_row + b"\\.\n")))
    prepare_plain_sql(str(src), str(dst), gzipped=True, max_bytes=10 * 1024 * 1024)
    assert dst.read_bytes() == EXPECTED.replace(b"\\.\n", long_row + b"\\.\n")


def test_output_over_the_limit_is_refused(tmp_path):
    src, dst = tmp_path / "d.sql.gz", tmp_path / "out.sql"
    src.write_bytes(gzip.compress(b"SELECT 1;\n" * 100_000))
    with pytest.raises(ObjectTooLarge, match="larger than the 5000 bytes"):
        prepare_plain_sql(str(src), str(dst), gzipped=True, max_bytes=5000)


def test_truncated_gzip_is_a_clear_permanent_error(tmp_path):
    src, dst = tmp_path / "d.sql.gz", tmp_path / "out.sql"
    src.write_bytes(gzip.compress(DUMP * 50)[:-40])
    with pytest.raises(PermanentError, match="cut short or corrupt"):
        prepare_plain_sql(str(src), str(dst), gzipped=True, max_bytes=10_000_000)


HEADER = b"--\n-- PostgreSQL database dump\n--\n\n"
FOOTER = b"\n--\n-- PostgreSQL database dump complete\n--\n\n"
# Values and bodies whose lines look like the statements the filter drops or rewrites.
LOOKALIKES = (
    b"GRANT ALL ON TABLE public.t TO evil;",
    b"ALTER TABLE public.t OWNER TO evil;",
    b"CREATE SCHEMA hidden;",
    b"CREATE EVENT TRIGGER et ON ddl_command_start",
    b"   EXECUTE FUNCTION public.evt();",
    b"COPY public.t (id, note) FROM stdin;",
    b"\\.",
    b"\\restrict AbC123",
    b"COMMENT ON EXTENSION citext IS 'x';",
)


def filtered(tmp_path, script: bytes, **kwargs):
    src, dst = tmp_path / "d.sql", tmp_path / "out.sql"
    src.write_bytes(script)
    return prepare_plain_sql(
        str(src), str(dst), gzipped=False, max_bytes=10_000_000, **kwargs
    ), dst.read_bytes()


def test_lines_inside_string_values_and_bodies_are_never_touched(tmp_path):
    text = b"\n".join(LOOKALIKES)
    body = (
        b"CREATE FUNCTION public.f() RETURNS text\n    LANGUAGE plpgsql\n    AS $_$\nbegin\n"
        + text.replace(b"\\", b"")
        + b"\nreturn 'x';\nend\n$_$;\n"
    )
    inserts = b"".join(
        b"INSERT INTO public.t VALUES (%d, '%s\n%s');\n"
        % (i, line.replace(b"'", b"''"), line.replace(b"'", b"''"))
        for i, line in enumerate(LOOKALIKES)
    )
    escaped = b"INSERT INTO public.t VALUES (99, E'it\\'s\\n\nGRANT x TO y;\n');\n"
    kept = b"CREATE TABLE public.t (id integer, note text);\n" + body + inserts + escaped
    result, out = filtered(tmp_path, HEADER + kept + b"ALTER TABLE public.t OWNER TO postgres;\n" + FOOTER)
    assert out == HEADER + kept + b"\n" + FOOTER
    assert result.skipped == [] and result.extension_comments == {}


def test_a_dump_without_its_footer_is_refused_as_cut_short(tmp_path):
    with pytest.raises(PermanentError, match="cut short.*pg_dump"):
        filtered(tmp_path, HEADER + b"CREATE TABLE public.t (id integer);\n")
    filtered(tmp_path, HEADER + b"CREATE TABLE public.t (id integer);\n" + FOOTER)


def test_a_script_ending_inside_copy_data_is_refused_as_cut_short(tmp_path):
    with pytest.raises(PermanentError, match="cut short"):
        filtered(tmp_path, b"CREATE TABLE t (id integer);\nCOPY t (id) FROM stdin;\n1\n2\n")
