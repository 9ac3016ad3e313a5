"""Archives at the edges: cut short, made with unusual pg_dump options, or failing in a
way whose cause must reach the user. Each source is built in the test, dumped with
pg_dump 15 and imported through the product (preflight, fetch, restore, finalize)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import psycopg2
import pytest
from psycopg2 import sql

from stages.connections.pgurl import SourceURL
from stages.database import inventory
from stages.dumps.archivecheck import problem
from stages.dumps.archivetoc import Reader, read_entries, read_header
from stages.dumps.rows import RowCounter, count_archive_rows
from stages.errors import CommandTimedOut, PermanentCommandFailure
from stages.tools.commands import PgTools
from stages.tools.restore import restore_plain
from tests.support import pg
from tests.support.imports import run_import, upload_and_import
from tests.support.uploading import UploadReads
from tests.support.world import make_world

ROWS = """
CREATE TABLE big (id int PRIMARY KEY, body text);
INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 20000) g;
CREATE TABLE small (id int PRIMARY KEY);
INSERT INTO small SELECT generate_series(1, 100);
"""


def dump(dbname: str, path, *options: str, piped: bool = False):
    """pg_dump `options` of `dbname` to `path`; `piped`: through a pipe, as
    `pg_dump -Fc > file` from a shell pipeline writes it (no data offsets)."""
    args = ["pg_dump", *options, "-d", pg.url_for(dbname)]
    if piped:
        path.write_bytes(subprocess.run(args, check=True, capture_output=True).stdout)
    else:
        subprocess.run([*args, f"--file={path}"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def rows_source():
    name = pg.create_db(pg.scratch_name("capysrc_edges"))
    pg.psql(name, text=ROWS)
    yield name
    pg.drop_db(name)


def _keep(world) -> str:
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    return live


@pytest.mark.parametrize("piped", [False, True], ids=["offsets", "piped"])
def test_a_custom_archive_cut_anywhere_after_its_table_of_contents_is_found_cut(scratch_db, tmp_path, piped):
    """Every length from the end of the table of contents to one byte short of the
    whole file: the walk over the data blocks (table data and large objects, chunk by
    chunk) says it is cut; the whole file passes."""
    source = scratch_db("capysrc_cuts")
    pg.psql(
        source,
        text="CREATE TABLE t (id int, body text); "
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 400) g; "
        "CREATE TABLE empty_one (id int); "
        "SELECT lo_from_bytea(0, convert_to(repeat('large object ', 300), 'UTF8'));",
    )
    data = dump(source, tmp_path / "dump", "--format=custom", "--compress=1", piped=piped).read_bytes()
    assert problem(str(tmp_path / "dump"), "custom") is None
    with open(tmp_path / "dump", "rb") as fh:
        reader = Reader(fh, len(data))
        read_entries(reader, read_header(reader)[0], custom=True)
        toc_end = fh.tell()  # the first data block starts here
    assert len(data) - toc_end > 4000  # the rows and the large object: many chunks to cut in
    cut = tmp_path / "cut"
    cut.write_bytes(data)
    missed = []
    for length in range(len(data) - 1, toc_end - 1, -1):  # shortened in place, not rewritten each time
        os.truncate(cut, length)
        if problem(str(cut), "custom") is None:
            missed.append(length)
    assert not missed, f"cut at {missed[:5]} of {len(data)} bytes passed as whole"


@pytest.mark.parametrize(
    ("options", "piped", "fraction", "by_preflight"),
    [
        (("--format=tar",), False, 0.5, True),
        (("--format=tar",), False, 0.9999, False),
        (("--format=custom",), False, 0.5, True),
        (("--format=custom",), False, 0.9999, False),
        (("--format=custom",), True, 0.5, False),
        (("--format=custom",), True, 0.9999, False),
    ],
    ids=["tar-half", "tar-end", "custom-half", "custom-end", "custom-piped-half", "custom-piped-end"],
)
def test_an_archive_cut_short_is_refused_before_the_live_database_changes(
    control_db, store, rows_source, tmp_path, options, piped, fraction, by_preflight
):
    data = dump(rows_source, tmp_path / "dump", *options, piped=piped).read_bytes()
    # Preflight reads the first 64 KiB: what it cannot see there, the worker finds.
    settings = control_db.replace(preflight_head_bytes=64 * 1024)
    world = make_world(control_db)
    live = _keep(world)
    before = pg.schema_dump(live)
    started = time.monotonic()
    job = upload_and_import(settings, store, world, data[: int(len(data) * fraction)], recreate=True)
    assert time.monotonic() - started < 60
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "is incomplete:" in job.error and "the file is cut short: upload it again" in job.error, job.error
    assert job.error.startswith("preflight check dump_format_recognized failed") == by_preflight, job.error
    assert pg.schema_dump(live) == before and pg.row_counts(live) == {"public.keep": 2}
    # Refused by preflight or fetch before any preview existed, or by restore (a custom
    # archive whose head holds its table of contents, see the test below) before
    # anything was restored into it; the preview it made is gone.
    if job.preview_database_id is not None:
        assert not pg.database_exists(job.preview_database_id)


def test_fetch_reads_only_the_head_of_a_custom_archive_that_holds_its_table_of_contents(
    control_db, store, rows_source, tmp_path, monkeypatch
):
    """The archive is downloaded once, by restore (which walks it whole before anything
    is restored); fetch reads the table of contents from its head. The import is the
    source, and counts every row."""
    data = dump(rows_source, tmp_path / "dump", "--format=custom").read_bytes()
    head = 64 * 1024
    assert len(data) > 4 * head
    reads = UploadReads(monkeypatch)
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=head), store, world, data)
    assert job.state == "completed", job.error
    assert reads.seen.count("download") == 1, reads.seen
    assert f"head {head}" in reads.seen
    live = world.project.database_name
    assert pg.row_counts(live) == pg.row_counts(rows_source)
    assert job.facts.report["tables"]["public.big"]["source_rows"] == 20000


def test_fetch_downloads_a_custom_archive_whose_table_of_contents_goes_past_the_head(
    control_db, store, rows_source, tmp_path, monkeypatch
):
    """A head that holds only part of the table of contents: fetch downloads the whole
    archive and walks it, as for a tar archive; the import completes."""
    data = dump(rows_source, tmp_path / "dump", "--format=custom").read_bytes()
    reads = UploadReads(monkeypatch)
    world = make_world(control_db)
    job = upload_and_import(control_db.replace(preflight_head_bytes=1024), store, world, data)
    assert job.state == "completed", job.error
    assert reads.seen.count("download") == 2, reads.seen
    assert pg.row_counts(world.project.database_name) == pg.row_counts(rows_source)


def test_a_custom_archive_cut_past_the_head_fails_in_restore_before_anything_is_restored(
    control_db, store, rows_source, tmp_path
):
    """Its head holds the whole table of contents and proves nothing: restore walks the
    archive it downloaded and refuses it before pg_restore reads it; nothing is left."""
    data = dump(rows_source, tmp_path / "dump", "--format=custom").read_bytes()
    settings = control_db.replace(preflight_head_bytes=64 * 1024)
    world = make_world(control_db)
    live = _keep(world)
    job = upload_and_import(settings, store, world, data[: len(data) - 10], recreate=True)
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "is incomplete: it ends inside a block of table data" in job.error, job.error
    assert job.stage == "restore", job.stage
    assert pg.row_counts(live) == {"public.keep": 2}
    assert job.preview_database_id is not None and not pg.database_exists(job.preview_database_id)


def test_a_pg_restore_that_makes_no_progress_is_stopped(rows_source, tmp_path):
    """Without the structural check, pg_restore loops on a tar archive cut in half:
    the stall watchdog stops it (and everything it started) and says why."""
    data = dump(rows_source, tmp_path / "dump.tar", "--format=tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    tools = PgTools(os.path.dirname(shutil.which("pg_restore")), stall_seconds=2)
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as caught:
        count_archive_rows(tools, str(cut), RowCounter())
    assert time.monotonic() - started < 30
    assert "made no progress for 2 s (CAPY_COMMAND_STALL_SECONDS)" in caught.value.message
    assert "truncated" in caught.value.message


# -- the error of a failed job names the cause ------------------------------------------


def test_a_failure_while_loading_rows_names_the_server_error_and_the_table(control_db, store, tmp_path):
    """The job's error says what failed: the server's words and the table whose rows
    were loading (once pg_restore -j's "a worker process died unexpectedly").

    The failure comes with the data, where no schema rehearsal sees it: a CHECK whose
    SQL function calls another function without its schema, which pg_dump's empty
    search_path no longer finds while the rows are loaded."""
    source = pg.create_db(pg.scratch_name("capysrc_check"))
    try:
        pg.psql(
            source,
            text=ROWS
            + "CREATE FUNCTION helper(int) RETURNS bool LANGUAGE sql AS 'SELECT $1 > 0';"
            + "CREATE FUNCTION positive(int) RETURNS bool LANGUAGE sql AS 'SELECT helper($1)';"
            + "ALTER TABLE big ADD CONSTRAINT big_positive CHECK (positive(id));",
        )
        data = dump(source, tmp_path / "check.dump", "--format=custom").read_bytes()
    finally:
        pg.drop_db(source)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data)
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "function helper(integer) does not exist" in job.error, job.error
    assert "loading the rows of table public.big" in job.error, job.error
    assert "worker process died" not in job.error
    assert pg.row_counts(world.project.database_name) == {}


def test_a_live_source_behind_row_level_security_names_the_cause(control_db, tmp_path):
    reader = pg.scratch_name("capy_rls_reader")
    source = pg.create_db(pg.scratch_name("capysrc_rls"))
    try:
        pg.admin(f"CREATE ROLE {reader} LOGIN")
        pg.psql(
            source,
            text=ROWS
            + "ALTER TABLE big ENABLE ROW LEVEL SECURITY; CREATE POLICY mine ON big USING (id < 10);"
            + f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader};",
        )
        world = make_world(control_db)
        url = pg.url_for(source, sslmode="disable").replace("postgres@", f"{reader}@", 1)
        job = run_import(control_db, world, url)
    finally:
        pg.drop_db(source)
        pg.admin(f"DROP ROLE IF EXISTS {reader}")
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert 'query would be affected by row-level security policy for table "big"' in job.error, job.error
    assert "connect as the table's owner or a role with BYPASSRLS" in job.error
    assert "the statement was: COPY public.big" in job.error
    assert "worker process died" not in job.error
    assert pg.row_counts(world.project.database_name) == {}


def test_a_psql_failure_names_the_line_of_the_users_file(scratch_db, tmp_path):
    target = scratch_db("capytgt_psql")
    script = tmp_path / "prepared.sql"
    script.write_text("CREATE TABLE a (id int);\n\nSELECT nope FROM a;\n", encoding="utf-8")
    tools = PgTools(os.path.dirname(shutil.which("psql")))
    with pytest.raises(PermanentCommandFailure) as caught:
        restore_plain(
            tools,
            SourceURL.parse(pg.url_for(target, sslmode="disable")),
            str(script),
            user_line=lambda line: line + 40,
        )
    assert caught.value.message == (
        'psql restoring the plain SQL dump failed (exit code 3): column "nope" does not exist (at line 43 of the dump)'
    )
    assert str(tmp_path) not in caught.value.message


# -- valid dumps that must import whole ---------------------------------------------


def query(dbname: str, text, params: tuple = ()) -> list[tuple]:
    """Rows of a query, on a UTF8 connection whatever the database's encoding."""
    conn = psycopg2.connect(pg.url_for(dbname), client_encoding="UTF8")
    try:
        with conn.cursor() as cur:
            cur.execute(text, params)
            return cur.fetchall()
    finally:
        conn.close()


def row_counts(dbname: str) -> dict[str, int]:
    conn = psycopg2.connect(pg.url_for(dbname), client_encoding="UTF8")
    try:
        return inventory.count_rows(conn)
    finally:
        conn.close()


def table_hashes(dbname: str) -> dict[str, str]:
    """A content hash of every table: its rows as text, sorted."""
    hashes = {}
    for table in row_counts(dbname):
        schema, name = table.split(".", 1)
        text = sql.SQL("SELECT t::text FROM ONLY {} t").format(sql.Identifier(schema, name))
        # Hashed here, in UTF-8 and sorted by code point: the same whatever the
        # database's encoding and collation.
        rows = sorted(row for (row,) in query(dbname, text))
        hashes[table] = hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
    return hashes


def sequences(dbname: str) -> list[tuple]:
    return pg.admin(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences ORDER BY 1, 2", dbname=dbname
    )


def assert_identical(source: str, live: str) -> None:
    assert pg.schema_dump(live) == pg.schema_dump(source)
    assert row_counts(live) == row_counts(source)
    assert table_hashes(live) == table_hashes(source)
    assert sequences(live) == sequences(source)


PARTITIONED = """
CREATE TABLE payment (id serial, paid date NOT NULL, amount numeric)
  PARTITION BY RANGE (paid);
CREATE TABLE payment_2022 PARTITION OF payment FOR VALUES FROM ('2022-01-01') TO ('2023-01-01')
  PARTITION BY LIST (amount);
CREATE TABLE payment_2022_small PARTITION OF payment_2022 FOR VALUES IN (1, 2, 3);
CREATE TABLE payment_2022_other PARTITION OF payment_2022 DEFAULT;
CREATE TABLE payment_2023 PARTITION OF payment FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE payment_empty PARTITION OF payment FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO payment (paid, amount)
  SELECT date '2022-01-01' + (g % 700), g % 7 FROM generate_series(1, 5000) g;
CREATE INDEX payment_paid ON payment (paid);
CREATE TABLE plain_table (id int PRIMARY KEY, note text);
INSERT INTO plain_table SELECT g, 'n' || g FROM generate_series(1, 300) g;
"""


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_dump_loaded_via_the_partition_root_imports_exactly(control_db, store, scratch_db, tmp_path, fmt):
    source = scratch_db("capysrc_viaroot")
    pg.psql(source, text=PARTITIONED)
    data = dump(source, tmp_path / "dump", f"--format={fmt}", "--load-via-partition-root").read_bytes()
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data)
    assert job.state == "completed", (job.error, job.last_stderr)
    assert_identical(source, world.project.database_name)
    tables = job.facts.report["tables"]
    assert tables["public.payment"] == {"source_rows": 5000, "target_rows": 5000}
    assert tables["public.plain_table"] == {"source_rows": 300, "target_rows": 300}


