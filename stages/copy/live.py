"""A live source's side of the copy (stages.copy.engine): one exported snapshot, read
by a session per lane.

`Snapshot.open` starts a repeatable-read, read-only session on the source that exports
its snapshot, reads what to copy (stages.copy.catalog), locks those tables (ACCESS
SHARE) and describes the source; it stays open until the copy ends.
`Snapshot.dump_schema` has `pg_dump --snapshot` write the schema archive: everything
but the copied tables' rows and the large objects. During the copy each lane opens a
source session in the same snapshot on first use and streams `COPY … TO STDOUT` from it
(stages.copy.stream); the large objects stream too (stages.copy.largeobjects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from stages.connections.connect import connect, major_of
from stages.connections.deadline import Deadline as SourceDeadline
from stages.connections.pgurl import SourceURL, redact
from stages.connections.rows import one_row
from stages.copy import engine
from stages.copy.catalog import Owned, SourceCatalog, lock_tables, read_catalog, read_tables
from stages.copy.engine import (
    LARGE_OBJECTS,
    TASK_OVERHEAD,
    CopyProgress,
    Lane,
    Record,
    flowing,
    table_locks,
    target_errors,
)
from stages.copy.largeobjects import copy_large_objects
from stages.copy.scheduler import Task
from stages.copy.stream import (
    Copied,
    CountMismatch,
    Flow,
    SourceTable,
    copy_out_text,
    quote_name,
    stream_from_command,
    stream_table,
)
from stages.database import inventory
from stages.dumps.toc import TocEntry
from stages.errors import CommandFailed, PermanentError, SourceUnreachable, TransientError
from stages.tools.commands import Cancellation, PgCommand, PgTools


class SourceBusy(TransientError):
    """A table on the source stayed locked by another session past the lock timeout."""


class SnapshotLost(SourceUnreachable):
    """The session holding the source's exported snapshot ended before a lane joined it."""


SNAPSHOT_LOST = (
    "lost the source's snapshot: the session that holds it ended (the source closed it, "
    "or restarted) before every table was read; the import is retried"
)
# What every session that reads rows for the copy sets, once in the snapshot. COPY prints
# values as the session's settings say, which the source's database or role may change:
# as pg_dump, print them so the preview reads back exactly the same (extra_float_digits
# -3 drops float digits); money in the C locale's format, which the preview's COPY reads
# it in (stages.copy.stream.READ_AS_PRINTED: '1.234,56 €' from a de_DE source is not
# money in the C locale, and a locale without decimals could be read back as another
# amount). No timeout ends it idle in its transaction (while its lane builds indexes),
# and no one's search_path reaches it.
COPY_SESSION_SETTINGS = (
    "SET row_security = off; SET DateStyle = ISO; SET IntervalStyle = postgres; "
    "SET extra_float_digits = 3; SET lc_monetary = 'C'; SET statement_timeout = 0; "
    "SET idle_in_transaction_session_timeout = 0; SET search_path = pg_catalog, pg_temp"
)
# What the schema dump's session sets (PGOPTIONS): money constants (a default, a CHECK)
# printed in the C locale's format, as the rows are.
SCHEMA_DUMP_OPTIONS = "-c lc_monetary=C"
# A table of this size or more streams through psql (see _LiveLoading._copy_by_command):
# starting it and joining the snapshot cost a few hundredths of a second, and the rows
# then cost the worker a fraction of what one Python call per row does.
COMMAND_MIN_BYTES = 64 << 20
# Tables whose types allow it are copied in COPY's binary format (see _LiveLoading._format):
# measured on mix's events (5 million rows), COPY TO took 2.3 s instead of 4.8 on the
# source and COPY FROM 4.6 s instead of 8.0 on the preview.
BINARY_COPY = True
# ...except a table that psql carries (COMMAND_MIN_BYTES or more) whose rows are shorter
# than this on average (its size on disk over the source's estimate of its rows): binary
# rows cross this process with a Python call each, and short rows' text costs the servers
# little, so psql's text is the cheaper way. Measured on narrow (see bench/README.md).
SHORT_ROW_BYTES = 100


@dataclass(frozen=True)
class SourceSettings:
    connect_timeout: int = 10
    read_timeout: float = 1800
    lock_timeout: float = 60
    stall_seconds: float = 300


