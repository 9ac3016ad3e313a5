"""Plain-SQL uploads (pg_dump -Fp, gzipped or not) through the real import path: what
they hold is restored unchanged, or they are refused before the live database changes
with a message naming the pg_dump options to use."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest

from tests.support import pg
from tests.support.api import api_client
from tests.support.imports import create_upload, upload_and_import
from tests.support.uploading import upload_file
from tests.support.world import make_world

# Lines a line-by-line filter takes for statements it drops or rewrites.
LOOKALIKES = [
    "GRANT ALL ON TABLE public.notes TO evil;",
    "ALTER TABLE public.notes OWNER TO evil;",
    "CREATE SCHEMA hidden;",
    "CREATE EVENT TRIGGER et ON ddl_command_start\n   EXECUTE FUNCTION public.evt();",
    "COPY public.notes (id, body) FROM stdin;\n1\tx\n\\.",
    "\\restrict AbC123",
    "\\unrestrict AbC123",
    "COMMENT ON EXTENSION plpgsql IS 'x';",
    "it's E'\\'' and $$ and $x$ and /* and -- all at once",
]

SOURCE_SQL = r"""
CREATE TABLE public.notes (id integer PRIMARY KEY, body text NOT NULL);
CREATE FUNCTION public.lookalike() RETURNS text LANGUAGE plpgsql AS $body$
begin
-- The lines below look like statements pg_dump writes.
GRANT ALL ON TABLE public.notes TO evil;
return '
ALTER TABLE public.notes OWNER TO evil;
CREATE EVENT TRIGGER et ON ddl_command_start
   EXECUTE FUNCTION public.evt();