@pytest.fixture
def latin1_source():
    """A LATIN1 database with a non-ASCII table, column and value."""
    name = pg.scratch_name("capysrc_latin1")
    pg.admin(
        sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
            sql.Identifier(name)
        )
    )
    conn = psycopg2.connect(pg.url_for(name))
    conn.set_client_encoding("UTF8")
    with conn, conn.cursor() as cur:
        cur.execute('CREATE TABLE "café" (id serial PRIMARY KEY, "crème" text)')
        cur.execute("""INSERT INTO "café" ("crème") SELECT 'brûlée ' || g FROM generate_series(1, 250) g""")
        cur.execute("CREATE TABLE plain_ascii (id int)")
        cur.execute("INSERT INTO plain_ascii SELECT generate_series(1, 10)")
    conn.close()
    yield name
    pg.drop_db(name)


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain", "live"])
def test_a_latin1_source_with_non_ascii_names_imports_exactly(
    control_db, store, latin1_source, tmp_path, fmt
):
    world = make_world(control_db)
    if fmt == "live":
        job = run_import(control_db, world, pg.url_for(latin1_source, sslmode="disable"))
    else:
        data = dump(latin1_source, tmp_path / "dump", f"--format={fmt}").read_bytes()
        job = upload_and_import(control_db, store, world, data)
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert pg.admin("SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = %s", (live,)) == [
        ("UTF8",)
    ]
    assert row_counts(live) == row_counts(latin1_source) == {"public.café": 250, "public.plain_ascii": 10}
    assert query(live, 'SELECT "crème" FROM "café" WHERE id = 7') == [("brûlée 7",)]
    assert job.facts.report["tables"]["public.café"] == {"source_rows": 250, "target_rows": 250}
    assert table_hashes(live) == table_hashes(latin1_source)


