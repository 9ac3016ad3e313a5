"""One table's rows, from the source's snapshot into the preview, without a file.

`COPY … TO STDOUT` on the source writes each row into a pipe; `COPY … FROM STDIN` on the
preview reads the pipe in large chunks. Nothing is compressed and nothing lands on disk;
the pipe and one write buffer are all the memory a stream holds. The preview's side runs
in the table's own transaction, after `TRUNCATE`, with `FREEZE` (tables of
FREEZE_MIN_BYTES or more; smaller ones after `DELETE`, without): the rows are written
frozen, so the first VACUUM has nothing to do; a failed copy leaves the table empty.

A small table (MEMORY_MAX_BYTES on the source) is read whole into memory first, then
loaded: no pipe and no thread, for a table of a hundred rows half the worker's CPU. Its
rows may be far larger than the source's estimate (compressed TOAST): past
MEMORY_LIMIT_BYTES the rest of that read is dropped as it comes, and the table then
streams through the pipe.

Both sides' row counts come back (`COPY n`): they are the same snapshot's rows, so the
source count is exact without a separate `count(*)`, and a difference is an error.
A table whose types allow it (`SourceTable.binary`) travels in COPY's binary format.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from stages.errors import PermanentError
from stages.tools.commands import widen_pipe

# A table smaller than this is emptied by DELETE and loaded by a plain COPY, not TRUNCATE
# and COPY FREEZE. COPY FREEZE needs the table truncated in its own transaction, and
# TRUNCATE makes the table's files anew: measured here, 6 ms against 0.6 ms to load 100
# rows, and 2,000 small tables paid it 2,000 times. What FREEZE saves (the first VACUUM's
# pass over the table's pages) is nothing at that size. Either way the table holds
# exactly the rows loaded (whatever an archive's schema put there first), and a failed
# load leaves it as it was (the transaction is rolled back).
FREEZE_MIN_BYTES = 8 << 20
WRITE_BUFFER = 1 << 18
# A table estimated below this (heap and TOAST on the source, `SourceTable.bytes`) is
# read into memory, then loaded (see the module docstring): 1.7 -> 1.3 ms and 0.9 -> 0.4
# ms of the worker's CPU a table of 100 rows, measured here.
MEMORY_MAX_BYTES = 1 << 20
# What such a read may hold: past it, the table streams through the pipe instead.
MEMORY_LIMIT_BYTES = 8 << 20
READ_CHUNK = 1 << 17


def emptying(table: sql.Composable, *, frozen: bool) -> sql.Composable:
    """The statement that empties `table` before a load: TRUNCATE for a frozen load
    (COPY FREEZE needs it), DELETE otherwise (see FREEZE_MIN_BYTES)."""
    return sql.SQL("TRUNCATE ONLY {}" if frozen else "DELETE FROM ONLY {}").format(table)


# What the preview's side of a copy from a live source runs first in the table's
# transaction: money read in the C locale's format, as the source's COPY prints it
# (stages.copy.live.COPY_SESSION_SETTINGS). Only there: the lane's session keeps the
# preview's own locale for what it builds and refreshes afterwards.
READ_AS_PRINTED = "SET LOCAL lc_monetary = 'C'"


def preceded_by(settings: str, statement: str | sql.Composable) -> str | sql.Composable:
    """`statement` after `settings` (SET LOCAL …), sent in the same round trip."""
    if isinstance(statement, str):
        return f"{settings};\n{statement}"
    return sql.SQL(settings + ";\n") + statement


def _emptying(table: SourceTable) -> str | sql.Composable:
    """READ_AS_PRINTED, then what empties `table` before its rows load."""
    return preceded_by(READ_AS_PRINTED, table.emptying())


def quote_name(name: str) -> str:
    """A name in double quotes, its own doubled: as SQL, and as a pg_dump pattern."""
    return '"{}"'.format(name.replace('"', '""'))


def quoted(*names: str) -> sql.Composable:
    """A (qualified) name, quoted. Not sql.Identifier: psycopg2 quotes that in UTF-8
    whatever the session's client_encoding, which breaks names outside ASCII in a
    LATIN1 session (an archive of a LATIN1 database is loaded in LATIN1)."""
    return sql.SQL(".".join(quote_name(name) for name in names))


@dataclass(frozen=True)
class SourceTable:
    """A table whose rows are copied: `key` is "schema.table" (the report's name),
    `columns` the stored columns in order (generated and dropped ones left out),
    `bytes` its size on the source (heap and TOAST), an estimate of what streams;
    `oid` its pg_class oid on the source (how the schema archive's TOC names it);
    `binary`: its rows may move in COPY's binary format (every column's type is one of
    PostgreSQL's own with binary I/O, stages.copy.catalog), which costs both servers
    about half the CPU of the text format, and is only used between two servers of the
    same major version and encoding (stages.copy.live); `rows`, the source's estimate of
    its rows (pg_class.reltuples, 0 when unknown), tells a table of short rows
    (`bytes_per_row`); `keeps_binary`: some value of its types prints as text PostgreSQL
    cannot read back (an interval whose time part is the smallest, INT64_MIN microseconds,
    in PostgreSQL 15), so a binary table stays binary whatever its rows."""

    key: str
    schema: str
    name: str
    columns: tuple[str, ...]
    bytes: int
    oid: int = 0
    binary: bool = False
    rows: int = 0
    keeps_binary: bool = False

    @property
    def bytes_per_row(self) -> float | None:
        """Its size on disk over its estimated rows; None when the source has no estimate."""
        return self.bytes / self.rows if self.rows > 0 else None

    def column_list(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)

    def copy_out(self) -> sql.Composable:
        binary = sql.SQL(" (FORMAT binary)" if self.binary else "")
        if not self.columns:
            return sql.SQL("COPY {} TO STDOUT{}").format(sql.Identifier(self.schema, self.name), binary)
        return sql.SQL("COPY {} ({}) TO STDOUT{}").format(
            sql.Identifier(self.schema, self.name), self.column_list(), binary
        )

    @property
    def frozen(self) -> bool:
        """Whether its rows are loaded frozen (TRUNCATE, then COPY FREEZE): tables of
        FREEZE_MIN_BYTES or more."""
        return self.bytes >= FREEZE_MIN_BYTES

    def emptying(self) -> sql.Composable:
        """What empties it before its rows are loaded (see FREEZE_MIN_BYTES)."""
        return emptying(quoted(self.schema, self.name), frozen=self.frozen)

    def copy_in(self) -> sql.Composable:
        chosen = [*(["FORMAT binary"] if self.binary else []), *(["FREEZE"] if self.frozen else [])]
        options = sql.SQL(f" WITH ({', '.join(chosen)})" if chosen else "")
        if not self.columns:
            return sql.SQL("COPY {} FROM STDIN{}").format(sql.Identifier(self.schema, self.name), options)
        return sql.SQL("COPY {} ({}) FROM STDIN{}").format(
            sql.Identifier(self.schema, self.name), self.column_list(), options
        )


def copy_out_text(table: SourceTable) -> str:
    """`table.copy_out()` as text, for a session that is not psycopg2's (psql's), in
    COPY's text format (whose rows are counted by their newlines)."""
    columns = f"({', '.join(quote_name(c) for c in table.columns)}) " if table.columns else ""
    return f"COPY {quote_name(table.schema)}.{quote_name(table.name)} {columns}TO STDOUT"


class Flow:
    """What has streamed so far (rows, bytes) and when the last row came: read by the
    progress reporter and the stall watchdog from other threads (plain ints: a reader
    may see a value one row old, never a torn one)."""

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0
        self.last = time.monotonic()

    def passed(self, data: bytes, rows: int) -> None:
        """`data`, holding `rows` rows, has just streamed."""
        self.rows += rows
        self.bytes += len(data)
        self.last = time.monotonic()


class _Sink:
    """Where psycopg2 writes the source's rows: the pipe's buffered writer itself (psycopg2
    calls `write` once per row; a method of ours there would cost a Python call per row).
    What streams is measured where the preview's side reads it, in large chunks; rows in
    the binary format have no newline to count there, so each write is counted here, for
    the progress only (`rows`: a Python call per row, 0.2 s of the worker's CPU per 5
    million rows; the exact count is the COPY's own). The format's trailer is a write of
    its own: the first write is not counted, so the count never runs ahead of the rows."""

    def __init__(self, fd: int, rows: Flow | None = None) -> None:
        self._out = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        self.write: Callable[[bytes], int]
        if rows is None:
            self.write = self._out.write
            return
        write = self._out.write
        uncounted = [True]

        def counted(data: bytes) -> int:
            if uncounted:
                uncounted.clear()
            else:
                rows.rows += 1
            return write(data)

        self.write = counted

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()


class UpstreamFailed(Exception):
    """The source side of a stream failed: the preview's COPY is aborted, not ended."""


class _Tap:
    """What psycopg2 reads the preview's rows from: the pipe, until the source side has
    finished; an end of the pipe without a finished source aborts the COPY."""

    def __init__(
        self,
        fd: int,
        finished: threading.Event,
        failed: list[BaseException],
        flow: Flow,
        *,
        text: bool = True,
    ) -> None:
        self._fd = fd
        self._finished = finished
        self._failed = failed
        self._flow = flow
        self._text = text

    def read(self, size: int = READ_CHUNK) -> bytes:
        data = os.read(self._fd, max(size, READ_CHUNK))
        if data:
            # A row's own newlines are escaped (\n) in COPY text; binary rows are counted by the _Sink.
            self._flow.passed(data, data.count(b"\n") if self._text else 0)
        else:
            self._finished.wait()
            if self._failed:
                raise UpstreamFailed("the source side of the copy failed")
        return data


class _Counted:
    """What psycopg2 reads the preview's rows from when a command writes them: its
    output, in large chunks, counted as it passes (see `stream_from_command`)."""

    def __init__(self, stream: IO[bytes], flow: Flow) -> None:
        self._stream = stream
        self._flow = flow

    def read(self, size: int = READ_CHUNK) -> bytes:
        data = self._stream.read(max(size, READ_CHUNK))
        if data:
            self._flow.passed(data, data.count(b"\n"))
        return data


@dataclass(frozen=True)
class Copied:
    source_rows: int
    target_rows: int
    bytes: int


class CountMismatch(PermanentError):
    """The preview received a different number of rows than the source sent: the copy
    is not the source (something in the preview dropped or added rows as they loaded),
    and another attempt would load them the same way."""


def _committed(
    table: SourceTable, target: psycopg2.extensions.connection, source_rows: int, target_rows: int, flow: Flow
) -> Copied:
    """Commit the preview's side once both sides' counts agree (CountMismatch otherwise)."""
    if source_rows != target_rows:
        raise CountMismatch(
            f"the source sent {source_rows} rows of table {table.key} and the preview received {target_rows}: "
            "the copy would not be the source, so nothing is swapped in"
        )
    if table.binary:
        flow.rows = source_rows  # (counted by writes on the way, for the progress only)
    target.commit()
    return Copied(source_rows, target_rows, flow.bytes)


@contextlib.contextmanager
def _rolled_back_on_failure(target: psycopg2.extensions.connection) -> Iterator[None]:
    """The preview's transaction rolled back if the block fails (the table is left as
    it was), whatever failed; the failure is raised as it was."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            target.rollback()
        raise


class _Held:
    """Where psycopg2 writes a small table's rows (a call per row): kept in memory, up
    to `limit` bytes; past it, the rest of the COPY is still read to its end, and
    dropped (`parts` None). Reading it to the end here, not leaving it to libpq, keeps
    what the source says after that point (an error in the rest of the COPY: libpq
    drops the rest of an abandoned COPY, its error with it, before the next
    statement). Each row is progress (the stall watchdog reads `flow.last`)."""

    def __init__(self, limit: int, flow: Flow) -> None:
        self.parts: list[bytes] | None = []
        self.size = 0
        self.limit = limit
        self.flow = flow

    def write(self, data: bytes) -> None:
        self.flow.last = time.monotonic()
        if self.parts is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.parts = None  # what was held goes now
            return
        self.parts.append(data)


def _through_memory(
    table: SourceTable,
    source: psycopg2.extensions.connection,
    target: psycopg2.extensions.connection,
    flow: Flow,
) -> Copied | None:
    """`stream_table` for a small table: its rows read whole, then loaded. None if they
    outgrew MEMORY_LIMIT_BYTES: nothing was loaded, and the source's COPY was read to
    its end (see `_Held`), so the session is ready for the next statement."""
    held = _Held(MEMORY_LIMIT_BYTES, flow)
    with source.cursor() as cur:
        cur.copy_expert(table.copy_out(), held, size=WRITE_BUFFER)
        source_rows = cur.rowcount
    if held.parts is None:
        return None
    data = b"".join(held.parts)
    del held
    with _rolled_back_on_failure(target), target.cursor() as cur:
        cur.execute(_emptying(table))
        cur.copy_expert(table.copy_in(), io.BytesIO(data), size=READ_CHUNK)
        flow.passed(data, 0 if table.binary else data.count(b"\n"))
        return _committed(table, target, source_rows, cur.rowcount, flow)


def stream_table(
    table: SourceTable,
    source: psycopg2.extensions.connection,
    target: psycopg2.extensions.connection,
    flow: Flow,
) -> Copied:
    """Copy `table` from `source` (a session in the exported snapshot) into `target`
    (a session in the preview, not in autocommit), and commit the preview's side; a
    small table through memory (MEMORY_MAX_BYTES), any other through a pipe.

    Raises the source's error (psycopg2's) if the source side fails, the preview's if
    that side fails (the preview's transaction is rolled back either way), and
    CountMismatch if the counts differ."""
    if table.bytes < MEMORY_MAX_BYTES:
        copied = _through_memory(table, source, target, flow)
        if copied is not None:
            return copied
    read_fd, write_fd = os.pipe()
    widen_pipe(write_fd)
    finished = threading.Event()
    failed: list[BaseException] = []
    sink = _Sink(write_fd, flow if table.binary else None)
    counts: list[int] = []

    def produce() -> None:
        try:
            with source.cursor() as cur:
                cur.copy_expert(table.copy_out(), sink, size=WRITE_BUFFER)
                counts.append(cur.rowcount)
            sink.close()
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            failed.append(err)
            sink.close()
        finally:
            finished.set()

    producer = threading.Thread(
        target=contextvars.copy_context().run, args=(produce,), name=f"copy-out-{table.key}", daemon=True
    )
    tap = _Tap(read_fd, finished, failed, flow, text=not table.binary)
    try:
        with _rolled_back_on_failure(target):
            with target.cursor() as cur:
                cur.execute(_emptying(table))
                producer.start()
                try:
                    # psycopg2 only calls read() for COPY FROM; its stubs also ask for readline().
                    cur.copy_expert(table.copy_in(), tap, size=READ_CHUNK)  # type: ignore[arg-type]
                except BaseException:
                    if failed:  # the source failed first: that is the news
                        raise failed[0] from None
                    raise
                target_rows = cur.rowcount
            if failed:
                raise failed[0]
            return _committed(table, target, counts[0], target_rows, flow)
    finally:
        os.close(read_fd)  # a producer still writing gets EPIPE and stops
        if producer.ident is None:  # never started (the TRUNCATE failed)
            sink.close()
        else:
            if not finished.is_set():
                # One that waits on the source instead is stopped there: its socket is
                # shut (stages.connections.deadline). The copy has failed, so the session is not
                # needed again; psycopg2's cancel() would hold the GIL through a round
                # trip to the source.
                watchdog = getattr(source, "watchdog", None)
                if watchdog is not None:
                    watchdog.fire()
                else:
                    with contextlib.suppress(psycopg2.Error):
                        source.cancel()
            producer.join()


def stream_from_command(
    table: SourceTable,
    run_source: Callable[[Callable[[IO[bytes]], None]], object],
    target: psycopg2.extensions.connection,
    flow: Flow,
) -> Copied:
    """As `stream_table`, with the source's side a command (psql, in the snapshot,
    running `table.copy_out()`): `run_source(consume)` runs it, hands its output to
    `consume` as it comes, and raises if the command failed. Rows pass through this
    process in large chunks instead of one Python call each, which on a table of
    millions of short rows is most of the worker's time.

    The source's count is the rows that came: in COPY's text format each row ends in
    a newline, and a newline inside a value is escaped (`\\n`). Rows cut short by a
    command that failed never commit: the preview's transaction is rolled back, and
    the command's error raised. Text format only (rows counted by their newlines)."""
    if table.binary:
        raise ValueError(f"table {table.key}: a command's rows are counted in COPY's text format only")
    counts: list[int] = []

    def consume(stream: IO[bytes]) -> None:
        with target.cursor() as cur:
            # psycopg2 only calls read() for COPY FROM; its stubs also ask for readline().
            cur.copy_expert(table.copy_in(), _Counted(stream, flow), size=READ_CHUNK)  # type: ignore[arg-type]
            counts.append(cur.rowcount)

    with _rolled_back_on_failure(target):
        with target.cursor() as cur:
            cur.execute(_emptying(table))
        run_source(consume)
        return _committed(table, target, flow.rows, counts[0], flow)
