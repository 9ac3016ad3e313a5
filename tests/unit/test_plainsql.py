import gzip

import pytest

from stages.errors import ObjectTooLarge, PermanentError
from stages.plainsql import prepare_plain_sql

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
"""

EXPECTED = b"""--
-- PostgreSQL database dump
--
SET client_encoding = 'UTF8';
CREATE TABLE public.t (id integer, note text);
COPY public.t (id, note) FROM stdin;
1\tGRANT ALL ON TABLE public.t TO x;
2\t\\\\restrict AbC123
\\.
"""


def test_owner_grant_and_restrict_lines_are_dropped_outside_copy_data(tmp_path):
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
        b"CREATE FUNCTION public.evt() RETURNS event_trigger\n"
        b"    LANGUAGE plpgsql\n"
        b"    AS $$begin end$$;\n"
        b"CREATE TABLE public.kept (id integer);\n"
    )
    assert result.extensions == {"citext": "ext", "uuid-ossp": "public"}
    assert result.extension_comments == {"citext": "data type for case-insensitive character strings"}
    assert [s["object"] for s in result.skipped] == ["EVENT TRIGGER et", "PROCEDURAL LANGUAGE plperlu"]
    assert result.skipped[0]["reason"] == "event triggers need superuser, which a managed database does not grant"


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
    with pytest.raises(PermanentError, match="truncated or corrupt"):
        prepare_plain_sql(str(src), str(dst), gzipped=True, max_bytes=10_000_000)
