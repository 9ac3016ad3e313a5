"""Driving the copy engine directly: a source database copied into a scratch target as
the live restore stage does (pipeline.steps.live), without the job around it.

The target is written as the admin (a superuser); what the project role may or may not
do is covered by the imports run through `run_import`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from stages.connections.pgurl import SourceURL
from stages.copy.engine import CopyResult, copy_rows, plan_copy
from stages.copy.live import Snapshot, SourceSettings
from stages.copy.postdata import split
from stages.copy.predata import schema_slices
from stages.dumps import toc
from stages.dumps.archivetoc import read_toc
from stages.tools.commands import Cancellation, PgRestore, PgTools
from stages.tools.restore import restore_section
from tests.support import pg

PG_BIN = "/usr/lib/postgresql/15/bin"


def source_url(dbname: str, *, port: int | None = None) -> SourceURL:
    url = pg.url_for(dbname, sslmode="disable")
    if port is not None:
        url = url.replace(":5432/", f":{port}/")
    return SourceURL.parse_source(url)


@dataclass
class CopyRun:
    """One copy's options; `before_copy` runs once pre-data is in the target (e.g. to
    add a constraint the rows break, or to lock a table there)."""

    source: SourceURL
    target: str
    work: Path
    lanes: int = 2
    settings: SourceSettings = field(default_factory=SourceSettings)
    cancellation: Cancellation | None = None
    before_copy: Callable[[], None] = lambda: None
    progress: list[dict[str, Any]] = field(default_factory=list)
    by_command: bool = False  # large tables stream through psql (stages.copy.live.COMMAND_MIN_BYTES)
    sliced: bool = False  # the pre-data section restored in slices beside the copy (stages.copy.predata)

    def run(self) -> CopyResult:
        tools = PgTools(PG_BIN, cancellation=self.cancellation)
        target_url = source_url(self.target)
        with Snapshot.open(
            self.source, self.settings, self.cancellation, tools=tools if self.by_command else None
        ) as snapshot:
            archive = str(self.work / "schema.dump")
            snapshot.dump_schema(tools, archive, snapshot.catalog.tables)
            plan = toc.plan(toc.read(tools, archive), precreated_schemas=set())
            list_file = str(self.work / "restore.list")
            Path(list_file).write_text(plan.list_file(), encoding="utf-8")
            if not self.sliced:
                restore_section(tools, target_url, archive, "pre-data", list_file=list_file)
            self.before_copy()
            post_data = toc.render(
                tools,
                archive,
                plan.keep,
                str(self.work),
                "post-data",
                options=[*PgRestore.AS_RESTORED, "--section=post-data"],
            )
            rendered = split(post_data, plan.keep)
            copy_plan = plan_copy(snapshot, plan.keep, rendered)
            schema = None
            if self.sliced:  # as pipeline.steps.live: the tables keys reference first
                schema = schema_slices(
                    tools,
                    target_url,
                    archive,
                    plan.keep,
                    list_file,
                    str(self.work),
                    archived=read_toc(archive).entries,
                    first=copy_plan.referenced,
                )

            def restore_rest(entries: list[toc.TocEntry]) -> None:
                rest_file = self.work / "rest.list"
                rest_file.write_text("\n".join(e.line for e in entries) + "\n", encoding="utf-8")
                restore_section(tools, target_url, archive, "post-data", list_file=str(rest_file))

            return copy_rows(
                snapshot,
                copy_plan,
                lanes=self.lanes,
                open_target=lambda: psycopg2.connect(pg.url_for(self.target)),
                restore_rest=restore_rest,
                restore_data_section=lambda: restore_section(
                    tools, target_url, archive, "data", list_file=list_file
                ),
                maintenance_work_mem="64MB",
                cancellation=self.cancellation,
                on_progress=self.progress.append,
                statement_timeout_ms=3600 * 1000,
                schema=schema,
            )


def sessions_in(dbname: str) -> list[tuple[Any, ...]]:
    """Other sessions connected to `dbname` (pid, application, state, query)."""
    return pg.admin(
        "SELECT pid, application_name, state, query FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )


def in_small_slices(
    monkeypatch: Any, *, first: int = 1, by_command: bool = False, frozen: bool = False
) -> None:
    """Make every schema take the slices' way (stages.copy.predata), the first slice
    `first` entries long; `by_command`: every table's rows through psql
    (stages.copy.live.COMMAND_MIN_BYTES), in COPY's text format; `frozen`: every table loaded after TRUNCATE,
    which holds it through its copy (stages.copy.stream.FREEZE_MIN_BYTES)."""
    import stages.copy.live
    import stages.copy.predata
    import stages.copy.stream

    monkeypatch.setattr(stages.copy.predata, "SLICE_MIN_ENTRIES", 0)
    monkeypatch.setattr(stages.copy.predata, "SLICE_FIRST", first)
    if by_command:
        monkeypatch.setattr(stages.copy.live, "COMMAND_MIN_BYTES", 0)
        monkeypatch.setattr(stages.copy.live, "BINARY_COPY", False)  # psql copies in text only
    if frozen:
        monkeypatch.setattr(stages.copy.stream, "FREEZE_MIN_BYTES", 0)


def copied_as_source(source: str, target: str, work: Path, **options: Any) -> CopyResult:
    """Copy `source` into `target` (a CopyRun with `options`, its schema in slices) and
    check that the copy is the source: the same rows counted on both sides, the same
    schema dump."""
    result = CopyRun(source_url(source), target, work, sliced=True, **options).run()
    assert result.source_counts == result.target_counts == pg.row_counts(source)
    assert pg.schema_dump(target) == pg.schema_dump(source), pg.schema_difference(source, target)
    return result


HOLD_SECONDS = 10  # a bound, not a measure: what a held copy waits for comes at once, or never


def hold_copy_until_loaded(monkeypatch: Any, held: str, later: str) -> dict[str, bool]:
    """Hold table `held`'s copy (through psql: stages.copy.live.stream_from_command),
    its table emptied (locked) in the preview's transaction, until table `later`'s copy
    has committed; the dict says whether the wait ran out ("timed_out")."""
    import threading

    import stages.copy.live

    loaded = threading.Event()
    seen = {"timed_out": False}
    original = stages.copy.live.stream_from_command

    def patched(table: Any, run_source: Any, target: Any, flow: Any) -> Any:
        if table.name == held:
            with target.cursor() as cur:
                cur.execute(table.emptying())  # the lock the copy holds through its rows
            if not loaded.wait(HOLD_SECONDS):
                seen["timed_out"] = True
        copied = original(table, run_source, target, flow)
        if table.name == later:
            loaded.set()
        return copied

    monkeypatch.setattr(stages.copy.live, "stream_from_command", patched)
    return seen


def record_builds(monkeypatch: Any) -> list[str]:
    """What each statement task the copy plans says it creates, as it is planned: the
    `what` of stages.copy.engine's `_execute_together` (a task per index, constraint,
    foreign key…, through `_execute`; foreign keys of small tables into one table, a few
    to a transaction) and `_execute_in_turn` (a small table's builds as one task)."""
    import stages.copy.engine as engine

    seen: list[str] = []
    for name in ("_execute_in_turn", "_execute_together"):
        original = getattr(engine, name)

        def recording(statement: Any, what: str, original: Any = original, **options: Any) -> Any:
            seen.append(what)
            return original(statement, what, **options)

        monkeypatch.setattr(engine, name, recording)
    return seen


def slow_function_sql(seconds: float) -> str:
    """`public.slow(int)`, IMMUTABLE, returning its argument: in a copy's target
    (a database named capytgt…) it sleeps `seconds` first, on the source it does not."""
    return f"""
CREATE FUNCTION public.slow(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF pg_catalog.current_database() LIKE 'capytgt%' THEN PERFORM pg_catalog.pg_sleep({seconds}); END IF;
    RETURN x;
END $$;
"""


# Values whose text form depends on the session's display settings, or that COPY's text
# format escapes: each way a table's rows travel must bring them back exactly.
TRICKY = r"""
CREATE TABLE public.tricky (
    id int PRIMARY KEY,
    note text,
    raw bytea,
    at timestamptz,
    day date,
    span interval,
    ratio float8,
    amount numeric,
    tags text[],
    doc jsonb
);
INSERT INTO public.tricky VALUES
    (1, E'line\nbreak\ttab\\back\rcr', '\x00ff10', '2024-02-29 23:59:59.123456+05:30', '0044-03-15 BC',
     '1 year 2 mons -3 days 04:05:06.789', 0.1, 12345678901234567890.123456789, '{"a,b","c\"d",NULL}',
     '{"k": "v\n", "n": [1, 2.5e10]}'),
    (2, '\N', '', 'infinity', '-infinity', '-178000000 years', 'NaN', 'NaN', '{}', 'null'),
    (3, NULL, NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL, NULL),
    (4, 'ünïcødé ✓ 𝄞', '\xdeadbeef', '1999-12-31 00:00:00+00', '2000-01-01', '0', 1.7976931348623157e308,
     -0.000000000000000000001, ARRAY[repeat('x', 3000)], '{"deep": {"deeper": [true, false, null]}}');
"""


def rows_as_text(
    dbname: str, query: str = "SELECT t::text FROM public.tricky t ORDER BY id"
) -> list[tuple[str]]:
    """The rows of `query` (every row of public.tricky as text), printed with the same
    settings on either side (no display setting of the database's own applies)."""
    conn = psycopg2.connect(pg.url_for(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; "
                "SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'"
            )
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def record_formats(monkeypatch: Any) -> dict[str, bool]:
    """Record the format each table's rows travel in from a live source (True: COPY's
    binary format, stages.copy.live.BINARY_COPY), by table, as the copies run (through
    this process or psql)."""
    import stages.copy.live

    used: dict[str, bool] = {}
    for name in ("stream_table", "stream_from_command"):  # this process's way, psql's way
        monkeypatch.setattr(stages.copy.live, name, _recording(getattr(stages.copy.live, name), used))
    return used


def _recording(original: Any, used: dict[str, bool]) -> Any:
    def recording(table: Any, *args: Any, **kwargs: Any) -> Any:
        used[table.key] = table.binary
        return original(table, *args, **kwargs)

    return recording