@dataclass
class Snapshot:
    """The source's exported snapshot and the session that holds it (with its locks)."""

    source: SourceURL
    conn: psycopg2.extensions.connection
    snapshot_id: str
    server_version: str
    catalog: SourceCatalog
    description: dict[str, Any]
    # The rows pg_dump dumps of the extensions' configuration tables (restored from the
    # schema archive, not streamed), counted in the snapshot as it selects them.
    configuration_counts: dict[str, int]
    settings: SourceSettings
    tools: PgTools | None = None  # psql streams the large tables' rows (see _LiveLoading)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        source: SourceURL,
        settings: SourceSettings,
        cancellation: Cancellation | None = None,
        *,
        tools: PgTools | None = None,
    ) -> Iterator[Snapshot]:
        with _session(source, settings, cancellation) as conn:
            with _source_errors(source, settings):
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pg_catalog.pg_export_snapshot(), pg_catalog.current_setting('server_version')"
                    )
                    snapshot_id, server_version = one_row(cur)
                # The engine's own threshold (read at call time): a table below it gets no
                # key definitions, and the engine builds its keys with the dump's ALTER TABLE.
                catalog = read_catalog(conn, key_definitions_from=engine.SEPARATE_KEY_MIN_BYTES)
                lock_tables(conn, catalog.tables)
                description = inventory.describe(conn)
                configuration = _configuration_counts(conn)
            yield cls(
                source,
                conn,
                snapshot_id,
                server_version,
                catalog,
                description,
                configuration,
                settings,
                tools,
            )

    @property
    def stall_seconds(self) -> float:
        return self.settings.stall_seconds

    def tables_in(self, kept: list[TocEntry]) -> list[SourceTable]:
        restored = {e.catalog_id[1] for e in kept if e.desc == "TABLE"}
        return [t for t in self.catalog.tables if t.oid in restored]

    def owner_of(self, entry: TocEntry) -> Owned | None:
        return self.catalog.owned.get(entry.catalog_id)

    @contextlib.contextmanager
    def loading(self) -> Iterator[_LiveLoading]:
        yield _LiveLoading(self)

    def schemas_copied_whole(self, copied: Sequence[SourceTable]) -> set[str]:
        """The schemas of `copied` whose every relation with data pg_dump would dump is
        among them: no sequence (its value), materialized view (its refresh) or table
        left out of the copy (an extension's) whose data the archive must keep."""
        oids = {t.oid for t in copied}
        schemas = {t.schema for t in copied}
        with _source_errors(self.source, self.settings), self.conn.cursor() as cur:
            cur.execute(
                "SELECT n.nspname, c.oid, c.relkind FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
                "WHERE n.nspname OPERATOR(pg_catalog.=) ANY(%s) "
                "AND c.relkind OPERATOR(pg_catalog.=) ANY(ARRAY['r', 'S', 'm']::\"char\"[])",
                (sorted(schemas),),
            )
            for schema, oid, relkind in cur.fetchall():
                if relkind != "r" or oid not in oids:
                    schemas.discard(schema)
        return schemas

    def dump_schema(self, tools: PgTools, path: str, copied: Sequence[SourceTable]) -> None:
        """The schema archive (custom format): everything of the snapshot but the rows
        of `copied`, which stream instead. Materialized views keep their data entries
        (refreshed on the target) and the sequences their values."""
        args = tools.pg_dump.schema_args(
            self.source.conninfo(connect_timeout=str(self.settings.connect_timeout)),
            path,
            snapshot=self.snapshot_id,
            lock_wait_ms=int(self.settings.lock_timeout * 1000),
            exclude_data=exclusion_patterns(copied, self.schemas_copied_whole(copied)),
        )
        tools.pg_dump.run(
            args,
            env={**self.source.env(), "PGOPTIONS": SCHEMA_DUMP_OPTIONS},
            secrets=[self.source.password],
            what="pg_dump of the source's schema",
        )


@dataclass(frozen=True)
class SourceSize:
    """What a copy of the source would move, estimated: its server version and tables."""

    server_version: str
    tables: list[SourceTable]


def size_up(
    source: SourceURL, settings: SourceSettings, cancellation: Cancellation | None = None
) -> SourceSize:
    """The source's server version and the tables a copy would move, as one read-only
    transaction sees them: no snapshot is exported and no table locked (the fetch
    stage's estimate; the restore stage copies from a snapshot of its own)."""
    with _session(source, settings, cancellation) as conn, _source_errors(source, settings):
        with conn.cursor() as cur:
            cur.execute("SELECT pg_catalog.current_setting('server_version')")
            (server_version,) = one_row(cur)
        return SourceSize(server_version, read_tables(conn))


