"""The copy engine (stages.copy.engine) driven directly against scratch databases: its
counts, and how it stops — a source that stalls mid-table, a cancel, a row the preview
refuses, a failure in one lane while others run.

Waits are bounded generously (MARGIN) so a hang fails the test instead of holding the
run; nothing asserts how long a step takes.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

import stages.copy.live as live
import stages.copy.stream as stream
from stages.copy.engine import CopyStalled
from stages.copy.live import SourceSettings
from stages.errors import Cancelled, PermanentError, TransientError
from stages.tools.commands import Cancellation
from tests.support import pg
from tests.support.copying import CopyRun, sessions_in, source_url
from tests.support.muteproxy import cut_off_relay

MARGIN = 60
BIG_ROWS = 300_000  # about 40 MB: far more than the relay lets through

SMALL_TABLES = """
CREATE TABLE public.small (id int PRIMARY KEY, note text);
INSERT INTO public.small SELECT g, 'n' || g FROM generate_series(1, 500) g;
CREATE TABLE public.child (id int PRIMARY KEY, small_id int REFERENCES public.small);
INSERT INTO public.child SELECT g, 1 + g % 500 FROM generate_series(1, 2000) g;
"""
BIG_TABLE = f"""
CREATE TABLE public.big (id int PRIMARY KEY, pad text);
INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, {BIG_ROWS}) g;
"""


def lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("copy-lane-", "copy-out-"))]


def wait_until(predicate, what: str) -> None:
    give_up = time.monotonic() + MARGIN
    while not predicate():
        assert time.monotonic() < give_up, what
        time.sleep(0.1)


def assert_nothing_left(target: str) -> None:
    assert lane_threads() == []
    # A closed session's backend exits on its own, a moment after the client has gone.
    wait_until(lambda: sessions_in(target) == [], f"sessions left in the preview: {sessions_in(target)}")


def run_in_thread(run: CopyRun) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run.run()
        except BaseException as err:  # noqa: BLE001 - examined by the test
            outcome["error"] = err

    thread = threading.Thread(target=target, name="test-copy", daemon=True)
    thread.start()
    return thread, outcome


def waiting_for_lock(dbname: str, table: str) -> bool:
    return bool(
        pg.admin(
            "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE NOT l.granted AND c.relname = %s",
            (table,),
            dbname=dbname,
        )
    )


@pytest.fixture(params=["memory", "pipe", "memory-text", "pipe-text", "psql"])
def streams(request, monkeypatch) -> bool:
    """Every way a table's rows leave the source: a lane's own session, read whole into
    memory (as small tables are, stages.copy.stream.MEMORY_MAX_BYTES: every table here)
    or streamed through a pipe (every table, whatever its size), in COPY's binary format
    (tables of built-in types, stages.copy.live.BINARY_COPY) or its text format ("-text");
    or psql (every table: stages.copy.live.COMMAND_MIN_BYTES; text). True for psql."""
    if request.param.startswith("memory"):
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 1 << 62)
        monkeypatch.setattr(stream, "MEMORY_LIMIT_BYTES", 1 << 30)
    if request.param.startswith("pipe"):
        monkeypatch.setattr(stream, "MEMORY_MAX_BYTES", 0)
    if request.param.endswith("-text") or request.param == "psql":
        monkeypatch.setattr(live, "BINARY_COPY", False)
    if request.param == "psql":
        monkeypatch.setattr(live, "COMMAND_MIN_BYTES", 0)
    return request.param == "psql"


@pytest.fixture
def preview_lock():
    """Hold ACCESS EXCLUSIVE on a table of a database (a session of the test): the lane
    that copies into it waits until it is stopped."""
    held: list = []

    def lock(dbname: str, table: str) -> None:
        conn = psycopg2.connect(pg.url_for(dbname))
        held.append(conn)
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE")

    yield lock
    for conn in held:
        conn.close()


def test_counts_from_copy_equal_count_on_the_source(streams, scratch_db, tmp_path):
    source, target = scratch_db("capysrc_engine"), scratch_db("capytgt_engine")
    pg.psql(
        source,
        text=SMALL_TABLES
        + """
        CREATE TABLE public.empty (id int PRIMARY KEY);
        CREATE TABLE public.gen (id int GENERATED ALWAYS AS IDENTITY, a int, doubled int GENERATED ALWAYS AS (a * 2) STORED);
        INSERT INTO public.gen (a) SELECT g FROM generate_series(1, 300) g;
        CREATE TABLE public.dropped (id int, gone text, kept text);
        INSERT INTO public.dropped SELECT g, 'g', 'k' FROM generate_series(1, 40) g;
        ALTER TABLE public.dropped DROP COLUMN gone;
        CREATE TABLE public.nocols ();
        INSERT INTO public.nocols SELECT FROM generate_series(1, 7);
        CREATE TABLE public.parted (id int, at date) PARTITION BY RANGE (at);
        CREATE TABLE public.parted_a PARTITION OF public.parted FOR VALUES FROM ('2020-01-01') TO ('2021-01-01');
        CREATE TABLE public.parted_b PARTITION OF public.parted FOR VALUES FROM ('2021-01-01') TO ('2022-01-01');
        INSERT INTO public.parted SELECT g, date '2020-01-01' + g FROM generate_series(1, 600) g;
        """,
    )
    result = CopyRun(source_url(source), target, tmp_path, lanes=3, by_command=streams).run()
    expected = pg.row_counts(source)
    assert result.source_counts == expected
    assert result.target_counts == expected
    assert pg.row_counts(target) == expected
    assert expected["public.nocols"] == 7 and expected["public.parted_b"] > 0
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
    assert_nothing_left(target)


def test_a_small_table_whose_rows_outgrow_memory_streams_through_the_pipe(scratch_db, tmp_path, monkeypatch):
    """A table is read into memory by its size on the source, which compressed TOAST
    values make far smaller than its rows: past MEMORY_LIMIT_BYTES the read is
    abandoned, and the table streams through the pipe in the same session (psycopg2
    drops the rest of the abandoned COPY first); the rows and counts are exact and the
    lane goes on with the next tables."""
    source, target = scratch_db("capysrc_outgrow"), scratch_db("capytgt_outgrow")
    pg.psql(
        source,
        text=SMALL_TABLES
        + "CREATE TABLE public.packed (id int PRIMARY KEY, body text);"
        + "INSERT INTO public.packed SELECT g, repeat('abc', 400000) FROM generate_series(1, 40) g;",
    )
    size = pg.admin("SELECT pg_total_relation_size('public.packed')", dbname=source)[0][0]
    assert size < stream.MEMORY_MAX_BYTES  # 48 MB of rows, compressed on disk
    monkeypatch.setattr(stream, "MEMORY_LIMIT_BYTES", 4 << 20)
    held: list[int] = []
    original = stream._through_memory

    def through_memory(table, source_conn, target_conn, flow):
        copied = original(table, source_conn, target_conn, flow)
        held.append(copied is None)
        return copied

    monkeypatch.setattr(stream, "_through_memory", through_memory)
    result = CopyRun(source_url(source), target, tmp_path, lanes=1).run()
    expected = pg.row_counts(source)
    assert result.source_counts == result.target_counts == pg.row_counts(target) == expected
    assert held.count(True) == 1 and held.count(False) == 2  # packed outgrew; small and child did not
    assert pg.admin(
        "SELECT md5(string_agg(body, '' ORDER BY id)) FROM public.packed", dbname=target
    ) == pg.admin("SELECT md5(string_agg(body, '' ORDER BY id)) FROM public.packed", dbname=source)
    assert_nothing_left(target)


def test_a_source_that_ends_idle_transactions_does_not_break_the_copy(scratch_db, tmp_path):
    """The snapshot's session sits idle in its transaction while the schema is restored
    (and lane sessions while their lane builds indexes): a source's
    idle_in_transaction_session_timeout must not end them."""
    source, target = scratch_db("capysrc_idle"), scratch_db("capytgt_idle")
    pg.psql(
        source, text=SMALL_TABLES + f"ALTER DATABASE {source} SET idle_in_transaction_session_timeout = '1s';"
    )
    run = CopyRun(source_url(source), target, tmp_path, lanes=2, before_copy=lambda: time.sleep(2.5))
    result = run.run()
    assert result.target_counts == pg.row_counts(source) == {"public.small": 500, "public.child": 2000}
    assert_nothing_left(target)


def test_a_lost_snapshot_session_fails_transiently_and_leaves_no_session(streams, scratch_db, tmp_path):
    source, target = scratch_db("capysrc_lost"), scratch_db("capytgt_lost")
    pg.psql(source, text=SMALL_TABLES)

    def lose_the_snapshot() -> None:
        pg.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (source,),
        )
        wait_until(lambda: sessions_in(source) == [], "the snapshot's session did not end")

    with pytest.raises(TransientError) as info:
        CopyRun(
            source_url(source), target, tmp_path, lanes=2, before_copy=lose_the_snapshot, by_command=streams
        ).run()
    assert info.value.message.startswith("lost the source's snapshot"), info.value.message
    assert_nothing_left(target)
    wait_until(lambda: sessions_in(source) == [], f"sessions left on the source: {sessions_in(source)}")


def test_a_source_that_stalls_mid_table_fails_transiently_within_the_stall_window(
    streams, scratch_db, tmp_path
):
    source, target = scratch_db("capysrc_stall"), scratch_db("capytgt_stall")
    pg.psql(source, text=BIG_TABLE)
    with cut_off_relay(after_bytes=2 * 1024 * 1024) as relay:
        run = CopyRun(
            source_url(source, port=relay.port),
            target,
            tmp_path,
            by_command=streams,
            lanes=2,
            settings=SourceSettings(stall_seconds=3, read_timeout=600),
        )
        thread, outcome = run_in_thread(run)
        thread.join(3 + MARGIN)
        assert not thread.is_alive(), "the copy went on waiting for a source that stopped sending"
        assert relay.cut.is_set()
    error = outcome["error"]
    assert isinstance(error, CopyStalled) and isinstance(error, TransientError)
    assert error.message.startswith("the copy of table public.big made no progress for 3 s")
    assert_nothing_left(target)
    assert pg.row_counts(target) == {"public.big": 0}


def test_a_cancel_stops_every_lane_and_raises_cancelled(streams, scratch_db, tmp_path, preview_lock):
    """One lane streams from a source that stopped sending (a cancel request cannot
    reach its COPY), the other waits for a lock in the preview: both stop."""
    source, target = scratch_db("capysrc_cancel"), scratch_db("capytgt_cancel")
    pg.psql(source, text=BIG_TABLE + SMALL_TABLES)
    cancellation = Cancellation()
    with cut_off_relay(after_bytes=2 * 1024 * 1024) as relay:
        run = CopyRun(
            source_url(source, port=relay.port),
            target,
            tmp_path,
            by_command=streams,
            lanes=2,
            settings=SourceSettings(stall_seconds=600, read_timeout=600),
            cancellation=cancellation,
            before_copy=lambda: preview_lock(target, "small"),
        )
        thread, outcome = run_in_thread(run)
        wait_until(relay.cut.is_set, "the big table's copy never reached the cut-off")
        wait_until(lambda: waiting_for_lock(target, "small"), "no lane waited for the preview's lock")
        cancellation.cancel("cancelled by a test")
        thread.join(MARGIN)
        assert not thread.is_alive(), "a lane went on after the cancel"
    error = outcome["error"]
    assert isinstance(error, Cancelled), repr(error)
    assert error.message == "cancelled by a test"
    assert lane_threads() == []


def test_a_row_the_preview_refuses_fails_permanently_naming_the_table(streams, scratch_db, tmp_path):
    source, target = scratch_db("capysrc_refused"), scratch_db("capytgt_refused")
    pg.psql(source, text=SMALL_TABLES)
    run = CopyRun(
        source_url(source),
        target,
        tmp_path,
        by_command=streams,
        before_copy=lambda: pg.psql(
            target, text="ALTER TABLE public.child ADD CONSTRAINT low CHECK (id < 1000)"
        ),
    )
    with pytest.raises(PermanentError) as info:
        run.run()
    assert not isinstance(info.value, TransientError)
    assert info.value.message.startswith("loading the rows of table public.child into the preview failed:")
    assert 'violates check constraint "low"' in info.value.message
    assert_nothing_left(target)


def test_a_failure_in_one_lane_stops_the_others(streams, scratch_db, tmp_path, preview_lock):
    """The lane copying `small` waits for a lock in the preview that is never released;
    the other lane's failure must stop it (or the copy would wait forever)."""
    source, target = scratch_db("capysrc_onefails"), scratch_db("capytgt_onefails")
    pg.psql(source, text=SMALL_TABLES)

    def prepare() -> None:
        pg.psql(target, text="ALTER TABLE public.child ADD CONSTRAINT low CHECK (id < 1000)")
        preview_lock(target, "small")

    thread, outcome = run_in_thread(
        CopyRun(source_url(source), target, tmp_path, lanes=2, before_copy=prepare, by_command=streams)
    )
    thread.join(MARGIN)
    assert not thread.is_alive(), "the lane waiting for the lock was not stopped"
    error = outcome["error"]
    assert isinstance(error, PermanentError) and "table public.child" in error.message, repr(error)
    assert lane_threads() == []


