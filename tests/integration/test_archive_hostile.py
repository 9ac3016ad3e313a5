"""Uploaded archives whose table of contents was edited in place (tests.support.archiveedit)
or whose names are unusual: the copy engine loads every row the archive holds or fails
with a clear message, and the project's live database is never touched."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import pytest

from pipeline.import_steps import restore_role_name
from stages.database.cluster import ClusterAdmin
from stages.dumps.archivetoc import read_toc
from tests.support import pg
from tests.support.archiveedit import find, overwrite
from tests.support.imports import upload_and_import
from tests.support.world import make_world

SCHEMA = """
CREATE TABLE aa (id int PRIMARY KEY, t text); INSERT INTO aa SELECT g, 'a' FROM generate_series(101, 200) g;
CREATE TABLE bb (id int PRIMARY KEY, t text); INSERT INTO bb SELECT g, 'b' FROM generate_series(1, 50) g;
CREATE TABLE big (id int PRIMARY KEY, body text); INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE TABLE "two
lines" (id int PRIMARY KEY, "a
b" text);
INSERT INTO "two
lines" SELECT g, g::text FROM generate_series(1, 5) g;
"""


@pytest.fixture(scope="module")
def source():
    name = pg.create_db(pg.scratch_name("capysrc_hostile"))
    pg.psql(name, text=SCHEMA)
    yield name
    pg.drop_db(name)


def _archive(source: str, tmp_path):
    path = tmp_path / "a.dump"
    subprocess.run(
        ["pg_dump", "-Fc", "-d", pg.url_for(source), f"--file={path}"], check=True, capture_output=True
    )
    return path


def _import(control_db, store, data: bytes):
    world = make_world(control_db)
    live = world.project.database_name
    pg.psql(live, text="CREATE TABLE keep (id int); INSERT INTO keep VALUES (1), (2);")
    job = upload_and_import(control_db, store, world, data, recreate=True)
    return job, world


def test_names_holding_newlines_stream_and_import_exactly(control_db, store, source, tmp_path):
    job, world = _import(control_db, store, _archive(source, tmp_path).read_bytes())
    assert job.state == "completed", job.error
    assert pg.row_counts(world.project.database_name) == pg.row_counts(source)
    assert job.facts.copied_counts["public.two\nlines"] == 5


def test_rows_pg_restore_loads_into_a_streamed_table_are_not_truncated_away(
    control_db, store, source, tmp_path
):
    """aa's data entry names bb in its COPY statement (its dependency still says aa):
    pg_restore loads it into bb, beside bb's own rows; none may be lost or uncounted."""
    path = _archive(source, tmp_path)
    overwrite(path, find(path, "TABLE DATA", b"aa").strings["copy"], b"COPY public.bb (id, t) FROM stdin;\n")
    job, world = _import(control_db, store, path.read_bytes())
    assert job.state == "completed", job.error
    assert pg.row_counts(world.project.database_name)["public.bb"] == 150
    assert job.facts.report["tables"]["public.bb"] == {"source_rows": 150, "target_rows": 150}


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (b"COPY nopexx.aa (id, t) FROM stdin;\n", 'schema "nopexx" does not exist'),
        (
            b"COPY public.aa (id, u) FROM stdin;\n",
            'loading the rows of table public.aa into the preview failed: column "u"',
        ),
        (
            b"COPY public.aa (t, id) FROM stdin;\n",
            "loading the rows of table public.aa into the preview failed: invalid input",
        ),
    ],
    ids=["missing-schema", "missing-column", "swapped-columns"],
)
def test_a_copy_statement_that_does_not_fit_fails_the_import_cleanly(
    control_db, store, source, tmp_path, statement, message
):
    path = _archive(source, tmp_path)
    overwrite(path, find(path, "TABLE DATA", b"aa").strings["copy"], statement)
    job, world = _import(control_db, store, path.read_bytes())
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert message in job.error, job.error
    assert pg.row_counts(world.project.database_name) == {"public.keep": 2}
    assert not pg.database_exists(job.preview_database_id)
    assert not ClusterAdmin(pg.ADMIN_URL).role_exists(restore_role_name(job))