@contextlib.contextmanager
def _session(
    source: SourceURL, settings: SourceSettings, cancellation: Cancellation | None
) -> Iterator[psycopg2.extensions.connection]:
    """A repeatable-read, read-only session on the source, search_path pinned to
    pg_catalog, every read bounded by the source read timeout, ended by a cancel."""
    deadline = SourceDeadline(
        per_read=settings.read_timeout, what="the source read timeout, CAPY_SOURCE_READ_TIMEOUT_SECONDS"
    )
    conn = connect(source, timeout=settings.connect_timeout, deadline=deadline, client_encoding="UTF8")
    unsubscribe = cancellation.on_cancel(deadline.cancel) if cancellation is not None else (lambda: None)
    try:
        with _source_errors(source, settings):
            conn.set_session(
                isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True
            )
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (int(settings.read_timeout * 1000),))
                cur.execute("SET lock_timeout = %s", (int(settings.lock_timeout * 1000),))
                # A snapshot's session holds it, idle in its transaction, until the copy
                # ends: a source's own idle timeout must not end it (pg_dump does the same).
                cur.execute("SET idle_in_transaction_session_timeout = 0")
                cur.execute("SET search_path = pg_catalog, pg_temp")
        yield conn
    finally:
        unsubscribe()
        with contextlib.suppress(psycopg2.Error):
            conn.close()