def test_the_schema_archive_leaves_out_exactly_the_copied_tables_rows(scratch_db, tmp_path, monkeypatch):
    """The copied tables' rows are left out of the schema archive by a few patterns of
    quoted names (stages.copy.live.exclusion_patterns): names full of pattern and regular
    expression characters match only themselves, and what is not copied (a sequence's
    value, a materialized view's refresh) stays; a schema with nothing else to keep is
    left out whole."""
    import stages.copy.live as live
    from stages.copy.live import Snapshot
    from stages.dumps import toc
    from stages.tools.commands import PgTools
    from tests.support.copying import PG_BIN

    monkeypatch.setattr(live, "PATTERN_TABLES", 3)  # several chunks per schema
    source = scratch_db("capysrc_patterns")
    names = [
        "a|b",
        "(x)",
        "Mixed",
        "dot.ted",
        "star*",
        'q"uote',
        "dollar$",
        "[c]",
        "back\\slash",
        "^caret",
        "ab",
    ]
    statements = [
        "CREATE SCHEMA \"Odd.Schema\"; CREATE SEQUENCE public.counter; SELECT setval('public.counter', 41);"
    ]
    for schema in ("public", "Odd.Schema"):
        for name in names:
            quoted = '"{}"."{}"'.format(schema.replace('"', '""'), name.replace('"', '""'))
            statements.append(f"CREATE TABLE {quoted} (id int); INSERT INTO {quoted} VALUES (1);")
    statements.append("CREATE MATERIALIZED VIEW public.seen AS SELECT 1 AS one;")
    # Every table copied, but a sequence's value to keep: not excluded whole.
    statements.append(
        "CREATE SCHEMA seqs; CREATE TABLE seqs.t (id int); CREATE SEQUENCE seqs.s; SELECT setval('seqs.s', 7);"
    )
    pg.psql(source, text="\n".join(statements))
    tools = PgTools(PG_BIN)
    archive = str(tmp_path / "schema.dump")
    with Snapshot.open(source_url(source), SourceSettings(), None) as snapshot:
        tables = snapshot.catalog.tables
        assert len(tables) == 2 * len(names) + 1
        # Leave two tables' rows in: a name the others' patterns must not match by accident.
        copied = [t for t in tables if t.name not in ("ab", "a|b") or t.schema == "Odd.Schema"]
        assert len(live.exclusion_patterns(copied)) > 2
        # Only "Odd.Schema" has no data to keep but its copied tables': one pattern, `"Odd.Schema".*`.
        assert snapshot.schemas_copied_whole(copied) == {"Odd.Schema"}
        assert '"Odd.Schema".*' in live.exclusion_patterns(copied, {"Odd.Schema"})
        snapshot.dump_schema(tools, archive, copied)
    data = {
        (e.desc, e.namespace, e.name)
        for e in toc.read(tools, archive)
        if "DATA" in e.desc or e.desc == "SEQUENCE SET"
    }
    assert data == {
        ("TABLE DATA", "public", "ab"),
        ("TABLE DATA", "public", "a|b"),
        ("SEQUENCE SET", "public", "counter"),
        ("SEQUENCE SET", "seqs", "s"),
        ("MATERIALIZED VIEW DATA", "public", "seen"),
    }