def test_a_statement_with_text_after_it_fails_the_import_permanently_and_clearly(
    control_db, store, source, tmp_path
):
    """A COPY statement followed by another one cannot stream, and pg_restore's output
    of it cannot be counted: a clear permanent failure, not an internal error retried."""
    path = _archive(source, tmp_path)
    overwrite(path, find(path, "TABLE DATA", b"aa").strings["copy"], b"COPY public.aa FROM stdin;SELECT 1\n")
    job, world = _import(control_db, store, path.read_bytes())
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "the archive's table data cannot be read as pg_restore restores it" in job.error, job.error
    assert "text follows a COPY" in job.error, job.error
    assert pg.row_counts(world.project.database_name) == {"public.keep": 2}
    assert not pg.database_exists(job.preview_database_id)
    assert not ClusterAdmin(pg.ADMIN_URL).role_exists(restore_role_name(job))


def test_a_damaged_data_block_is_named_as_damage_not_as_the_tables_rows(control_db, store, source, tmp_path):
    """pg_restore prints what it made of a damaged compressed block before it notices:
    the preview refusing those rows is not the news, the damaged archive is."""
    path = _archive(source, tmp_path)
    contents = read_toc(str(path))
    entry = next(e for e in contents.entries if e.desc == "TABLE DATA" and e.tag == b"big")
    data = bytearray(path.read_bytes())
    middle = entry.offset + contents.data_bytes[entry.dump_id] // 2
    for at in range(middle, middle + 64):
        data[at] ^= 0x5A
    job, world = _import(control_db, store, bytes(data))
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "could not uncompress data" in job.error, job.error
    assert "the archive is damaged; check it with pg_restore --list and upload it again" in job.error, (
        job.error
    )
    assert pg.row_counts(world.project.database_name) == {"public.keep": 2}
    assert not pg.database_exists(job.preview_database_id)
    assert not ClusterAdmin(pg.ADMIN_URL).role_exists(restore_role_name(job))


def _stop_first_reader(stopped: list[int], done: threading.Event) -> None:
    """SIGSTOP the first pg_restore that reads an archive's rows for the copy engine."""
    while not done.is_set() and not stopped:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    args = fh.read().split(b"\0")
            except OSError:
                continue
            if args[0].endswith(b"pg_restore") and b"--data-only" in args and b"--file=-" in args:
                os.kill(int(pid), signal.SIGSTOP)
                stopped.append(int(pid))
                return
        time.sleep(0.005)


def test_a_pg_restore_that_stops_producing_rows_fails_the_stage_transiently(
    control_db, store, source, tmp_path, caplog
):
    """Whichever watchdog sees it first (the engine's, or the command's own), a stopped
    reader is a stall to retry, not a damaged archive: the retry imports it all."""
    settings = control_db.replace(command_stall_seconds=2)
    data = _archive(source, tmp_path).read_bytes()
    stopped: list[int] = []
    done = threading.Event()
    watcher = threading.Thread(target=_stop_first_reader, args=(stopped, done))
    watcher.start()
    try:
        with caplog.at_level(logging.WARNING):
            job, world = _import(settings, store, data)
    finally:
        done.set()
        watcher.join()
    assert stopped
    assert job.state == "completed", job.error
    assert pg.row_counts(world.project.database_name) == pg.row_counts(source)
    assert any(
        "restore failed transiently" in r.getMessage() and "CAPY_COMMAND_STALL_SECONDS" in r.getMessage()
        for r in caplog.records
    )


def test_an_archive_whose_table_of_contents_counts_negative_entries_replaces_nothing(
    control_db, store, tmp_path
):
    """pg_restore --list takes a negative entry count as none: restored, such a file
    would replace the project's database with an empty one."""
    header = b"PGDMP\x01\x0e\x00\x04\x08\x01"  # archive 1.14, 4-byte integers, 8-byte offsets, custom
    data = (
        header
        + b"\x00\xff\xff\xff\xff"
        + bytes(7 * 5)
        + b"\x00\x00\x00\x00\x00" * 3
        + b"\x01\x05\x00\x00\x00"
    )
    job, world = _import(control_db, store, data)
    assert job.state == "failed" and job.retry_classification == "permanent", job.error
    assert "the archive's table of contents cannot be read" in job.error, job.error
    assert "-5 entries" in job.error, job.error
    assert pg.row_counts(world.project.database_name) == {"public.keep": 2}