def schema_without_tablespaces(dbname: str) -> str:
    return subprocess.run(
        [
            "pg_dump",
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-tablespaces",
            "-d",
            pg.url_for(dbname),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _comparable(schema: str) -> list[str]:
    return [
        line
        for line in schema.splitlines()
        if line.strip()
        and not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
    ]


@pytest.mark.parametrize("fmt", ["custom", "tar", "plain"])
def test_an_archive_naming_a_tablespace_the_target_lacks_imports(control_db, store, tmp_path, fmt):
    """Tablespaces are the cluster's, never the project's: objects go to the default."""
    location = tempfile.mkdtemp(prefix="capy_ts_")
    shutil.chown(location, "postgres", "postgres")
    space = pg.scratch_name("capy_ts")
    source = pg.scratch_name("capysrc_ts")
    pg.admin(sql.SQL("CREATE TABLESPACE {} LOCATION %s").format(sql.Identifier(space)), (location,))
    try:
        pg.create_db(source)
        pg.psql(
            source,
            text=ROWS
            + f"CREATE TABLE placed (id int PRIMARY KEY USING INDEX TABLESPACE {space}) TABLESPACE {space};"
            "INSERT INTO placed SELECT generate_series(1, 77);",
        )
        data = dump(source, tmp_path / "dump", f"--format={fmt}").read_bytes()
        expected = (_comparable(schema_without_tablespaces(source)), row_counts(source), table_hashes(source))
    finally:
        pg.drop_db(source)
        pg.admin(sql.SQL("DROP TABLESPACE IF EXISTS {}").format(sql.Identifier(space)))
        shutil.rmtree(location, ignore_errors=True)
    world = make_world(control_db)
    job = upload_and_import(control_db, store, world, data)
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    assert (_comparable(schema_without_tablespaces(live)), row_counts(live), table_hashes(live)) == expected
    assert query(live, "SELECT reltablespace FROM pg_class WHERE relname = 'placed'") == [(0,)]


# -- database settings and comment ----------------------------------------------------


def database_settings(dbname: str) -> list[tuple]:
    return pg.admin(
        "SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = %s AND s.setrole = 0 ORDER BY 1",
        (dbname,),
    )


def database_comment(dbname: str):
    return pg.admin(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (dbname,)
    )[0][0]


@pytest.mark.parametrize("fmt", ["custom", "tar", "live"])
def test_database_settings_and_comment_are_carried_or_reported(control_db, store, scratch_db, tmp_path, fmt):
    source = scratch_db("capysrc_dbset")
    role = pg.scratch_name("capy_dbset_role")
    pg.psql(source, text=ROWS)
    identifier = sql.Identifier(source)
    for statement in (
        "ALTER DATABASE {} SET work_mem TO '7MB'",
        "ALTER DATABASE {} SET search_path TO public, \"$user\", 'odd''s'",
        "ALTER DATABASE {} SET statement_timeout TO '90s'",
        "ALTER DATABASE {} SET log_min_duration_statement TO 1000",  # superuser-only
        "COMMENT ON DATABASE {} IS 'the shop''s database'",
    ):
        pg.admin(sql.SQL(statement).format(identifier))
    pg.admin(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        pg.admin(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET work_mem TO '1MB'").format(
                sql.Identifier(role), identifier
            )
        )
        world = make_world(control_db)
        if fmt == "live":
            job = run_import(control_db, world, pg.url_for(source, sslmode="disable"))
        else:
            data = dump(source, tmp_path / "dump", f"--format={fmt}").read_bytes()
            job = upload_and_import(control_db, store, world, data)
    finally:
        pg.admin(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))  # drops its setting too
    assert job.state == "completed", (job.error, job.last_stderr)
    live = world.project.database_name
    expected = [
        row for row in database_settings(source) if not row[0].startswith("log_min_duration_statement")
    ]
    assert len(expected) == 3
    assert database_settings(live) == expected
    assert database_comment(live) == "the shop's database"
    report = job.facts.report
    assert report["database"] == {
        "settings": ["work_mem = 7MB", "search_path = public, $user, odd's", "statement_timeout = 90s"],
        "comment": "the shop's database",
    }
    skipped = {item["object"]: item["reason"] for item in report["skipped"]}
    assert skipped["DATABASE SETTING log_min_duration_statement = 1000"] == (
        'the project\'s role may not set it (permission denied to set parameter "log_min_duration_statement")'
    )
    assert skipped[f"DATABASE SETTING work_mem = 1MB for role {role}"].startswith("roles are not imported")
    assert (
        "skipped DATABASE SETTING log_min_duration_statement = 1000: the project's role may not set it "
        '(permission denied to set parameter "log_min_duration_statement")'
    ) in report["warnings"]
    # A session in the imported database gets them.
    assert pg.admin("SHOW work_mem", dbname=live) == [("7MB",)]