def test_the_fetch_stages_estimate_names_the_tables_the_snapshot_copies(scratch_db):
    from stages.copy.live import Snapshot, size_up

    source = scratch_db("capysrc_sizeup")
    pg.psql(
        source, text=SMALL_TABLES + "CREATE SCHEMA s; CREATE TABLE s.t (a int); CREATE VIEW s.v AS SELECT 1;"
    )
    size = size_up(source_url(source), SourceSettings())
    with Snapshot.open(source_url(source), SourceSettings(), None) as snapshot:
        assert size.tables == snapshot.catalog.tables
        assert size.server_version == snapshot.server_version
    assert {t.key for t in size.tables} == {"public.small", "public.child", "s.t"}


@pytest.mark.parametrize(("running", "workers"), [(1, "2"), (2, "0"), (3, "0")])
def test_a_build_that_starts_beside_another_task_has_no_parallel_workers(scratch_db, running, workers):
    """A build alone (a large table's key when nothing else is left) may use the
    server's parallel workers; one that starts while another task runs may not (the
    lanes already use the cores: a parallel btree build beside `mix`'s trigram index,
    which PostgreSQL builds in one process, slowed that build). The setting is the
    build's transaction's own: the session is back to the server's after it."""
    from stages.copy.engine import CopyProgress, Lane, _execute

    target = scratch_db("capytgt_parallel")
    conn = psycopg2.connect(pg.url_for(target))
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW max_parallel_maintenance_workers")
            assert cur.fetchone() == ("2",)  # the server's default, which alone keeps
        progress = CopyProgress(tables_total=1, bytes_total=0, running=running)
        seen = (
            "CREATE TABLE seen AS SELECT current_setting('max_parallel_maintenance_workers') AS maintenance, "
            "current_setting('max_parallel_workers_per_gather') AS per_gather"
        )
        _execute(seen, "a table", beside=progress)(Lane(conn))
        with conn.cursor() as cur:
            cur.execute("SELECT maintenance, per_gather FROM seen")
            assert cur.fetchone() == (workers, workers)
            cur.execute("SHOW max_parallel_maintenance_workers")
            assert cur.fetchone() == ("2",)
    finally:
        conn.close()


def test_a_build_on_tables_too_small_for_parallel_workers_spends_no_statement_on_them():
    """A table under PostgreSQL's min_parallel_table_scan_size (8 MB by default) gets no
    parallel workers anyway: its builds (thousands, for `many`) run as they are. A
    foreign key's check reads both of its tables: either one large enough counts."""
    from stages.copy.engine import PARALLEL_MIN_BYTES, CopyProgress, _parallel

    progress = CopyProgress(tables_total=2, bytes_total=0)
    assert _parallel(progress, PARALLEL_MIN_BYTES - 1) is None
    assert _parallel(progress, PARALLEL_MIN_BYTES) is progress
    assert _parallel(progress, 100, PARALLEL_MIN_BYTES) is progress
    assert _parallel(progress, 100, 200) is None