COPY public.notes (id, body) FROM stdin;
\.
\unrestrict AbC123
CREATE SCHEMA hidden;
';
end
$body$;
CREATE SCHEMA sales;
CREATE TABLE sales.orders (id serial PRIMARY KEY, note text);
INSERT INTO sales.orders (note) SELECT 'order ' || g FROM generate_series(1, 500) g;
"""

CONTENT = """
SELECT 'notes', md5(string_agg(n::text, E'\n' ORDER BY id)) FROM public.notes n
UNION ALL SELECT 'orders', md5(string_agg(o::text, E'\n' ORDER BY id)) FROM sales.orders o
UNION ALL SELECT 'function', md5(prosrc) FROM pg_proc WHERE proname = 'lookalike'
UNION ALL SELECT 'sequence', last_value::text FROM sales.orders_id_seq
ORDER BY 1
"""


def content(dbname: str) -> list[tuple]:
    return pg.admin(CONTENT, dbname=dbname)


@pytest.fixture(scope="module")
def source():
    name = pg.create_db(pg.scratch_name("capysrc_plain"))
    pg.psql(name, text=SOURCE_SQL)
    for i, line in enumerate(LOOKALIKES):
        pg.admin("INSERT INTO public.notes VALUES (%s, %s)", (i, line), dbname=name)
        pg.admin("INSERT INTO public.notes VALUES (%s, %s)", (100 + i, f"before\n{line}\nafter"), dbname=name)
    yield name
    pg.drop_db(name)


def pg_dump(dbname: str, path: Path, *options: str) -> Path:
    subprocess.run(
        ["pg_dump", *options, f"--file={path}", "-d", pg.url_for(dbname)], check=True, capture_output=True
    )
    return path


@pytest.mark.parametrize(
    "options", [("--inserts",), ("--column-inserts",), ()], ids=["inserts", "column-inserts", "copy"]
)
def test_values_and_bodies_that_look_like_statements_are_restored_unchanged(
    control_db, store, source, tmp_path, options
):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", *options)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert content(live) == content(source)
    assert pg.row_counts(live) == pg.row_counts(source)
    assert job.facts.skipped == []  # no phantom event trigger


def test_a_gzipped_plain_dump_is_restored_unchanged(control_db, store, source, tmp_path):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", "--inserts")
    packed = tmp_path / "dump.sql.gz"
    packed.write_bytes(gzip.compress(dump.read_bytes()))
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, packed)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert content(world.project.database_name) == content(source)


def _with_mine(control_db):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE mine (id int); INSERT INTO mine VALUES (42);")
    return world, live


@pytest.mark.parametrize("cut", [0.10, 0.50, 0.97])
def test_a_plain_dump_cut_at_a_line_boundary_is_refused_before_the_live_database_changes(
    control_db, store, corpus_source, tmp_path, cut
):
    data = pg.make_dump(corpus_source("pagila"), "plain", tmp_path / "pagila.sql").read_bytes()
    end = data.rfind(b"\n", 0, int(len(data) * cut)) + 1
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, data[:end], recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "the dump is cut short" in job.error and "run pg_dump again" in job.error
    assert pg.row_counts(live) == {"public.mine": 1}


def test_a_gzipped_plain_dump_cut_short_is_refused(control_db, store, corpus_source, tmp_path):
    data = gzip.compress(pg.make_dump(corpus_source("pagila"), "plain", tmp_path / "pagila.sql").read_bytes())
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, data[: len(data) // 2], recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert "cut short" in job.error and "pg_dump" in job.error
    assert pg.row_counts(live) == {"public.mine": 1}


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        (("--create",), "made with pg_dump --create (-C)"),
        (("--clean",), "run pg_dump again with --clean --if-exists, or without --clean"),
        (("--data-only",), "run pg_dump again without --data-only"),
    ],
)
def test_dumps_made_with_options_an_import_cannot_restore_are_refused_with_the_fix(
    control_db, store, source, tmp_path, options, fix
):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", *options)
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, dump, recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent"
    assert fix in job.error
    assert job.error.startswith("preflight check dump_format_recognized failed:")
    assert pg.row_counts(live) == {"public.mine": 1}


def test_a_create_dump_of_a_database_with_settings_gets_the_create_message(
    control_db, store, source, tmp_path
):
    """Its properties make pg_dump --create connect to the database twice: still one
    database, not pg_dumpall's output."""
    pg.admin(f"ALTER DATABASE \"{source}\" SET work_mem = '8MB'")
    pg.admin(f"COMMENT ON DATABASE \"{source}\" IS 'the shop'")
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", "--create")
    assert dump.read_bytes().count(b"\\connect") >= 2
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, dump, recreate=True)
    assert job.state == "failed"
    assert "made with pg_dump --create (-C)" in job.error and "pg_dumpall" not in job.error, job.error
    assert pg.row_counts(live) == {"public.mine": 1}


def test_clean_with_if_exists_is_restored(control_db, store, source, tmp_path):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", "--clean", "--if-exists")
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert content(world.project.database_name) == content(source)


def test_pg_dumpall_output_is_refused_naming_pg_dump(control_db, store, source, tmp_path):
    path = tmp_path / "all.sql"
    subprocess.run(
        ["pg_dumpall", "--globals-only", f"--file={path}", "-d", pg.url_for("postgres")],
        check=True,
        capture_output=True,
    )
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, path, recreate=True)
    assert job.state == "failed"
    assert "pg_dumpall output" in job.error and "dump the one database with pg_dump" in job.error
    assert pg.row_counts(live) == {"public.mine": 1}


def test_a_utf16_dump_is_refused_naming_pg_dump_f(control_db, store, source, tmp_path):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp")
    world = make_world(control_db)
    job = upload_and_import(
        control_db, store, world, b"\xff\xfe" + dump.read_bytes().decode().encode("utf-16-le")
    )
    assert job.state == "failed"
    assert "UTF-16" in job.error and "pg_dump -Fc -f dump.dump" in job.error