def _shown(name: str) -> str:
    """A name as pg_dump prints it in a statement: quoted unless it is plainly lower case."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else quote_name(name)


# How many tables one exclusion pattern names, and how long it may grow. One pattern
# per table made a command line of one argument per table, past the kernel's limit
# (ARG_MAX) for a schema of some tens of thousands; a single argument may not exceed
# 128 kB. (pg_dump looks each pattern up with a query of its own; a pattern of 500
# names costs about as much to match as 500 lookups: 1.45 s either way on `many`.)
PATTERN_TABLES = 500
PATTERN_CHARS = 16_000


def exclusion_patterns(tables: Sequence[SourceTable], whole: Collection[str] = ()) -> list[str]:
    """pg_dump patterns (`--exclude-table-data`) naming exactly `tables`, one per schema
    and chunk: `"schema".("a"|"b")`. Every name is quoted, so nothing in it is a wildcard
    or a regular expression (pg_dump escapes `|*+?()[]{}.^$\\` inside quotes); only the
    alternation around the quoted names is one, and pg_dump anchors it at both ends.

    A schema of `whole`, none of whose relations' data the archive must keep (see
    `Snapshot.schemas_copied_whole`), is one pattern, `"schema".*`: pg_dump matches a
    pattern against every relation with a query of its own, and a long alternation
    costs it a tenth of a second or more each (0.7 s on 2,000 tables)."""
    by_schema: dict[str, list[str]] = {}
    for table in tables:
        by_schema.setdefault(table.schema, []).append(quote_name(table.name))
    patterns: list[str] = []
    for schema, names in by_schema.items():
        if schema in whole:
            patterns.append(quote_name(schema) + ".*")
            continue
        prefix = quote_name(schema) + "."
        chunk: list[str] = []
        size = 0
        for name in names:
            if chunk and (len(chunk) >= PATTERN_TABLES or size + len(name) + 1 > PATTERN_CHARS):
                patterns.append(prefix + "(" + "|".join(chunk) + ")")
                chunk, size = [], 0
            chunk.append(name)
            size += len(name) + 1
        if chunk:
            patterns.append(prefix + "(" + "|".join(chunk) + ")")
    return patterns


def _configuration_counts(conn: psycopg2.extensions.connection) -> dict[str, int]:
    """The rows pg_dump dumps of each of the source's extensions' configuration tables
    (`inventory.count_configuration`). A condition of the source's extension that
    cannot be counted fails the import saying which."""
    counts: dict[str, int] = {}
    for relation in inventory.extension_configuration(conn):
        try:
            counts.update(inventory.count_configuration(conn, [relation]))
        except (psycopg2.ProgrammingError, psycopg2.DataError) as err:
            if isinstance(err, psycopg2.errors.InsufficientPrivilege):
                raise  # the user's privileges (see _source_errors)
            raise PermanentError(
                f"could not count the rows of the extension configuration table {relation.key} that pg_dump "
                f"dumps (those matching its extension's condition {relation.condition!r}): "
                f"{str(err).splitlines()[0]}; check the extension on the source (pg_extension.extcondition)"
            ) from err
    return counts


@contextlib.contextmanager
def _source_errors(
    source: SourceURL, settings: SourceSettings, statement: str | None = None
) -> Iterator[None]:
    """Source errors in the user's terms; `statement` is what was running (named when
    row-level security refuses it)."""
    try:
        yield
    except psycopg2.errors.InsufficientPrivilege as err:
        first = str(err).splitlines()[0]
        if "row-level security" in first:
            raise PermanentError(
                f"{first}: the source user {source.user!r} cannot read every row; connect as the table's "
                "owner or a role with BYPASSRLS" + (f"; the statement was: {statement}" if statement else "")
            ) from err
        raise PermanentError(
            f"the source user {source.user!r} cannot read every table "
            f"({str(err).splitlines()[0]}); grant it SELECT on all tables, or use the "
            "database owner's credentials"
        ) from err
    except psycopg2.errors.LockNotAvailable as err:
        raise SourceBusy(
            f"a table on the source is locked by another session (an open transaction holding an "
            f"exclusive lock, a schema change, a VACUUM FULL) and stayed locked for {settings.lock_timeout:g} s; "
            "the import is retried, and succeeds once the lock is released"
        ) from err
    except psycopg2.OperationalError as err:
        raise SourceUnreachable(
            f"lost the connection to the source while reading it: {redact(str(err), source.password).strip()}"
        ) from err


class _LiveLoading:
    """The lanes' source sessions, all in the snapshot and under one deadline:
    cancelling it shuts their sockets (stages.connections.deadline). Never psycopg2's
    cancel() on a source: it holds the GIL through its round trip to the source
    (connect, send, wait for the close), so a source that stops answering would freeze
    every thread of the worker."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.deadline = SourceDeadline(
            per_read=snapshot.settings.read_timeout,
            what="the source read timeout, CAPY_SOURCE_READ_TIMEOUT_SECONDS",
        )
        self._commands: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._interrupted = False
        self._source_format = _binary_format(snapshot.conn)

    def interrupt(self) -> None:
        self.deadline.cancel()
        with self._lock:
            self._interrupted = True
            for process in self._commands:
                PgCommand.kill(process)

    def _started(self, process: subprocess.Popen[bytes]) -> None:
        """A psql of a lane is running: an interrupt, even one that came first, stops it."""
        with self._lock:
            self._commands.add(process)
            if self._interrupted:
                PgCommand.kill(process)

    def close_lane(self, lane: Lane) -> None:
        if lane.source is not None:
            with contextlib.suppress(psycopg2.Error):
                lane.source.close()

    def session(self, lane: Lane) -> psycopg2.extensions.connection:
        """The lane's source session in the snapshot, opened on first use."""
        if lane.source is None:
            lane.source = self._open()
        return lane.source

    def _open(self) -> psycopg2.extensions.connection:
        snapshot, settings = self.snapshot, self.snapshot.settings
        conn = connect(
            snapshot.source, timeout=settings.connect_timeout, deadline=self.deadline, client_encoding="UTF8"
        )
        try:
            with _source_errors(snapshot.source, settings), conn.cursor() as cur:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot.snapshot_id,))
                except psycopg2.errors.InvalidParameterValue as err:
                    raise SnapshotLost(SNAPSHOT_LOST) from err
                cur.execute(COPY_SESSION_SETTINGS)
        except BaseException:
            conn.close()  # e.g. opened as the copy was stopped: its deadline is cancelled
            raise
        return conn

    def data_tasks(
        self, tables: list[SourceTable], progress: CopyProgress, record: Record
    ) -> tuple[dict[int, Task[Lane]], list[Task[Lane]]]:
        copies = {
            table.oid: Task[Lane](
                f"copy {table.key}",
                TASK_OVERHEAD + table.bytes,
                self._copy(table, progress, record),
                table_locks(table.oid),
            )
            for table in tables
        }
        extra: list[Task[Lane]] = []
        objects = int(self.snapshot.description.get("objects", {}).get("large_objects", 0) or 0)
        if objects:
            extra.append(
                Task[Lane](
                    "large objects",
                    TASK_OVERHEAD * (1 + objects),
                    self._large_objects(progress),
                    frozenset({"<large objects>"}),
                )
            )
        return copies, extra

    def _copy(self, listed: SourceTable, progress: CopyProgress, record: Record) -> Callable[[Lane], None]:
        def run(lane: Lane) -> None:
            with flowing(progress, listed, counted=True) as flow:
                tools = self.snapshot.tools
                table = self._format(listed, lane, psql=tools is not None)
                if tools is not None and table.bytes >= COMMAND_MIN_BYTES and not table.binary:
                    copied = self._copy_by_command(tools, table, lane, flow)
                    record(listed, copied.source_rows, copied.target_rows)
                    return
                source = self.session(lane)
                statement = f"COPY {_shown(table.schema)}.{_shown(table.name)}"
                with _either_side(
                    self.snapshot,
                    source,
                    f"loading the rows of table {table.key} into the preview",
                    statement,
                ):
                    copied = stream_table(table, source, lane.target, flow)
            record(listed, copied.source_rows, copied.target_rows)

        return run

    def _format(self, table: SourceTable, lane: Lane, *, psql: bool) -> SourceTable:
        """`table` as it is copied into the lane's preview session: in COPY's binary format
        only if its types allow it (SourceTable.binary) and both servers have the same
        major version (a type's binary format is only promised within one) and the same
        encoding (a "char" value travels as its raw byte); in the text format otherwise,
        as pg_dump copies, and when `psql` can carry a large table of short rows
        (SHORT_ROW_BYTES) whose values all read back from their text (not
        SourceTable.keeps_binary). Binary rows stream through this process (psycopg2), whose
        `COPY n` counts them: psql's rows are counted by their newlines."""
        if not table.binary:
            return table
        if not BINARY_COPY or _binary_format(lane.target) != self._source_format:
            return dataclasses.replace(table, binary=False)
        per_row = table.bytes_per_row
        short = per_row is not None and per_row < SHORT_ROW_BYTES
        if psql and table.bytes >= COMMAND_MIN_BYTES and short and not table.keeps_binary:
            return dataclasses.replace(table, binary=False)
        return table

    def _copy_by_command(self, tools: PgTools, table: SourceTable, lane: Lane, flow: Flow) -> Copied:
        """A large table's rows, written by psql in a session of the snapshot of its
        own (stages.copy.stream.stream_from_command)."""
        snapshot, settings = self.snapshot, self.snapshot.settings
        command = tools.source_psql
        statements = [
            # Before BEGIN: between psql's statements the session is idle in its transaction.
            "SET idle_in_transaction_session_timeout = 0",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            f"SET TRANSACTION SNAPSHOT '{snapshot.snapshot_id}'",
            COPY_SESSION_SETTINGS,
            copy_out_text(table),
        ]
        args = command.copy_out_args(
            snapshot.source.conninfo(connect_timeout=str(settings.connect_timeout)), statements
        )
        what = f"reading the rows of table {table.key} from the source"

        def run_source(consume: Callable[[IO[bytes]], None]) -> object:
            try:
                return command.run_streaming(
                    args,
                    consume,
                    env={**snapshot.source.env(), "PGCLIENTENCODING": "UTF8"},
                    secrets=[snapshot.source.password],
                    what=what,
                    started=self._started,
                )
            except CommandFailed as err:
                if "invalid snapshot identifier" in (err.stderr_tail or ""):
                    raise SnapshotLost(SNAPSHOT_LOST) from err
                raise

        try:
            # The source's errors are the command's (CommandFailed); psycopg2's are the preview's.
            with target_errors(f"loading the rows of table {table.key} into the preview"):
                return stream_from_command(table, run_source, lane.target, flow)
        finally:
            with self._lock:
                self._commands = {p for p in self._commands if p.poll() is None}

    def _large_objects(self, progress: CopyProgress) -> Callable[[Lane], None]:
        def run(lane: Lane) -> None:
            with flowing(progress, LARGE_OBJECTS, counted=False) as flow:
                source = self.session(lane)
                with _either_side(self.snapshot, source, "copying the large objects into the preview"):
                    copy_large_objects(source, lane.target, flow)

        return run


def _binary_format(conn: psycopg2.extensions.connection) -> tuple[int, str | None]:
    """What two servers must share for binary COPY between them: the major version and
    the database's encoding."""
    return major_of(conn.server_version), conn.get_parameter_status("server_encoding")


@contextlib.contextmanager
def _either_side(
    snapshot: Snapshot, source: psycopg2.extensions.connection, target_what: str, statement: str | None = None
) -> Iterator[None]:
    """A stream's error in the terms of the side it came from: the source's (see
    `_source_errors`), or the preview's (`target_what` failed)."""
    with _source_errors(snapshot.source, snapshot.settings, statement):
        try:
            yield
        except (psycopg2.Error, CountMismatch) as err:
            if isinstance(err, psycopg2.Error) and _from_source(err, source):
                raise
            with target_errors(target_what):
                raise


def _from_source(err: psycopg2.Error, source: psycopg2.extensions.connection) -> bool:
    cursor = getattr(err, "cursor", None)
    return cursor is not None and cursor.connection is source
