"""Reading the head of a plain dump stays bounded and linear on hostile input."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

from stages.dumps.contents import MAX_LINE, read_sql, read_sql_file, read_tail, sql_lines
from tests.support.bombs import MiB, gzip_bomb

SCRIPT = (
    "--\n-- PostgreSQL database dump\n--\n"
    "-- Name: sales; Type: SCHEMA; Schema: -; Owner: postgres\n"
    "CREATE SCHEMA sales;\n"
    "-- Name: citext; Type: EXTENSION; Schema: -; Owner: -\n"
    "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public;\n"
    'create extension "uuid-ossp";\n'
    "  CREATE TRUSTED LANGUAGE plmine HANDLER h;\n"
    "CREATE LANGUAGE plsampleu HANDLER h;\n"
    "-- Name: t; Type: TABLE; Schema: public; Owner: postgres\n"
    "-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: postgres\n"
    "-- Name: 16400; Type: BLOB; Schema: -; Owner: postgres\n"
    "-- Name: audit; Type: EVENT TRIGGER; Schema: -; Owner: postgres\n"
)


def test_the_file_scan_finds_what_the_line_reader_finds(tmp_path: Path) -> None:
    path = tmp_path / "dump.sql"
    path.write_text(SCRIPT)
    by_lines = read_sql(SCRIPT.splitlines(), complete=True)
    scanned = read_sql_file(str(path), gzipped=False, complete=True)
    assert dataclasses.replace(scanned, text_bytes=0) == by_lines
    assert scanned.extensions == ["citext", "uuid-ossp"]
    assert scanned.schemas == ["sales"] and scanned.table_count == 1 and scanned.large_objects == 1
    assert scanned.event_triggers == ["audit"]
    assert scanned.untrusted_languages == ["plmine", "plsampleu"]
    assert scanned.text_bytes == len(SCRIPT) and scanned.complete


def test_a_gzip_bomb_is_decompressed_only_up_to_the_cap(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", b"--\n", 256 * MiB, suffix=b"CREATE EXTENSION plperlu;\n")
    assert bomb.stat().st_size < MiB // 2
    contents = read_sql_file(str(bomb), gzipped=True, complete=True, max_text=4 * MiB)
    assert contents.text_bytes == 4 * MiB
    assert contents.text_capped and not contents.complete
    assert contents.extensions == []  # beyond the cap: not read
    lines = sql_lines(str(bomb), gzipped=True, max_text=4 * MiB)
    assert sum(len(line) + 1 for line in lines) <= 4 * MiB + 1


def test_a_single_huge_line_is_read_only_up_to_max_line(tmp_path: Path) -> None:
    # One 30 MB line (a COPY row, or hostile): it used to be joined a chunk at a time
    # (quadratic) and held whole; only its first MAX_LINE bytes are looked at now.
    path = tmp_path / "line.sql"
    with open(path, "wb") as out:
        out.write(b"-- Name: x; Type: TABLE; Schema: public; Owner: ")
        out.write(b"y" * (30 * MiB))
        out.write(b"\nCREATE EXTENSION hstore;\n")
    lines = list(sql_lines(str(path), gzipped=False))
    assert max(len(line) for line in lines) <= MAX_LINE
    assert lines[-1] == "CREATE EXTENSION hstore;"
    contents = read_sql_file(str(path), gzipped=False, complete=True)
    assert contents.table_count == 1 and contents.extensions == ["hstore"]


def test_millions_of_tiny_lines_then_an_extension(tmp_path: Path) -> None:
    path = tmp_path / "lines.sql.gz"
    gzip_bomb(path, b"--\n", 12 * MiB, suffix=b"CREATE EXTENSION hstore;\n")
    contents = read_sql_file(str(path), gzipped=True, complete=True, max_text=64 * MiB)
    assert contents.extensions == ["hstore"] and contents.complete and not contents.text_capped


def test_a_comment_line_built_to_backtrack_is_read_once(tmp_path: Path) -> None:
    line = "-- Name: " + "; Type: TABLE; Schema: " * 2000 + "x"
    contents = read_sql([line, "-- Name: t; Type: TABLE; Schema: a; Type: X; Owner: p"], complete=True)
    assert contents.table_count == 1


def test_a_gzip_stream_cut_short_still_yields_what_it_holds(tmp_path: Path) -> None:
    data = gzip.compress(SCRIPT.encode() * 2000)
    head = tmp_path / "head.gz"
    head.write_bytes(data[: len(data) // 2])
    contents = read_sql_file(str(head), gzipped=True, complete=False)
    assert contents.extensions == ["citext", "uuid-ossp"] and not contents.complete


def test_lines_inside_strings_and_bodies_are_not_read_as_objects(tmp_path: Path) -> None:
    path = tmp_path / "dump.sql"
    path.write_bytes(
        b"CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$\nbegin\n"
        b"CREATE EXTENSION plperlu;\n-- Name: audit; Type: EVENT TRIGGER; Schema: -; Owner: postgres\nend $$;\n"
        b"INSERT INTO t VALUES ('\nCREATE LANGUAGE plsampleu HANDLER h;\n');\n"
    )
    contents = read_sql_file(str(path), gzipped=False, complete=True)
    assert contents.extensions == [] and contents.untrusted_languages == [] and contents.event_triggers == []


def test_a_pg_dump_script_without_its_footer_is_cut_short_only_when_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "dump.sql"
    path.write_text(SCRIPT)
    assert "the dump is cut short" in (read_sql_file(str(path), gzipped=False, complete=True).refusal or "")
    assert read_sql_file(str(path), gzipped=False, complete=False).refusal is None
    path.write_text(SCRIPT + "--\n-- PostgreSQL database dump complete\n--\n")
    assert read_sql_file(str(path), gzipped=False, complete=True).refusal is None


def test_the_tail_of_a_large_upload_says_whether_it_is_cut_short(tmp_path: Path) -> None:
    head, tail = tmp_path / "head.sql", tmp_path / "tail"
    head.write_text(SCRIPT)
    tail.write_bytes(b"1\tx\n\\.\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n\n")
    contents = read_sql_file(str(head), gzipped=False, complete=False)
    read_tail(contents, str(tail))
    assert contents.refusal is None
    tail.write_bytes(b"1\tx\n2\ty\n")
    read_tail(contents, str(tail))
    assert (contents.refusal or "").startswith("the dump is cut short: its last line is not")


def test_a_create_dump_is_refused_from_its_head(tmp_path: Path) -> None:
    path = tmp_path / "head.sql"
    path.write_text(
        SCRIPT.replace("CREATE SCHEMA sales;", "CREATE DATABASE app;\n\\connect app\nCREATE SCHEMA sales;")
    )
    assert "pg_dump --create" in (read_sql_file(str(path), gzipped=False, complete=False).refusal or "")


def test_a_gzip_file_of_several_members_is_read_whole(tmp_path):
    """`gzip -c a > f; gzip -c b >> f` makes two members; gunzip (and the worker) read
    both, and so must preflight, or the script looks cut short."""
    import gzip as gz

    from stages.dumps.contents import sql_lines

    path = tmp_path / "dump.sql.gz"
    path.write_bytes(gz.compress(b"CREATE TABLE a (id int);\n") + gz.compress(b"CREATE TABLE b (id int);\n"))
    assert list(sql_lines(str(path), gzipped=True)) == [
        "CREATE TABLE a (id int);",
        "CREATE TABLE b (id int);",
    ]