def test_psql_errors_name_the_line_of_the_users_dump(control_db, store):
    script = (
        b"CREATE TABLE a (id int);\n"
        b"ALTER TABLE a OWNER TO someone;\n"
        b"GRANT ALL ON TABLE a\n    TO someone;\n"
        b"CREATE EVENT TRIGGER et ON ddl_command_start\n   EXECUTE FUNCTION public.evt();\n"
        b"INSERT INTO a VALUES (1);\n"
        b"CREATE TABLE b (id int REFERENCES nowhere(id));\n"
    )
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "failed"
    assert 'line 8 of your dump: ERROR:  relation "nowhere" does not exist' in job.error


def _api_preflight(settings, store, world, data: bytes):
    upload = create_upload(store, world)
    upload_file(upload, data)
    resp = api_client(settings, store).simulate_post(
        f"/v1/projects/{world.project.id}/imports/preflight",
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
        body=json.dumps({"upload_key": upload["object_key"]}),
    )
    assert resp.status_code == 200, resp.text
    return {c["name"]: (c["status"], c["detail"]) for c in resp.json["preflight"]["checks"]}


def test_api_preflight_reads_the_end_of_a_large_plain_upload(control_db, store, corpus_source, tmp_path):
    # The head is small here: preflight reads it and the last bytes, where the footer is.
    settings = control_db.replace(preflight_head_bytes=256 * 1024)
    data = pg.make_dump(corpus_source("pagila"), "plain", tmp_path / "pagila.sql").read_bytes()
    world = make_world(control_db)
    whole = _api_preflight(settings, store, world, data)
    assert whole["dump_format_recognized"][0] == "pass"
    cut = _api_preflight(settings, store, world, data[: data.rfind(b"\n", 0, len(data) // 2) + 1])
    assert cut["dump_format_recognized"][0] == "fail"
    assert cut["dump_format_recognized"][1].startswith("the dump is cut short: its last line is not")


def test_api_preflight_names_the_fix_for_a_create_dump(control_db, store, source, tmp_path):
    dump = pg_dump(source, tmp_path / "dump.sql", "-Fp", "--create")
    checks = _api_preflight(control_db, store, make_world(control_db), dump.read_bytes())
    assert checks["dump_format_recognized"][0] == "fail"
    assert "run pg_dump again without --create" in checks["dump_format_recognized"][1]


def test_a_plain_dump_with_a_bom_and_backslash_lines_in_a_body_is_rehearsed_and_skips_what_it_cannot_hold(
    control_db, store, tmp_path
):
    """A BOM before the first statement, and lines of a function body that start with a
    backslash, are not psql commands: the rehearsal runs, and the internal-language
    function (superuser only) is skipped, not left to fail the restore."""
    name = pg.create_db(pg.scratch_name("capysrc_bom"))
    try:
        pg.psql(
            name,
            text="CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 3);\n"
            "CREATE FUNCTION slashes() RETURNS text LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN '\n\\x not a command\n"
            "\\connect nowhere\n';\nEND\n$$;\n"
            "CREATE FUNCTION c_abs(int4) RETURNS int4 AS 'int4abs' LANGUAGE internal;\n",
        )
        dump = pg_dump(name, tmp_path / "dump.sql", "-Fp")
        expected = pg.admin("SELECT public.slashes()", dbname=name)
    finally:
        pg.drop_db(name)
    dump.write_bytes(b"\xef\xbb\xbf" + dump.read_bytes())
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    skipped = {item["object"] for item in job.facts.report["skipped"]}
    assert skipped == {"FUNCTION public.c_abs(integer)"}, job.facts.report["skipped"]
    live = world.project.database_name
    assert pg.admin("SELECT public.slashes()", dbname=live) == expected
    assert pg.row_counts(live) == {"public.t": 3}


def test_a_script_the_reader_cannot_follow_is_refused_by_preflight_and_the_worker_with_the_fix(
    control_db, store, source, tmp_path
):
    """Never an internal error: the API's preflight fails dump_format_recognized, and
    the job fails at preflight, each saying what to change."""
    data = pg_dump(source, tmp_path / "dump.sql", "-Fp").read_bytes()
    footer = data.rindex(b"--\n-- PostgreSQL database dump complete")
    data = (
        data[:footer]
        + b"SELECT pg_catalog.set_config('standard_conforming_strings', 'off', false);\n"
        + data[footer:]
    )
    checks = _api_preflight(control_db, store, make_world(control_db), data)
    assert checks["dump_format_recognized"][0] == "fail"
    assert "SET standard_conforming_strings = on;" in checks["dump_format_recognized"][1]
    world, live = _with_mine(control_db)
    job = upload_and_import(control_db, store, world, data, recreate=True)
    assert (job.state, job.stage, job.retry_classification) == ("failed", "preflight", "permanent"), job.error
    assert "standard_conforming_strings" in job.error and "internal error" not in job.error
    assert pg.row_counts(live) == {"public.mine": 1}


def test_a_function_with_its_own_standard_conforming_strings_setting_imports(control_db, store, tmp_path):
    name = pg.create_db(pg.scratch_name("capysrc_fnscs"))
    try:
        pg.psql(
            name,
            text="CREATE FUNCTION g() RETURNS int LANGUAGE sql SET standard_conforming_strings = off AS 'SELECT 1';\n"
            "CREATE TABLE t (v text); INSERT INTO t VALUES ('a\\b'), ('c''d');\n",
        )
        dump = pg_dump(name, tmp_path / "dump.sql", "-Fp")
        expected = pg.admin("SELECT v FROM t ORDER BY v", dbname=name)
    finally:
        pg.drop_db(name)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert pg.admin("SELECT v FROM t ORDER BY v", dbname=world.project.database_name) == expected


def test_a_plain_dump_larger_than_the_preflight_head_has_its_whole_schema_rehearsed(
    control_db, store, tmp_path
):
    """Preflight reads the head; the objects after the data (policies come there) are
    rehearsed by the worker before anything is restored, and skipped the same way."""
    settings = control_db.replace(preflight_head_bytes=4096)
    outsider = pg.scratch_name("capy_tst_gone")
    name = pg.create_db(pg.scratch_name("capysrc_bigplain"))
    try:
        pg.admin(f'CREATE ROLE "{outsider}" NOLOGIN')
        pg.psql(
            name,
            text="CREATE TABLE t (id int PRIMARY KEY, v text);"
            "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g;"
            f'ALTER TABLE t ENABLE ROW LEVEL SECURITY; CREATE POLICY gone ON t TO "{outsider}" USING (true);'
            "CREATE POLICY everyone ON t USING (true);"
            "CREATE FUNCTION c_abs(int4) RETURNS int4 AS 'int4abs' LANGUAGE internal;",
        )
        dump = pg_dump(name, tmp_path / "dump.sql", "-Fp")
    finally:
        pg.drop_db(name)
        pg.admin(f'DROP ROLE IF EXISTS "{outsider}"')
    assert dump.stat().st_size > 10 * settings.preflight_head_bytes
    world = make_world(settings)
    job = upload_and_import(settings, store, world, dump)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert {item["object"] for item in job.facts.report["skipped"]} == {
        "POLICY public.t gone",
        "FUNCTION public.c_abs(integer)",
    }
    live = world.project.database_name
    assert pg.admin("SELECT polname FROM pg_policy", dbname=live) == [("everyone",)]
    assert pg.row_counts(live) == {"public.t": 2000}


def test_the_restores_sessions_do_not_wait_for_each_commit_to_reach_disk(control_db, store):
    # What the dump's own statements see of their session (stages.tools.restore._preview_env).
    script = b"CREATE TABLE seen AS SELECT current_setting('synchronous_commit') AS setting;\n"
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, script)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert pg.admin("SELECT setting FROM seen", dbname=world.project.database_name) == [("off",)]
