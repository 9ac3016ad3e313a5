"""Archives at the edges: cut short, made with unusual pg_dump options, or failing in a
way whose cause must reach the user. Each source is built in the test, dumped with
pg_dump 15 and imported through the product (preflight, fetch, restore, finalize)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time

import pytest

from stages.commands import PgTools
from stages.dumprows import RowCounter, count_archive_rows
from stages.errors import CommandTimedOut
from tests.support import pg
from tests.support.imports import upload_and_import
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
    settings = dataclasses.replace(control_db, preflight_head_bytes=64 * 1024)
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
    assert job.preview_database_id is None  # refused before any preview existed


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
