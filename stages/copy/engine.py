"""The copy engine: rows streamed in parallel straight into the preview, from a live
source's snapshot (stages.copy.live) or an uploaded archive (stages.copy.archive), each
table's indexes and constraints built as soon as its rows are in.

The order of work (see `copy_rows` for the schedule):
1. The caller has the schema archive (the live source's `pg_dump --snapshot` without
   the copied rows, or the upload itself) and restores its pre-data section (pg_restore,
   as the restore role), or hands it to `copy_rows` in slices (`SchemaPlan`, from
   stages.copy.predata), restored one after another beside the copy.
2. `plan_copy` splits the post-data section: what belongs to a copied table is
   scheduled with the copy, the rest runs after it.
3. `copy_rows`: N lanes, each with a preview session (and what the row source needs:
   a source session in the snapshot, a pg_restore of the archive), run the tasks
   (stages.copy.scheduler): every table's rows, its indexes (a primary key's or unique
   constraint's index too, built as a plain unique index, when the source says which),
   then its constraints, then foreign keys once both tables are done (those of small
   tables into one table a few to a transaction: KEY_BATCH), the data
   section's remainder (sequence values…) and the large objects alongside, and each
   table's ANALYZE once nothing more is built on it (a small table's indexes,
   constraints and ANALYZE are one task, each in a transaction of its own, before its
   foreign keys: SMALL_TABLE_BYTES); then the rest of the post-data
   section (triggers, policies, materialized views refreshed after their indexes…) in
   the archive's order. (With extended statistics in the schema, every ANALYZE waits
   for them, at the end.)

Preview sessions run with synchronous_commit off and a sized maintenance_work_mem: an
interrupted copy is restarted from the beginning anyway, so nothing is lost by it. An
index, key or foreign key that starts while another task runs is built without
parallel workers (`_execute`): the lanes already use the cores, and a parallel btree
build beside `mix`'s trigram index (built by one process) took cores from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from stages.copy.catalog import Owned
from stages.copy.postdata import Block, Rendered, first_statement
from stages.copy.scheduler import Schedule, Task, rank
from stages.copy.stream import Flow, SourceTable, preceded_by, quote_name, quoted
from stages.dumps.toc import TocEntry
from stages.errors import Cancelled, ClusterUnavailable, PermanentError, SourceUnreachable, TransientError
from stages.tools.commands import Cancellation

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
# A loaded table's rows: (table, rows the source or dump held, rows the preview took).
Record = Callable[["SourceTable", int, int], None]

# Relative cost of building an index, per byte of its table, by access method: a
# trigram GIN index takes many times a btree's time (issue 11: 35-46 s on 60k rows).
INDEX_COST = {"btree": 0.4, "hash": 0.4, "brin": 0.05, "gist": 3.0, "spgist": 2.0, "gin": 8.0}
FOREIGN_KEY_COST = 0.2
ANALYZE_COST = 64 * 1024
LARGE_OBJECTS = "the large objects"
# A build on a table smaller than this gets no parallel workers from the server
# (min_parallel_table_scan_size's default): no statement is spent on keeping them from it.
PARALLEL_MIN_BYTES = 8 << 20
# A table smaller than this has its indexes, constraints and ANALYZE run by one task, a
# round trip each (`_small_table_builds`): a task of its own each cost three round trips
# and a turn of the scheduler, more than building on a few pages does (`many`: 2,000
# tables, 8,000 such tasks).
SMALL_TABLE_BYTES = 1 << 20
# A table of this size or more (every table whose builds are tasks of their own) has its
# primary key's or unique constraint's index built as a plain unique index, beside the
# table's other index builds, then attached to the constraint (ADD CONSTRAINT … USING
# INDEX). A smaller table's key is added by one ALTER TABLE in its task of builds: the
# attach statement cost more than the builds side by side save (`many`: 2,000 attaches,
# 1.3 s of the lanes' time). From 8 MB down to 1 MB, `tiny`'s orders (7.7 MB) built its
# key beside its other index instead of after it.
SEPARATE_KEY_MIN_BYTES = SMALL_TABLE_BYTES
# Foreign keys of small tables (SMALL_TABLE_BYTES) into one table are added this many
# at most to a transaction (`_key_task`): `many`'s 2,000 took 3.1 s so against 4.7 s
# one transaction each, and 3.4 s 50 or 100 at a time.
KEY_BATCH = 20
# ...and no more relations than this locked by one such transaction (see `_key_batches`):
# the server's lock table holds max_locks_per_transaction (64 by default) per session,
# shared by every database of the cluster.
KEY_BATCH_LOCKS = 64
# A build the server chose to break a deadlock is tried again this many times, after
# a pause of this many seconds times the attempt (`_past_deadlocks`).
DEADLOCK_RETRIES = 3
DEADLOCK_PAUSE_SECONDS = 0.2
# Each task also costs a fixed amount: thousands of small tables are not free.
TASK_OVERHEAD = 256 * 1024
PROGRESS_SECONDS = 2.0
# The least a copy must move to run alone at the head of the chain that bounds the copy
# (see _head_alone).
ALONE_MIN_BYTES = 64 << 20


class CopyStalled(SourceUnreachable):
    """A table's rows stopped coming from the source or the dump."""


