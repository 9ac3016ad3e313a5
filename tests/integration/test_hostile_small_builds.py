"""Hostile review of 030ffb5 (a small table's indexes, constraints and ANALYZE as one
task, then in one transaction) and 77efc7a (streaming commands' stdout pipe widened to
1 MB).

Tests that passed document what held; a test marked `# FOUND:` failed at review and says
why; each is fixed (the task now runs each build in a transaction of its own,
stages.copy.engine._execute_in_turn; a deadlock is named and retried; partitioned
tables are analyzed at the end of the copy).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

import stages.copy.engine as engine
import stages.tools.commands as commands
from stages.errors import Cancelled, CommandFailed, CommandTimedOut, PermanentCommandTimeout, PermanentError
from stages.tools.commands import Cancellation
from tests.support import pg
from tests.support.copying import (
    CopyRun,
    copied_as_source,
    record_builds,
    sessions_in,
    slow_function_sql,
    source_url,
)
from tests.unit.test_command_deadlines import gone

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    return record_builds(monkeypatch)


def stats_of(dbname: str) -> list[tuple]:
    """pg_stats as a deterministic list (small tables: ANALYZE reads every row)."""
    return pg.admin(
        "SELECT schemaname, tablename, attname, inherited, null_frac, n_distinct,"
        " most_common_vals::text, histogram_bounds::text"
        " FROM pg_stats WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        " ORDER BY 1, 2, 3, 4",
        dbname=dbname,
    )


def analyzed_relations(dbname: str) -> set[str]:
    return {
        row[0]
        for row in pg.admin(
            "SELECT DISTINCT schemaname || '.' || tablename FROM pg_stats"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            dbname=dbname,
        )
    }


# --- 1. Post-data variety on small tables: the merged transaction must restore it all --------

ODD_SCHEMA = '''
CREATE SCHEMA "Odd; schema";
CREATE FUNCTION public.folded(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(t) $$;
CREATE TABLE "Odd; schema"."Tab ""le"" é;" (
    "Id" int NOT NULL, "näme" text, r int4range, v int NOT NULL,
    CONSTRAINT "v pos" CHECK (v >= 0)
);
INSERT INTO "Odd; schema"."Tab ""le"" é;" SELECT g, 'N' || g, int4range(g * 10, g * 10 + 5), g
    FROM generate_series(1, 200) g;
ALTER TABLE "Odd; schema"."Tab ""le"" é;" ADD CONSTRAINT "PK; ""x""" PRIMARY KEY ("Id");
ALTER TABLE "Odd; schema"."Tab ""le"" é;" ADD CONSTRAINT "uniq näme" UNIQUE ("näme");
ALTER TABLE "Odd; schema"."Tab ""le"" é;" ADD CONSTRAINT "deferred v" UNIQUE (v)
    DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE "Odd; schema"."Tab ""le"" é;" ADD CONSTRAINT "no overlap"
    EXCLUDE USING gist (r WITH &&);
CREATE INDEX "Idx ""folded""; é" ON "Odd; schema"."Tab ""le"" é;" (public.folded("näme"));
CREATE INDEX "partial idx" ON "Odd; schema"."Tab ""le"" é;" (v) WHERE public.folded("näme") <> 'x';
CREATE UNIQUE INDEX "replica idx" ON "Odd; schema"."Tab ""le"" é;" ("Id", v);
ALTER TABLE "Odd; schema"."Tab ""le"" é;" REPLICA IDENTITY USING INDEX "replica idx";
ALTER TABLE "Odd; schema"."Tab ""le"" é;" CLUSTER ON "Idx ""folded""; é";
ALTER INDEX "Odd; schema"."Idx ""folded""; é" ALTER COLUMN 1 SET STATISTICS 500;
ALTER TABLE "Odd; schema"."Tab ""le"" é;" ALTER COLUMN v SET STATISTICS 10;
COMMENT ON INDEX "Odd; schema"."partial idx" IS 'a comment; on the index';
COMMENT ON CONSTRAINT "PK; ""x""" ON "Odd; schema"."Tab ""le"" é;" IS 'pk comment';
CREATE DOMAIN public.positive AS int CHECK (VALUE > 0);
CREATE UNLOGGED TABLE public.unlogged_t (id public.positive PRIMARY KEY, ref text);
INSERT INTO public.unlogged_t SELECT g, 'N' || g FROM generate_series(1, 100) g;
-- A foreign key into the UNIQUE constraint (not the key) of a small table,
-- one into a unique index only, a self reference, and two tables referencing each other.
ALTER TABLE public.unlogged_t ADD CONSTRAINT by_name
    FOREIGN KEY (ref) REFERENCES "Odd; schema"."Tab ""le"" é;" ("näme");
