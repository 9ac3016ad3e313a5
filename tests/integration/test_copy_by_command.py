"""Large tables' rows stream through psql (stages.copy.live.COMMAND_MIN_BYTES): the same
rows as a lane's own session would copy, from the same snapshot, with the password in
the environment only. Here every table takes that way (the threshold is 0).

The engine's failure behaviour on this path (a lost snapshot, a stall, a cancel, a row
the preview refuses, one lane failing) is tested beside the sessions' own, in
test_copy_engine.py (its `streams` parameter).
"""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import threading

import psycopg2
import pytest

import stages.copy.live as live
from stages.connections.pgurl import SourceURL
from stages.copy.stream import Flow, SourceTable, stream_from_command
from stages.errors import PermanentError
from tests.support import pg
from tests.support.copying import TRICKY, CopyRun, rows_as_text, source_url


@pytest.fixture
def every_table_by_command(monkeypatch):
    monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 0)
    monkeypatch.setattr(live, "BINARY_COPY", False)  # psql copies in text only


def test_tricky_values_arrive_exactly_whatever_the_sources_display_settings(
    scratch_db, tmp_path, every_table_by_command, caplog
):
    """The source's database asks for other date, interval and float output: psql's
    session sets its own, as the lanes' sessions do, so the preview reads back the same."""
    source, target = scratch_db("capysrc_bycmd"), scratch_db("capytgt_bycmd")
    pg.psql(
        source,
        text=TRICKY
        + f"""
        ALTER DATABASE {source} SET DateStyle = 'SQL, DMY';
        ALTER DATABASE {source} SET IntervalStyle = 'sql_standard';
        ALTER DATABASE {source} SET extra_float_digits = -3;
        ALTER DATABASE {source} SET TimeZone = 'Pacific/Chatham';
        ALTER DATABASE {source} SET bytea_output = 'escape';
        """,
    )
    with caplog.at_level(logging.INFO, logger="stages.tools.commands"):
        result = CopyRun(source_url(source), target, tmp_path, by_command=True).run()
    assert "running psql" in caplog.text  # the rows did take the command's way
    assert result.source_counts == result.target_counts == {"public.tricky": 4}
    assert rows_as_text(target) == rows_as_text(source)
    equal = pg.admin(
        "SELECT count(*) FROM public.tricky WHERE ratio = 0.1 AND amount = 12345678901234567890.123456789",
        dbname=target,
    )
    assert equal == [(1,)]


def test_rows_come_from_the_snapshot_not_from_later_writes(scratch_db, tmp_path, every_table_by_command):
    """Rows written, changed and deleted on the source after the snapshot was taken are
    not copied: psql joins the snapshot before its COPY."""
    source, target = scratch_db("capysrc_bycmdsnap"), scratch_db("capytgt_bycmdsnap")
    pg.psql(
        source,
        text="CREATE TABLE public.t (id int PRIMARY KEY, v text); "
        "INSERT INTO public.t SELECT g, 'before' FROM generate_series(1, 1000) g;",
    )

    def write_later() -> None:
        pg.psql(
            source,
            text="INSERT INTO public.t SELECT g, 'after' FROM generate_series(1001, 1500) g; "
            "UPDATE public.t SET v = 'changed' WHERE id <= 10; DELETE FROM public.t WHERE id > 990 AND id <= 1000;",
        )

    result = CopyRun(source_url(source), target, tmp_path, before_copy=write_later, by_command=True).run()
    assert result.source_counts == result.target_counts == {"public.t": 1000}
    assert pg.admin("SELECT v, count(*) FROM public.t GROUP BY v", dbname=target) == [("before", 1000)]


def test_the_password_travels_in_the_environment_only(
    password_source, scratch_db, tmp_path, caplog, every_table_by_command
):
    """A source that checks passwords: psql logs in, and its command line (logged) holds
    no password."""
    target = scratch_db("capytgt_bycmdpw")
    url = SourceURL.parse_source(password_source.url("chinook"))
    assert url.password
    with caplog.at_level(logging.INFO, logger="stages.tools.commands"):
        result = CopyRun(url, target, tmp_path, by_command=True).run()
    launched = [r.getMessage() for r in caplog.records if r.getMessage().startswith("running psql")]
    assert launched and all(url.password not in line for line in launched)
    assert url.password not in caplog.text
    assert result.source_counts == result.target_counts
    assert result.target_counts["public.track"] == 3503


def test_a_command_that_fails_after_some_rows_leaves_the_table_empty(scratch_db):
    """Rows a failing command wrote before it failed are rolled back with the preview's
    transaction; the command's error is raised."""
    target = scratch_db("capytgt_bycmdfail")
    pg.psql(target, text="CREATE TABLE public.t (id int, v text)")
    table = SourceTable("public.t", "public", "t", ("id", "v"), 1 << 30)

    def half_then_fail(consume) -> None:
        consume(io.BytesIO(b"1\ta\n2\tb\n"))
        raise PermanentError("reading the rows of table public.t from the source failed: ERROR: boom")

    conn = psycopg2.connect(pg.url_for(target))
    try:
        with pytest.raises(PermanentError, match="boom"):
            stream_from_command(table, half_then_fail, conn, Flow())
    finally:
        conn.close()
    assert pg.admin("SELECT count(*) FROM public.t", dbname=target) == [(0,)]


def test_an_interrupt_before_the_command_started_stops_it_when_it_starts():
    """An interrupt (another lane's failure, a stall) that lands before a lane's psql
    has started stops it as soon as it starts: no command outlives the copy."""
    loading = live._LiveLoading.__new__(live._LiveLoading)
    loading._commands, loading._lock, loading._interrupted = set(), threading.Lock(), True
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        loading._started(process)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