@dataclass
class CopyPlan:
    """What `copy_rows` does: the tables to stream, the post-data blocks it runs itself
    (by table), and the post-data entries left for pg_restore at the end."""

    tables: list[SourceTable]
    owned_blocks: list[tuple[Block, Owned]]
    # The rest of post-data: as blocks run in the archive's order (pg_restore -L would
    # leave out the comments of entries it is not given), or, when pg_restore's
    # rendering could not be split, every post-data entry, for pg_restore.
    rest_blocks: list[Block]
    rest: list[TocEntry]
    preamble: str

    @property
    def referenced(self) -> set[int]:
        """The copied tables (by oid) that the copied tables' foreign keys reference."""
        return {owned.references for _block, owned in self.owned_blocks if owned.references}


class RowSource(Protocol):
    """Where a copy's rows come from: a live source's snapshot (stages.copy.live) or an
    uploaded archive (stages.copy.archive)."""

    @property
    def stall_seconds(self) -> float:
        """How long a table's rows may stop coming before the copy fails."""

    def tables_in(self, kept: list[TocEntry]) -> list[SourceTable]:
        """The tables whose rows it streams, of those the restore plan keeps."""

    def owner_of(self, entry: TocEntry) -> Owned | None:
        """Which table a post-data entry (an index, a constraint) belongs to, if known."""

    def loading(self) -> contextlib.AbstractContextManager[Loading]:
        """The rows' side of one copy: its data tasks and how to stop them."""


class Loading(Protocol):
    def data_tasks(
        self, tables: list[SourceTable], progress: CopyProgress, record: Record
    ) -> tuple[dict[int, Task[Lane]], list[Task[Lane]]]:
        """The tasks that load `tables`' rows, by table id (tables may share a task),
        and any other data tasks (large objects). Each loaded table is `record`ed."""

    def interrupt(self) -> None:
        """Stop whatever is reading rows, from another thread (the copy has failed);
        called once, so what starts reading after it must be stopped too."""

    def close_lane(self, lane: Lane) -> None:
        """Release what a lane holds on the rows' side."""


def plan_copy(source: RowSource, kept: list[TocEntry], rendered: Rendered) -> CopyPlan:
    """Split the restore plan's post-data: the indexes, constraints and foreign keys of
    copied tables are scheduled with the copy; the rest (and everything, if pg_restore's
    rendering could not be split exactly) is left to pg_restore."""
    tables = source.tables_in(kept)
    keys = {t.oid for t in tables}
    owned_blocks: list[tuple[Block, Owned]] = []
    taken: set[int] = set()
    if rendered.exact:
        for block in rendered.blocks:
            owned = source.owner_of(block.entry)
            if (
                owned is None
                or owned.table not in keys
                or (owned.references and owned.references not in keys)
            ):
                continue
            owned_blocks.append((block, owned))
            taken.add(block.entry.dump_id)
    if rendered.exact:
        rest_blocks = [block for block in rendered.blocks if block.entry.dump_id not in taken]
        return CopyPlan(tables, owned_blocks, rest_blocks, [], rendered.preamble)
    return CopyPlan(tables, [], [], list(kept), rendered.preamble)


@dataclass(frozen=True)
class SchemaSlice:
    """A slice of the pre-data section that `restore()` puts into the preview
    (pg_restore -L): `entries` of them."""

    entries: int
    restore: Callable[[], None]


@dataclass(frozen=True)
class SchemaPlan:
    """The pre-data section in slices, restored one after another beside the copy
    (stages.copy.predata). A table's rows load once the slice `tables` names for it
    (by catalog oid; slices numbered from 0) is in; a post-data entry built on a
    copied table (an index, a constraint, a foreign key) once its copy is done and the
    slice `needs` names for it (by dump id) is in; what neither names, and everything
    else (sequence values, large objects), once the last slice is in."""

    slices: list[SchemaSlice]
    tables: dict[int, int] = field(default_factory=dict)
    needs: dict[int, int] = field(default_factory=dict)


@dataclass
class Lane:
    """One lane: a preview session, and (for a live source) a source session in the
    snapshot, opened on first use by the loading."""

    target: psycopg2.extensions.connection
    source: psycopg2.extensions.connection | None = None


@dataclass
class CopyResult:
    source_counts: dict[str, int]
    target_counts: dict[str, int]
    bytes: int