CREATE TABLE public.tree (id int PRIMARY KEY, up int REFERENCES public.tree, ida int, vv int);
INSERT INTO public.tree SELECT g, NULLIF(g - 1, 0), g, g FROM generate_series(1, 100) g;
ALTER TABLE public.tree ADD CONSTRAINT by_index
    FOREIGN KEY (ida, vv) REFERENCES "Odd; schema"."Tab ""le"" é;" ("Id", v);
CREATE TABLE public.ping (id int PRIMARY KEY, pong int);
CREATE TABLE public.pong (id int PRIMARY KEY, ping int REFERENCES public.ping);
ALTER TABLE public.ping ADD FOREIGN KEY (pong) REFERENCES public.pong;
INSERT INTO public.ping SELECT g, NULL FROM generate_series(1, 50) g;
INSERT INTO public.pong SELECT g, g FROM generate_series(1, 50) g;
UPDATE public.ping SET pong = id;
CREATE TABLE public.empty_t (id int PRIMARY KEY, note text);
CREATE INDEX ON public.empty_t (note);
-- Inheritance: a parent and a child, both small, each with keys and indexes.
CREATE TABLE public.animal (id int PRIMARY KEY, kind text);
CREATE TABLE public.dog (bark text) INHERITS (public.animal);
ALTER TABLE public.dog ADD PRIMARY KEY (id);
CREATE INDEX ON public.animal (kind);
CREATE INDEX ON public.dog (bark);
INSERT INTO public.animal SELECT g, 'cat' FROM generate_series(1, 100) g;
INSERT INTO public.dog SELECT g, 'dog', 'woof' || (g % 7) FROM generate_series(101, 400) g;
-- Partitions: an index on the parent, attached to the small partitions' own.
CREATE TABLE public.measures (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE public.measures_a PARTITION OF public.measures FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
CREATE TABLE public.measures_b PARTITION OF public.measures FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
CREATE INDEX measures_v ON public.measures (v);
INSERT INTO public.measures SELECT g, date '2020-01-01' + g, g FROM generate_series(1, 600) g;
'''


@pytest.mark.parametrize("lanes", [1, 4])
def test_a_small_tables_odd_names_and_every_kind_of_build_copy_as_the_source(
    scratch_db, tmp_path, builds, lanes
):
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(source, text=ODD_SCHEMA + "ANALYZE;")
    copied_as_source(source, target, tmp_path, lanes=lanes)
    # Merged tasks did run (the change is exercised), for the odd table too.
    assert any(
        w.startswith("the indexes, constraints and statistics of table") and "Odd" in w for w in builds
    )
    # Every copied table (and expression index) has statistics, as on the source.
    tables = {
        f"{s}.{t}"
        for s, t in pg.admin(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg_toast%%' AND c.relname <> 'empty_t'",
            dbname=source,
        )
    }
    have = analyzed_relations(target)
    assert tables <= have, tables - have
    assert 'Odd; schema.Idx "folded"; é' in have, have
    # Per-column statistics targets and the index's own survive: same stats as the source.
    assert pg.admin(
        "SELECT relname, reltuples::int FROM pg_class WHERE relname IN ('tree', 'dog', 'animal', 'measures_a')"
        " ORDER BY 1",
        dbname=target,
    ) == pg.admin(
        "SELECT relname, reltuples::int FROM pg_class WHERE relname IN ('tree', 'dog', 'animal', 'measures_a')"
        " ORDER BY 1",
        dbname=source,
    )


def test_statistics_after_the_copy_are_the_sources_own(scratch_db, tmp_path):
    # FOUND: a small table's ANALYZE now runs in the transaction that created its index
    # and ran the index block's `ALTER INDEX … ALTER COLUMN 1 SET STATISTICS 500`;
    # PostgreSQL's ANALYZE there still uses the default target for the index column
    # (histogram of 101 bounds instead of the source's 200). Before 030ffb5 (separate
    # ANALYZE task) the copy's statistics equalled the source's. Differing row:
    # ('Odd; schema', 'Idx "folded"; é', 'folded', False) histogram_bounds.
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(source, text=ODD_SCHEMA + "ANALYZE;")
    copied_as_source(source, target, tmp_path, lanes=2)
    own = [row for row in stats_of(source) if not row[3]]
    assert [row for row in stats_of(target) if not row[3]] == own
    # Inherited statistics of an inheritance parent (not of a partitioned table: below).
    assert [r for r in stats_of(target) if r[3] and r[1] == "animal"] == [
        r for r in stats_of(source) if r[3] and r[1] == "animal"
    ]


def test_an_index_statistics_target_holds_for_a_small_table(scratch_db, tmp_path):
    # FOUND (030ffb5): the minimal case of the test above. Same histogram as the source
    # expected (200 bounds: target 500, 200 rows); the copy has 101 (default target 100):
    # `BEGIN; CREATE INDEX ti ON t (lower(x)); ALTER INDEX ti ALTER COLUMN 1 SET
    # STATISTICS 500; ANALYZE t; COMMIT;` gives 101, a later ANALYZE gives 200.
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text="""
CREATE TABLE public.t (x text);
INSERT INTO public.t SELECT 'n' || g FROM generate_series(1, 200) g;
CREATE INDEX ti ON public.t (lower(x));
ALTER INDEX public.ti ALTER COLUMN 1 SET STATISTICS 500;
ANALYZE public.t;
""",
    )
    copied_as_source(source, target, tmp_path)
    query = "SELECT array_length(histogram_bounds::text::text[], 1) FROM pg_stats WHERE tablename = 'ti'"
    assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source) == [(200,)]


def test_a_partitioned_tables_inherited_statistics_are_made(scratch_db, tmp_path):
    # FOUND (older than 030ffb5: the same at 445efe3): a partitioned table (relkind 'p')
    # is never analyzed by the copy (stages.copy.catalog lists relkind 'r' only), so
    # its inherited statistics, present on the source, are missing from the copy.
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text="""
CREATE TABLE public.measures (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE public.measures_a PARTITION OF public.measures FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
INSERT INTO public.measures SELECT g, date '2020-01-01' + g, g FROM generate_series(1, 300) g;
ANALYZE;
""",
    )
    copied_as_source(source, target, tmp_path)
    query = "SELECT attname FROM pg_stats WHERE tablename = 'measures' AND inherited ORDER BY 1"
    assert pg.admin(query, dbname=source) == [("at",), ("id",), ("v",)]
    assert pg.admin(query, dbname=target) == pg.admin(query, dbname=source)


# --- 2. Locks held to the end of the merged transaction ---------------------------------------

CROSS_SCHEMA = """
CREATE TABLE public.a (id int NOT NULL, v int);
CREATE TABLE public.b (id int NOT NULL, v int);
INSERT INTO public.a SELECT g, g FROM generate_series(1, 3) g;
INSERT INTO public.b SELECT g, g FROM generate_series(1, 3) g;
-- An index expression that looks at the other table (declared IMMUTABLE, as many are).
CREATE FUNCTION public.in_b(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM pg_catalog.pg_sleep(0.3); RETURN x + (SELECT count(*) FROM public.b)::int * 0; END $$;
CREATE FUNCTION public.in_a(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM pg_catalog.pg_sleep(0.3); RETURN x + (SELECT count(*) FROM public.a)::int * 0; END $$;
CREATE INDEX a_in_b ON public.a (public.in_b(v));
CREATE INDEX b_in_a ON public.b (public.in_a(v));
ALTER TABLE public.a ADD PRIMARY KEY (id);
ALTER TABLE public.b ADD PRIMARY KEY (id);
"""


def test_two_small_tables_whose_index_reads_the_other_do_not_deadlock(scratch_db, tmp_path):
    # FOUND: the merged transaction keeps the ACCESS SHARE lock its index build took on
    # the other table until its ADD PRIMARY KEY (ACCESS EXCLUSIVE) and ANALYZE: two such
    # tables in two lanes deadlock ("deadlock detected"), where separate transactions
    # (the index committed before the key) only waited for each other. 3 runs of 3:
    # psycopg2.errors.DeadlockDetected: deadlock detected / DETAIL: Process … waits for
    # AccessExclusiveLock on relation …; blocked by process …, which engine.target_errors
    # (DeadlockDetected is an OperationalError) reports as "lost the preview session":
    # ClusterUnavailable "the project's database cluster is unavailable; try again
    # shortly", a retryable error that names neither the table nor the deadlock.
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(source, text=CROSS_SCHEMA)
    copied_as_source(source, target, tmp_path, lanes=2)


# --- 3. Failures and cancels inside the merged transaction ------------------------------------

SLOW_SCHEMA = (
    slow_function_sql(0.5)
    + """
CREATE TABLE public.slow_t (id int PRIMARY KEY, v int);
INSERT INTO public.slow_t SELECT g, g FROM generate_series(1, 40) g;
CREATE INDEX slow_idx ON public.slow_t (public.slow(v));
CREATE TABLE public.other (id int PRIMARY KEY, slow_id int REFERENCES public.slow_t);
INSERT INTO public.other SELECT g, g FROM generate_series(1, 40) g;
"""
)


def test_a_cancel_while_the_merged_task_runs_stops_the_copy_and_leaves_no_session(scratch_db, tmp_path):
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(source, text=SLOW_SCHEMA)
    cancellation = Cancellation()

    def cancel_when_building() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pg.admin(
                "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND query LIKE '%%slow_idx%%'"
                " AND pid <> pg_backend_pid()",
                (target,),
            ):
                cancellation.cancel("test cancel")
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=cancel_when_building, daemon=True)
    run = CopyRun(source_url(source), target, tmp_path, lanes=3, cancellation=cancellation)
    watcher.start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        run.run()
    assert time.monotonic() - started < 15
    watcher.join()
    assert not sessions_in(target)
    # Nothing of the merged transaction is left.
    assert not pg.admin("SELECT 1 FROM pg_indexes WHERE tablename = 'slow_t'", dbname=target)


def test_a_failing_small_build_stops_the_other_lanes_and_leaves_no_session(scratch_db, tmp_path):
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text=SLOW_SCHEMA
        + """
CREATE FUNCTION public.plus(x int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT x + 1 $$;
CREATE TABLE public.dup (id int, v int);
INSERT INTO public.dup SELECT g, g FROM generate_series(1, 20) g;
CREATE INDEX dup_v ON public.dup (v);
ALTER TABLE public.dup ADD CONSTRAINT dup_key UNIQUE (id);
CREATE INDEX dup_plus ON public.dup (public.plus(v));
""",
    )

    def duplicate_the_rows() -> None:
        # The index's function is gone from the preview: dup's merged build fails.
        pg.psql(target, text="DROP FUNCTION public.plus(int);")

    run = CopyRun(source_url(source), target, tmp_path, lanes=2, before_copy=duplicate_the_rows)
    started = time.monotonic()
    with pytest.raises(PermanentError) as raised:
        run.run()
    message = str(raised.value)
    assert "public.dup" in message or "dup" in message, message
    assert time.monotonic() - started < 15, "the slow index's lane was not stopped"
    assert not sessions_in(target)
    assert not pg.admin("SELECT 1 FROM pg_indexes WHERE tablename = 'dup'", dbname=target)


# --- 4. Extended statistics: no ANALYZE in the schedule ---------------------------------------


def test_with_extended_statistics_no_small_table_is_analyzed_before_them(scratch_db, tmp_path, builds):
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text="""
CREATE TABLE public.s (id int PRIMARY KEY, a int, b int);
INSERT INTO public.s SELECT g, g % 10, g % 10 FROM generate_series(1, 500) g;
CREATE STATISTICS public.s_ab (dependencies, ndistinct) ON a, b FROM public.s;
CREATE INDEX s_a ON public.s (a);
ANALYZE;
""",
    )
    copied_as_source(source, target, tmp_path)
    assert "the indexes and constraints of table public.s" in builds, builds
    # Its only ANALYZE comes after the extended statistics are created (at the end).
    assert [w for w in builds if "statistics" in w] == [
        "statistics s_ab",
        "statistics of table public.s",
    ], builds
    # The extended statistics were computed (ANALYZE after them).
    assert pg.admin(
        "SELECT count(*) FROM pg_statistic_ext_data d JOIN pg_statistic_ext e ON e.oid = d.stxoid"
        " WHERE e.stxname = 's_ab' AND d.stxddependencies IS NOT NULL",
        dbname=target,
    ) == [(1,)]


# --- 5. The threshold -------------------------------------------------------------------------


def test_a_table_exactly_at_the_threshold_keeps_separate_tasks(scratch_db, tmp_path, builds, monkeypatch):
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text="""
CREATE TABLE public.t (id int PRIMARY KEY, v int);
INSERT INTO public.t SELECT g, g FROM generate_series(1, 100) g;
CREATE INDEX t_v ON public.t (v);
""",
    )
    size = pg.admin("SELECT pg_table_size('public.t')", dbname=source)[0][0]
    monkeypatch.setattr(engine, "SMALL_TABLE_BYTES", size)
    copied_as_source(source, target, tmp_path)
    assert "index t_v" in builds and "statistics of table public.t" in builds, builds
    monkeypatch.setattr(engine, "SMALL_TABLE_BYTES", size + 1)
    builds.clear()
    target2 = scratch_db("capytgt_hostile")
    copied_as_source(source, target2, tmp_path)
    assert "the indexes, constraints and statistics of table public.t" in builds, builds


# --- 6. The widened pipe ----------------------------------------------------------------------


def test_widen_pipe_makes_a_pipe_of_one_megabyte_from_either_end():
    for end in (0, 1):
        fds = os.pipe()
        try:
            commands.widen_pipe(fds[end])
            assert fcntl.fcntl(fds[1 - end], _F_GETPIPE_SZ) == commands.STREAM_PIPE_BYTES
        finally:
            for fd in fds:
                os.close(fd)


def test_widen_pipe_on_a_system_that_refuses_leaves_the_pipe_as_it_was(monkeypatch):
    real = fcntl.fcntl

    def refusing(fd, cmd, arg=0):
        if cmd == commands._F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(fd, cmd, arg)

    monkeypatch.setattr(commands.fcntl, "fcntl", refusing)
    read_fd, write_fd = os.pipe()
    try:
        before = real(write_fd, _F_GETPIPE_SZ)
        commands.widen_pipe(write_fd)
        assert real(write_fd, _F_GETPIPE_SZ) == before
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_widen_pipe_on_a_closed_descriptor_raises_nothing():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    commands.widen_pipe(write_fd)  # EBADF is an OSError: suppressed


def test_rows_through_psql_with_a_widened_pipe_copy_as_the_source(scratch_db, tmp_path, monkeypatch):
    import stages.copy.live

    monkeypatch.setattr(stages.copy.live, "COMMAND_MIN_BYTES", 0)
    monkeypatch.setattr(stages.copy.live, "BINARY_COPY", False)  # psql copies in text only
    widened: list[int] = []
    original = commands.widen_pipe

    def counting(fd: int) -> None:
        original(fd)
        widened.append(fcntl.fcntl(fd, _F_GETPIPE_SZ))

    monkeypatch.setattr(commands, "widen_pipe", counting)
    source, target = scratch_db("capysrc_hostile"), scratch_db("capytgt_hostile")
    pg.psql(
        source,
        text="""
CREATE TABLE public.big (id int PRIMARY KEY, pad text);
INSERT INTO public.big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g;
CREATE TABLE public.small (id int PRIMARY KEY);
INSERT INTO public.small SELECT generate_series(1, 10);
""",
    )
    copied_as_source(source, target, tmp_path, by_command=True)
    assert widened and all(size == commands.STREAM_PIPE_BYTES for size in widened), widened


def _program(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_a_command_that_fills_the_wide_pipe_then_stalls_is_stopped_in_the_stall_window(tmp_path):
    # 2 MB at once (the widened pipe's fill and more), then silence.
    _program(tmp_path, "pg_restore", "head -c 2000000 /dev/zero\nsleep 300\n")
    pids: list[int] = []
    read: list[int] = []

    def consume(out) -> None:
        while chunk := out.read(1 << 16):
            read.append(len(chunk))

    began = time.monotonic()
    with pytest.raises(PermanentCommandTimeout, match="CAPY_COMMAND_STALL_SECONDS"):
        commands.PgRestore(str(tmp_path), stall_seconds=1).run_streaming(
            ["--data-only", "--file=-", "x"], consume, started=lambda p: pids.append(p.pid)
        )
    assert time.monotonic() - began < 1 + 8
    assert sum(read) == 2_000_000
    assert gone(pids[0], 5.0)


def test_a_consumer_that_stops_reading_with_the_pipe_full_is_a_stall(tmp_path):
    _program(tmp_path, "pg_restore", "head -c 8000000 /dev/zero\n")
    pids: list[int] = []

    def consume(out) -> None:
        out.read(1 << 16)
        time.sleep(4)  # the preview blocks: nothing is read while the pipe stays full
        out.read()

    began = time.monotonic()
    with pytest.raises(CommandTimedOut):
        commands.PgRestore(str(tmp_path), stall_seconds=1).run_streaming(
            ["--data-only", "--file=-", "x"], consume, started=lambda p: pids.append(p.pid)
        )
    assert time.monotonic() - began < 1 + 8
    assert gone(pids[0], 5.0)


def test_a_consumer_failing_mid_stream_stops_the_command(tmp_path):
    _program(tmp_path, "pg_restore", "while true; do head -c 1000000 /dev/zero; done\n")
    pids: list[int] = []

    def consume(out) -> None:
        out.read(3_000_000)
        raise ValueError("the preview refused a row")

    with pytest.raises(ValueError, match="refused a row"):
        commands.PgRestore(str(tmp_path), stall_seconds=5).run_streaming(
            ["--data-only", "--file=-", "x"], consume, started=lambda p: pids.append(p.pid)
        )
    assert gone(pids[0], 5.0)


def test_a_command_killed_mid_stream_fails_even_if_its_rows_were_all_read(tmp_path):
    # Less than the widened pipe holds, then killed: every byte is read, the exit is not clean.
    _program(tmp_path, "pg_restore", "head -c 700000 /dev/zero\nkill -9 $$\n")
    read: list[int] = []
    with pytest.raises(CommandFailed):
        commands.PgRestore(str(tmp_path), stall_seconds=5).run_streaming(
            ["--data-only", "--file=-", "x"], lambda out: read.append(len(out.read()))
        )
    assert read == [700_000]