@dataclass
class CopyProgress:
    """What the reporter thread reads; changed under `lock`."""

    tables_total: int
    bytes_total: int
    cost_total: float = 0.0
    started: float = field(default_factory=time.monotonic)
    tables_done: int = 0
    bytes_done: int = 0
    rows_done: int = 0
    cost_done: float = 0.0
    step: str = "data"
    phase: str = "copying rows"
    running: int = 0  # tasks running now (lanes and the serial thread)
    flows: dict[SourceTable | str, Flow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def copy_rows(
    source: RowSource,
    plan: CopyPlan,
    *,
    lanes: int,
    open_target: Callable[[], psycopg2.extensions.connection],
    restore_rest: Callable[[list[TocEntry]], None],
    restore_data_section: Callable[[], None],
    maintenance_work_mem: str,
    cancellation: Cancellation | None,
    on_progress: Progress,
    statement_timeout_ms: int,
    on_report_end: Callable[[], None] = lambda: None,
    schema: SchemaPlan | None = None,
) -> CopyResult:
    """Run the copy (see the module's docstring); return both sides' row counts.

    `schema`: the pre-data section in slices, restored beside the copy (see
    SchemaPlan); without it, the caller has restored the pre-data section already.

    `open_target` opens a session in the preview as the restore role; `restore_rest`
    restores post-data entries with pg_restore, `restore_data_section` what the data
    section holds besides the streamed rows (sequence values…). A cancel
    (`cancellation`), a lost claim or cancel raised by `on_progress`, or the first
    failing task stops every lane."""
    counts: dict[int, tuple[int, int]] = {}  # by table id
    progress = CopyProgress(tables_total=len(plan.tables), bytes_total=sum(t.bytes for t in plan.tables))
    # Extended statistics (CREATE STATISTICS, with the rest of post-data) are only
    # computed by an ANALYZE after them: with any, every table is analyzed at the end.
    analyze_each = not any(block.entry.desc == "STATISTICS" for block in plan.rest_blocks) and not plan.rest
    sessions: list[Lane] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def record(table: SourceTable, source_rows: int, target_rows: int) -> None:
        counts[table.oid] = (source_rows, target_rows)
        with progress.lock:
            progress.tables_done += 1
            if progress.tables_done == progress.tables_total:
                progress.step, progress.phase = "indexes", "building indexes and constraints"

    with source.loading() as loading:
        planned = _tasks(loading, plan, record, restore_data_section, progress, analyze_each=analyze_each)
        tasks = planned.tasks
        serial = _schema_tasks(schema, planned)
        _head_alone(planned, serial, lanes)
        progress.cost_total = sum(t.cost for t in [*serial, *tasks])
        stall_seconds = source.stall_seconds

        interrupted: list[bool] = []

        def interrupt(err: BaseException) -> None:
            """Stop every running statement of every lane (the first failure, a cancel).
            The schedule repeats it while tasks still run: the lanes' statements are
            cancelled each time, the row source stopped once (it stops what starts after)."""
            with progress.lock:
                if not failure:
                    failure.append(err)
                lanes_now = list(sessions)
                first = not interrupted
                interrupted.append(True)
            stop.set()
            if first:
                loading.interrupt()
            for lane in lanes_now:
                # The preview is ours (the project's cluster): its cancel is a local round trip.
                if not lane.target.closed:
                    with contextlib.suppress(psycopg2.Error):
                        lane.target.cancel()

        def check_stopped() -> None:
            if stop.is_set():
                raise failure[0] if failure else PermanentError("the copy was stopped")

        def started(task: Task[Lane]) -> None:
            check_stopped()
            with progress.lock:
                progress.running += 1
            log.debug(
                "copy: %.3f s: %s starts (rank %.0f)",
                time.monotonic() - progress.started,
                task.name,
                task.rank,
            )

        def finished(task: Task[Lane]) -> None:
            log.debug("copy: %.3f s: %s done", time.monotonic() - progress.started, task.name)
            with progress.lock:
                progress.cost_done += task.cost
                progress.running -= 1

        unsubscribe = (
            cancellation.on_cancel(lambda: interrupt(Cancelled(cancellation.reason or "cancelled")))
            if cancellation is not None
            else (lambda: None)
        )
        reporter = threading.Thread(
            # In the stage's logging context (job, stage, attempt), as every lane.
            target=contextvars.copy_context().run,
            args=(_report, progress, stop, on_progress, interrupt, stall_seconds, on_report_end),
            daemon=True,
        )
        try:
            for _ in range(max(1, lanes)):
                conn = _open_lane_target(
                    open_target, plan.preamble, maintenance_work_mem, statement_timeout_ms
                )
                sessions.append(Lane(conn))
            reporter.start()
            Schedule(
                tasks, sessions, serial=serial, on_start=started, on_finish=finished, on_failure=interrupt
            ).run()
            _raise_first(failure)
            progress.step, progress.phase = "indexes", "restoring triggers, policies and materialized views"
            if plan.rest:
                restore_rest(plan.rest)
            for block in plan.rest_blocks:
                check_stopped()
                _execute(block.sql, f"{block.entry.desc.lower()} {block.entry.name}")(sessions[0])
            if not analyze_each:
                progress.step, progress.phase = "analyze", "analyzing the tables"
                analyze = [
                    Task[Lane](f"analyze {t.key}", 1.0 + t.bytes, _analyze(t), table_locks(t.oid))
                    for t in plan.tables
                ]
                Schedule(analyze, sessions, on_start=started, on_failure=interrupt).run()
                _raise_first(failure)
            check_stopped()
            progress.step, progress.phase = "analyze", "analyzing the partitioned tables"
            try:
                _analyze_partitioned(sessions[0])
            except PermanentError as err:
                # Statistics only: the copy is whole without them (autovacuum never makes these).
                check_stopped()
                log.warning("the partitioned tables were not analyzed: %s", err.message)
        except BaseException as err:
            # A lane's error caused by the interruption (a cancelled statement) is not the news.
            if failure and err is not failure[0]:
                raise failure[0] from err
            raise
        finally:
            stop.set()
            unsubscribe()
            if reporter.is_alive():
                reporter.join()
            for lane in sessions:
                loading.close_lane(lane)
                with contextlib.suppress(psycopg2.Error):
                    lane.target.close()
        return CopyResult(
            # In the catalog's order, as stages.database.inventory counts (two tables may share a key).
            {t.key: counts[t.oid][0] for t in plan.tables if t.oid in counts},
            {t.key: counts[t.oid][1] for t in plan.tables if t.oid in counts},
            progress.bytes_done,
        )


def _raise_first(failure: list[BaseException]) -> None:
    if failure:
        raise failure[0]


def _open_lane_target(
    open_target: Callable[[], psycopg2.extensions.connection],
    preamble: str,
    maintenance_work_mem: str,
    timeout_ms: int,
) -> psycopg2.extensions.connection:
    conn = open_target()
    conn.autocommit = True
    with target_errors("opening a session in the preview"), conn.cursor() as cur:
        if preamble.strip():
            cur.execute(preamble)
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET maintenance_work_mem = %s", (maintenance_work_mem,))
        cur.execute("SET statement_timeout = %s", (max(1, timeout_ms),))
        cur.execute("SET lock_timeout = 0")
    # The preamble may set the dump's client_encoding (an archive of a LATIN1 database):
    # statements are then encoded in it, as the rows already are.
    encoding = conn.get_parameter_status("client_encoding")
    if encoding and encoding != conn.encoding:
        conn.set_client_encoding(encoding)
    conn.autocommit = False
    return conn


@contextlib.contextmanager
def target_errors(what: str) -> Iterator[None]:
    try:
        yield
    except psycopg2.OperationalError as err:
        if isinstance(err, psycopg2.errors.QueryCanceled):
            raise PermanentError(f"{what} was stopped: {str(err).splitlines()[0]}") from err
        if isinstance(err, psycopg2.errors.TransactionRollbackError):
            # A deadlock (met again after DEADLOCK_RETRIES) or a serialization failure
            # with another session: the session is fine, and another attempt of the
            # stage may not meet it; one that every attempt meets says what to change.
            first = str(err).splitlines()[0]
            raise TransientError(
                f"{what} failed: {first}; the import is retried",
                when_repeated=(
                    f"{what} failed on every attempt: {first}. An index, constraint or check "
                    "calls a function that reads another table, built at the same time by "
                    "another session of the copy; a function used there must not read tables "
                    "(PostgreSQL requires it to be IMMUTABLE): change it, then import again"
                ),
            ) from err
        log.warning("%s: lost the preview session: %s", what, str(err).strip())
        raise ClusterUnavailable() from err
    except psycopg2.Error as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PermanentError(f"{what} failed: {first}") from err


@dataclass
class _Planned:
    """The copy's tasks; each table's copy task (by table id); the tasks that build on
    the copied tables (indexes, constraints, foreign keys, ANALYZE), and what they restore."""

    tasks: list[Task[Lane]]
    copies: dict[int, Task[Lane]]
    built: list[Task[Lane]]
    entries: dict[int, list[int]]  # the post-data entries (dump ids) a built task restores, by task id


def _tasks(
    loading: Loading,
    plan: CopyPlan,
    record: Record,
    restore_data_section: Callable[[], None],
    progress: CopyProgress,
    *,
    analyze_each: bool,
) -> _Planned:
    """The schedule: copy → indexes → constraints → foreign keys, per table (by id)."""
    by_table = {t.oid: t for t in plan.tables}
    copies, data_tasks = loading.data_tasks(plan.tables, progress, record)
    indexes: dict[int, list[Task[Lane]]] = {oid: [] for oid in by_table}
    attach: dict[int, list[tuple[Block, Owned]]] = {oid: [] for oid in by_table}
    foreign: list[tuple[Block, Owned]] = []
    entries: dict[int, list[int]] = {}  # the dump ids of the entries a task restores, by task
    small_indexes: dict[int, list[Block]] = {oid: [] for oid in by_table if _built_at_once(by_table[oid])}
    # What a foreign key's check on a table locks, at most: the table and an index per
    # index or constraint (not every constraint makes one).
    relations = dict.fromkeys(by_table, 1)
    for block, owned in plan.owned_blocks:
        size = by_table[owned.table].bytes
        if owned.kind != "foreign key":
            relations[owned.table] += 1
        if owned.unique_index is not None and size < SEPARATE_KEY_MIN_BYTES:
            owned = dataclasses.replace(owned, unique_index=None)  # its own ALTER TABLE makes the index
        what = f"{block.entry.desc.lower()} {block.entry.name}"
        if owned.kind == "index" and owned.table in small_indexes:
            small_indexes[owned.table].append(block)
        elif owned.kind == "index" or (owned.kind == "constraint" and owned.unique_index):
            definition = (
                block.sql if owned.kind == "index" or owned.unique_index is None else owned.unique_index + ";"
            )
            cost = TASK_OVERHEAD + size * INDEX_COST.get(owned.method, 1.0)
            index = Task[Lane](
                f"index {block.entry.name}",
                cost,
                _execute(definition, what, beside=_parallel(progress, size)),
                table_locks(owned.table),
                exclusive=False,
                after=[copies[owned.table]],
            )
            indexes[owned.table].append(index)
            entries[id(index)] = [block.entry.dump_id]
        if owned.kind == "constraint":
            attach[owned.table].append((block, owned))
        elif owned.kind == "foreign key":
            foreign.append((block, owned))
    done: dict[int, Task[Lane]] = {}
    tasks: list[Task[Lane]] = list({id(task): task for task in copies.values()}.values())
    for oid, table_indexes in indexes.items():
        key = by_table[oid].key
        if oid in small_indexes:
            at_once = _small_table_builds(
                by_table[oid], small_indexes[oid], attach[oid], analyze=analyze_each
            )
            if at_once is None:
                done[oid] = copies[oid]
                continue
            at_once.after.append(copies[oid])
            tasks.append(at_once)
            entries[id(at_once)] = [b.entry.dump_id for b in small_indexes[oid]] + [
                b.entry.dump_id for b, _o in attach[oid]
            ]
            done[oid] = at_once
            continue
        tasks.extend(table_indexes)
        statements = [_constraint_sql(block, owned, by_table[oid]) for block, owned in attach[oid]]
        if statements:
            constraints = Task[Lane](
                f"constraints of {key}",
                TASK_OVERHEAD
                + sum(
                    by_table[oid].bytes * INDEX_COST["btree"] for b, o in attach[oid] if not o.unique_index
                ),
                _execute(
                    "\n".join(statements),
                    f"the constraints of table {key}",
                    beside=_parallel(progress, by_table[oid].bytes),
                ),
                table_locks(oid),
                after=[copies[oid], *table_indexes],
            )
            tasks.append(constraints)
            entries[id(constraints)] = [block.entry.dump_id for block, _owned in attach[oid]]
            done[oid] = constraints
        elif table_indexes:
            done[oid] = Task[Lane](
                f"indexes of {key}", 0.0, lambda _lane: None, frozenset(), after=[copies[oid], *table_indexes]
            )
            tasks.append(done[oid])
        else:
            done[oid] = copies[oid]
    last: dict[int, list[Task[Lane]]] = {oid: [task] for oid, task in done.items()}
    into: dict[int, list[_ForeignKey]] = {}  # foreign keys by the table they reference
    for block, owned in foreign:
        assert owned.references is not None
        into.setdefault(owned.references, []).append(
            _ForeignKey(
                block,
                owned,
                TASK_OVERHEAD + by_table[owned.table].bytes * FOREIGN_KEY_COST,
                [done[owned.table], done[owned.references]],
            )
        )
    for referenced, keys in into.items():
        chain: list[Task[Lane]] = []
        for batch in _key_batches(keys, by_table, relations):
            task = _key_task(batch, by_table, progress)
            chain.append(task)
            tasks.append(task)
            entries[id(task)] = [member.block.entry.dump_id for member in batch]
            for member in batch:
                last[member.owned.table].append(task)
            last[referenced].append(task)
        chain_serial(chain)
    if analyze_each:
        # Each table's statistics as soon as nothing more is built on it, beside the others' work.
        for oid, table in by_table.items():
            if oid in small_indexes:
                continue  # its task of builds analyzed it
            tasks.append(
                Task[Lane](
                    f"analyze {table.key}",
                    ANALYZE_COST + table.bytes * 0.02,
                    _analyze(table),
                    table_locks(oid),
                    after=last[oid],
                )
            )

    def data_section(_lane: Lane) -> None:
        restore_data_section()

    copying = {id(task) for task in copies.values()}
    built = [task for task in tasks if id(task) not in copying]  # on the copied tables
    tasks.append(Task[Lane]("sequences", TASK_OVERHEAD, data_section, frozenset({"<data section>"})))
    tasks.extend(data_tasks)
    return _Planned(tasks, copies, built, entries)


class _ForeignKey(NamedTuple):
    """A foreign key to add: its entry, its tables, its cost and what it waits for."""

    block: Block
    owned: Owned
    cost: float
    after: list[Task[Lane]]


def _key_batches(
    keys: list[_ForeignKey], by_table: dict[int, SourceTable], relations: dict[int, int]
) -> list[list[_ForeignKey]]:
    """The foreign keys into one table, in the order they can start (`ready_at`), cut
    into runs of consecutive keys of small tables (`_built_at_once`) for `_key_task`:
    KEY_BATCH keys at most, and KEY_BATCH_LOCKS relations (`relations`: a table and its
    indexes, which each key's check locks until the transaction ends, and the
    referenced table's once). A key of a larger table stays alone."""
    standing = [Task[Lane]("", key.cost, lambda _lane: None, after=key.after) for key in keys]
    ready = ready_at(standing)
    order = sorted(range(len(keys)), key=lambda i: (ready[id(standing[i])], keys[i].cost))
    batches: list[list[_ForeignKey]] = []
    locked = 0  # by the last batch
    for key in (keys[i] for i in order):
        run = batches[-1] if batches else []
        small = _built_at_once(by_table[key.owned.table])
        locks = relations.get(key.owned.table, 1)
        if (
            small
            and 0 < len(run) < KEY_BATCH
            and _built_at_once(by_table[run[-1].owned.table])
            and locked + locks <= KEY_BATCH_LOCKS
        ):
            run.append(key)
            locked += locks
        else:
            batches.append([key])
            locked = relations.get(key.owned.references or 0, 1) + locks
    return batches


def _key_task(
    batch: list[_ForeignKey], by_table: dict[int, SourceTable], progress: CopyProgress
) -> Task[Lane]:
    """The task that adds `batch`, a run of `_key_batches`, in one transaction: a
    statement (and round trip) per key, an error naming its key. Each key into a
    table rebuilds that table's cached triggers; a transaction for a few of them
    costs a third less than one each (`many`: 2,000 keys into one table)."""
    after: dict[int, Task[Lane]] = {}
    for key in batch:
        after.update((id(before), before) for before in key.after)
    names = [key.block.entry.name for key in batch]
    assert batch[0].owned.references is not None
    referenced = by_table[batch[0].owned.references]
    tables = {key.owned.table for key in batch} | {referenced.oid}
    beside = _parallel(progress, *(by_table[oid].bytes for oid in tables))
    if len(batch) == 1:
        name = f"foreign key {names[0]}"
        run = _execute(batch[0].block.sql, name, beside=beside)
    else:
        name = f"{len(batch)} foreign keys into table {referenced.key}"
        run = _execute_together(
            [(key.block.sql, f"foreign key {key.block.entry.name}") for key in batch], name, beside=beside
        )
    return Task[Lane](
        name,
        sum(key.cost for key in batch),
        run,
        table_locks(*sorted(tables)),
        after=list(after.values()),
    )


def _built_at_once(table: SourceTable) -> bool:
    """Whether `table` is small enough (SMALL_TABLE_BYTES) for its indexes and
    constraints (and statistics) to be built by one task, in one transaction."""
    return table.bytes < SMALL_TABLE_BYTES


def _small_table_builds(
    table: SourceTable, indexes: list[Block], constraints: list[tuple[Block, Owned]], *, analyze: bool
) -> Task[Lane] | None:
    """One task for a small table (`_built_at_once`): each of its indexes, then its
    constraints, then (`analyze`) its ANALYZE, each in a transaction of its own, as the
    tasks they replace ran (`_execute_in_turn`); None when there is nothing to do. Its
    foreign keys come after it, as after any table's builds: they change nothing
    ANALYZE reads."""
    groups = [block.sql for block in indexes]
    if constraints:
        groups.append("\n".join(_constraint_sql(block, owned, table) for block, owned in constraints))
    builds = len(groups)
    if analyze:
        groups.append(f"ANALYZE {quote_name(table.schema)}.{quote_name(table.name)}")
    if not groups:
        return None
    what = {
        (True, True): "indexes, constraints and statistics",
        (True, False): "indexes and constraints",
    }.get((bool(builds), analyze), "statistics")
    cost = TASK_OVERHEAD + ANALYZE_COST * analyze + table.bytes * INDEX_COST["btree"] * builds
    return Task[Lane](
        f"{what} of {table.key}",
        cost,
        _execute_in_turn(groups, f"the {what} of table {table.key}"),
        table_locks(table.oid),
    )


def _execute_in_turn(statements: list[str], what: str) -> Callable[[Lane], None]:
    """Run `statements` one after another on the lane's preview session, each in a
    transaction of its own and one round trip (in autocommit: a string of several
    statements is one implicit transaction), as separate tasks would, but as one.

    Not one transaction for all: an index whose expression calls a function that reads
    another table keeps that table's lock until the transaction ends, and the table's
    own ALTER TABLE … ADD PRIMARY KEY then waits on a lane doing the same the other way
    round (a deadlock); and ANALYZE ignores a statistics target (ALTER INDEX … SET
    STATISTICS) set in its own transaction."""

    def run(lane: Lane) -> None:
        conn = lane.target
        with target_errors(f"creating {what} in the preview"):
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    for statement in statements:
                        _past_deadlocks(functools.partial(cur.execute, statement))
            finally:
                if not conn.closed:
                    conn.autocommit = False

    return run


def _head_alone(planned: _Planned, serial: list[Task[Lane]], lanes: int) -> None:
    """Let the copy at the head of the longest chain run alone (Task.alone) when that
    chain bounds the whole copy: when what the other lanes would do beside it fits
    within the rest of the chain even with a lane idle while the head copies. A large
    table with a trigram index (`mix`'s documents, built by PostgreSQL 15 in one
    process): its rows loaded in 3.5 s beside another table's and in 1.3-1.8 s alone, each
    second of it added to the end of the copy. A copy below ALONE_MIN_BYTES gains less
    than a lane idle costs."""
    if lanes < 2:
        return
    everything = [*serial, *planned.tasks]
    rank(everything)
    copies = list({id(task): task for task in planned.copies.values()}.values())
    if not copies:
        return
    head = max(copies, key=lambda task: task.rank)
    beside = sum(task.cost for task in planned.tasks) - head.rank
    if head.cost >= ALONE_MIN_BYTES and beside <= (head.rank - head.cost) * (lanes - 1):
        head.alone = True


def _schema_tasks(schema: SchemaPlan | None, planned: _Planned) -> list[Task[Lane]]:
    """The slices' tasks, in order, and what waits for which (see SchemaPlan)."""
    if schema is None or not schema.slices:
        return []
    made: list[Task[Lane]] = []
    for number, piece in enumerate(schema.slices, 1):

        def restore(_lane: Lane, piece: SchemaSlice = piece) -> None:
            piece.restore()

        made.append(
            Task[Lane](
                f"schema, slice {number} of {len(schema.slices)} ({piece.entries} entries)",
                TASK_OVERHEAD * (1 + piece.entries),
                restore,
                frozenset(),
                after=made[-1:],
            )
        )
    last = len(made) - 1
    by_copy: dict[int, list[int]] = {}
    for oid, task in planned.copies.items():
        by_copy.setdefault(id(task), []).append(oid)
    built = {id(task) for task in planned.built}
    for task in planned.tasks:
        oids = by_copy.get(id(task))
        if oids is not None:
            task.after.append(made[max(schema.tables.get(oid, last) for oid in oids)])
        elif id(task) in built:
            # After its copy (its `after` says so) and what its entries depend on; an
            # ANALYZE, or a wait for a table's indexes, restores nothing of its own.
            needed = [schema.needs.get(dump_id, last) for dump_id in planned.entries.get(id(task), [])]
            if needed:
                task.after.append(made[max(needed)])
        else:
            task.after.append(made[-1])
    return made


def chain_serial(tasks: list[Task[Lane]]) -> None:
    """Make `tasks`, which run one at a time whatever their order (foreign keys into one
    table: each locks it against the others), a chain, in the order they can start:
    the one whose predecessors are estimated done soonest (`ready_at`) first.

    Then the critical-path ranks see their sum, and the tables they wait on are
    finished one after another, each key starting as soon as its table is ready, while
    the other lanes copy the next tables. Unchained, every task before them outranked
    them: 2,000 small tables were all copied first and their 2,000 keys into one parent
    table ran one by one at the end (issue 11's `many`: 20 s of the copy's 42). Ordered
    by anything but readiness, a key would wait for one whose table is still building
    its trigram index (`mix`: 4 s added to the longest chain).
    """
    ready = ready_at(tasks)
    ordered = sorted(tasks, key=lambda task: (ready[id(task)], task.cost))
    for before, after in itertools.pairwise(ordered):
        after.after.append(before)


def ready_at(tasks: list[Task[Lane]]) -> dict[int, float]:
    """For each of `tasks` (by id), when its predecessors are done if each chain before it
    ran alone: the longest sum of costs of a path of predecessors (a task's "top level")."""
    finish: dict[int, float] = {}  # by task id: its start estimate plus its cost
    for task in tasks:
        stack = [task]
        while stack:  # iterative: long chains must not exhaust the stack
            top = stack[-1]
            pending = [before for before in top.after if id(before) not in finish]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            finish[id(top)] = max((finish[id(before)] for before in top.after), default=0.0) + top.cost
    return {id(task): finish[id(task)] - task.cost for task in tasks}


@contextlib.contextmanager
def flowing(progress: CopyProgress, key: SourceTable | str, *, counted: bool) -> Iterator[Flow]:
    """A flow the reporter and the stall watchdog see while the block runs; `counted`:
    what streamed is added to the copy's rows and bytes done when it ends."""
    flow = Flow()
    with progress.lock:
        progress.flows[key] = flow
    try:
        yield flow
    finally:
        with progress.lock:
            progress.flows.pop(key, None)
            if counted:
                progress.bytes_done += flow.bytes
                progress.rows_done += flow.rows


def table_locks(*oids: int) -> frozenset[str]:
    """What a task locks, for the scheduler: tables by oid ("schema.table" is not unique)."""
    return frozenset(f"table {oid}" for oid in oids)


def _constraint_sql(block: Block, owned: Owned, table: SourceTable) -> str:
    """The constraint's entry as restored: pg_dump's own statement, or, for a key whose
    index was built first (`owned.unique_index`), that index attached to it, then the
    rest of the entry (its comment…). Every name comes from the catalog (the table's,
    the constraint's and its index's), quoted here: none is read back out of the dump's
    SQL, where a name may hold a newline, "ON" or "ADD CONSTRAINT"."""
    if not owned.unique_index:
        return block.sql
    if owned.name is None or owned.index_name is None:
        raise PermanentError(f"the source's catalog does not name the index of constraint {block.entry.name}")
    _statement, rest = first_statement(block.sql)
    kind = "PRIMARY KEY" if owned.primary else "UNIQUE"
    flags = (" DEFERRABLE" if owned.deferrable else "") + (" INITIALLY DEFERRED" if owned.deferred else "")
    return (
        f"ALTER TABLE ONLY {quote_name(table.schema)}.{quote_name(table.name)}\n"
        f"    ADD CONSTRAINT {quote_name(owned.name)} {kind} USING INDEX {quote_name(owned.index_name)}{flags};\n"
        f"{rest}"
    )


# What a build that shares the cores with other tasks runs first (see `_execute`).
NO_PARALLEL_WORKERS = (
    "SET LOCAL max_parallel_maintenance_workers = 0; SET LOCAL max_parallel_workers_per_gather = 0"
)


def _execute(
    statement: str | sql.Composable, what: str, *, beside: CopyProgress | None = None
) -> Callable[[Lane], None]:
    """Run `statement` on the lane's preview session and commit. `beside`: the copy's
    progress, when the statement builds on a table large enough for parallel workers
    (an index, a key, a foreign key's check): if another task runs when it starts, it
    runs without parallel workers (a setting of its own transaction). A parallel build
    beside another task has the cores take turns among more processes than there are
    cores, the longest chain's own build with them."""
    return _execute_together([(statement, what)], what, beside=beside)


def _execute_together(
    statements: list[tuple[str | sql.Composable, str]], what: str, *, beside: CopyProgress | None = None
) -> Callable[[Lane], None]:
    """Run `statements` ((statement, what it creates) pairs) on the lane's preview
    session in one transaction, a round trip each, and commit; as `_execute` (a
    deadlock retries them all), and an error names the statement's own `what` (`what`:
    the commit's)."""

    def attempt(lane: Lane, failing: list[str]) -> None:
        try:
            with lane.target.cursor() as cur:
                settings = NO_PARALLEL_WORKERS if _shares_cores(beside) else None
                for statement, creates in statements:
                    failing[0] = creates
                    cur.execute(statement if settings is None else preceded_by(settings, statement))
                    settings = None
            failing[0] = what
            lane.target.commit()
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                lane.target.rollback()
            raise

    def run(lane: Lane) -> None:
        failing = [what]
        try:
            _past_deadlocks(functools.partial(attempt, lane, failing))
        except BaseException:
            with target_errors(f"creating {failing[0]} in the preview"):
                raise

    return run


def _past_deadlocks(attempt: Callable[[], None]) -> None:
    """Run `attempt` (one statement's transaction, rolled back if it fails); again,
    after a short pause, if the server chose it to break a deadlock (DEADLOCK_RETRIES
    times at most). The other transaction of the deadlock goes on and ends, so the same
    statement then usually passes: two small tables whose exclusion constraints call a
    function reading the other table deadlocked on every attempt of the whole stage,
    and pass when the loser tries again."""
    for retry in range(DEADLOCK_RETRIES + 1):
        try:
            attempt()
            return
        except psycopg2.errors.DeadlockDetected:
            if retry == DEADLOCK_RETRIES:
                raise
            log.info("a build in the preview was chosen to break a deadlock; trying it again")
            time.sleep(DEADLOCK_PAUSE_SECONDS * (retry + 1))


def _parallel(progress: CopyProgress, *sizes: int) -> CopyProgress | None:
    """`beside` for a build on tables of `sizes` bytes: none for tables too small to get
    parallel workers (PARALLEL_MIN_BYTES)."""
    return progress if max(sizes) >= PARALLEL_MIN_BYTES else None


def _shares_cores(progress: CopyProgress | None) -> bool:
    if progress is None:
        return False
    with progress.lock:
        return progress.running > 1


def _analyze(table: SourceTable) -> Callable[[Lane], None]:
    return _execute(
        sql.SQL("ANALYZE {}").format(quoted(table.schema, table.name)), f"statistics of table {table.key}"
    )


# The preview's partitioned tables (their leaves are copied and analyzed as tables).
_PARTITIONED = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE c.relkind OPERATOR(pg_catalog.=) 'p'
  AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema'])
  AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_depend d
      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
        AND d.objid OPERATOR(pg_catalog.=) c.oid AND d.deptype OPERATOR(pg_catalog.=) 'e')
  AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_partition_tree(c.oid) t
      JOIN pg_catalog.pg_class f ON f.oid OPERATOR(pg_catalog.=) t.relid
      WHERE f.relkind OPERATOR(pg_catalog.=) 'f')
ORDER BY 1, 2
"""


def _analyze_partitioned(lane: Lane) -> None:
    """ANALYZE every partitioned table of the preview, once its partitions are in: its
    statistics over the whole tree (what the planner reads for a query on the root)
    are its own, and no ANALYZE of a leaf makes them (autovacuum does not either).
    Not a tree with a foreign table in it: its ANALYZE would read the foreign server
    (from the project's cluster, through a user mapping an import never brings)."""
    with target_errors("reading the partitioned tables of the preview"), lane.target.cursor() as cur:
        cur.execute(_PARTITIONED)
        names = [f"{quote_name(schema)}.{quote_name(name)}" for schema, name in cur.fetchall()]
    lane.target.commit()
    if names:
        # One statement; in autocommit each table is analyzed in a transaction of its own.
        _execute_in_turn([f"ANALYZE {', '.join(names)}"], "the statistics of the partitioned tables")(lane)


def _what(flowing: object) -> str:
    """What a flow copies, in a message: "table public.t", or "the large objects"."""
    return f"table {flowing.key}" if isinstance(flowing, SourceTable) else str(flowing)


def _report(
    progress: CopyProgress,
    stop: threading.Event,
    on_progress: Progress,
    interrupt: Callable[[BaseException], None],
    stall_seconds: float,
    on_end: Callable[[], None],
) -> None:
    """Every PROGRESS_SECONDS: report the step, tables and bytes done of total, rows
    per second and an ETA (from the work done so far, in cost units); stop the copy when
    a table's rows stop coming for `stall_seconds`."""
    try:
        _report_until_stopped(progress, stop, on_progress, interrupt, stall_seconds)
    finally:
        on_end()


def _report_until_stopped(
    progress: CopyProgress,
    stop: threading.Event,
    on_progress: Progress,
    interrupt: Callable[[BaseException], None],
    stall_seconds: float,
) -> None:
    while not stop.wait(PROGRESS_SECONDS):
        now = time.monotonic()
        with progress.lock:
            flows = list(progress.flows.items())
            streaming = sum(flow.bytes for _key, flow in flows)
            rows = progress.rows_done + sum(flow.rows for _key, flow in flows)
            done_cost = progress.cost_done + streaming
            report: dict[str, Any] = {
                "step": progress.step,
                "phase": progress.phase,
                "tables_done": progress.tables_done,
                "tables_total": progress.tables_total,
                "bytes_done": min(progress.bytes_done + streaming, progress.bytes_total),
                "bytes_total": progress.bytes_total,
                "rows_done": rows,
            }
        for table, flow in flows:
            if now - flow.last > stall_seconds:
                interrupt(
                    CopyStalled(
                        f"the copy of {_what(table)} made no progress for {stall_seconds:g} s "
                        "(CAPY_COMMAND_STALL_SECONDS): its rows stopped coming from the source, which may be "
                        "locked or overloaded; the import is retried"
                    )
                )
                return
        elapsed = max(now - progress.started, 0.001)
        rate = done_cost / elapsed
        report["rows_per_second"] = round(rows / elapsed)
        report["eta_seconds"] = max(0, round((progress.cost_total - done_cost) / rate)) if rate > 0 else None
        try:
            on_progress(report)
        except BaseException as err:  # noqa: BLE001 - a lost claim or a cancel stops the copy
            interrupt(err)
            return
