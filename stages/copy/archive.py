"""An uploaded archive's side of the copy (stages.copy.engine): each table's rows read
from the custom or tar archive by `pg_restore --data-only --file=-` and streamed into
`COPY … FROM STDIN WITH (FREEZE)` on a lane's preview session, counted as they pass.

The archive's own table of contents (stages.dumps.archivetoc) says which table each
data entry fills (its dependencies), the columns its rows hold (its COPY statement),
how large it is (where its data lies) and which table each index and constraint
belongs to, so the engine schedules an upload exactly as it schedules a live copy.

What the uploader wrote is never run: a data entry's COPY statement is parsed strictly
(`COPY schema.table (columns) FROM stdin;`) and the preview runs a statement built from
the parsed names; pg_restore's output is matched against the exact statement the TOC
holds. Whatever does not fit (rows as INSERT statements, a partitioned table's rows
loaded through its root, two entries filling one table, a statement that does not
parse) is left to pg_restore's own restore of the data section, as the restore role,
and its rows are counted from pg_restore's output as before (stages.dumps.rows).

Tables are named by the dump id of their TABLE entry: the source's oids in an uploaded
file are only what the uploader says.

The archive may still be arriving (`ArchiveBytes`): a table's rows are read once its
data block is on disk whole (followed chunk by chunk from the offset its table of
contents gives, stages.dumps.archivecheck.await_block), everything else once the whole
archive is.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Protocol

import psycopg2.extensions
from psycopg2 import sql

from stages.copy.catalog import Owned
from stages.copy.engine import TASK_OVERHEAD, CopyProgress, Lane, Record, flowing, table_locks, target_errors
from stages.copy.scheduler import Task
from stages.copy.stream import Flow, SourceTable, emptying, quoted
from stages.database.inventory import table_key
from stages.dumps.archivecheck import Arriving, await_block
from stages.dumps.archivetoc import NO_DATA, OFFSET_SET, ArchiveEntry, ArchiveToc
from stages.dumps.toc import TocEntry, python_codec
from stages.errors import CommandTimedOut, PermanentCommandFailure, PermanentError
from stages.tools.commands import PgTools

SECTION_DATA, SECTION_POST_DATA = 3, 4
# An archive's data is compressed about this much: its size on disk times this is what
# streams (an estimate for the schedule and the progress only).
COMPRESSION_RATIO = 4
# Tables smaller than this share one pg_restore (thousands of tiny tables would
# otherwise cost a process each); larger ones have one of their own.
BATCH_BYTES = 16 << 20
BATCH_TABLES = 200
READ_CHUNK = 1 << 17
# After the preview refuses a table's rows, how much more of pg_restore's output is read
# for its own error (a damaged block it has not noticed yet) before the refusal is news.
DRAIN_AFTER_REFUSAL = 64 << 20
_END = b"\\.\n"

_IDENT = rb'(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)'
_COPY = re.compile(
    rb"COPY ("
    + _IDENT
    + rb")\.("
    + _IDENT
    + rb") (?:\(("
    + _IDENT
    + rb"(?:, "
    + _IDENT
    + rb")*)\) | )FROM stdin;\n\Z"
)
_USING = re.compile(rb" USING (\w+) \(")


class ArchiveDataDamaged(PermanentError):
    """The archive's table data is not what its table of contents says."""


class ArchiveBytes(Arriving, Protocol):
    """How much of the archive is on disk, while it may still be downloading."""

    def abandon(self) -> None:
        """The copy stopped: stop the arrival; whoever waits for more bytes raises."""


class OnDisk:
    """An archive that is on disk whole."""

    complete = True

    def wait_for(self, end: int | None) -> None:
        return None

    def abandon(self) -> None:
        return None


@dataclass(frozen=True)
class CopyStatement:
    """A data entry's COPY statement, parsed: the table and its columns (unquoted)."""

    schema: str
    table: str
    columns: tuple[str, ...]


def parse_copy(statement: bytes, codec: str = "utf-8") -> CopyStatement | None:
    """`COPY schema.table (a, b) FROM stdin;` as pg_dump writes it, or None."""
    match = _COPY.match(statement)
    if match is None:
        return None
    try:
        names = [_unquote(part.decode(codec)) for part in (match.group(1), match.group(2))]
        columns = tuple(_unquote(c.decode(codec)) for c in re.findall(_IDENT, match.group(3) or b""))
    except UnicodeDecodeError:
        return None
    return CopyStatement(names[0], names[1], columns)


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


@dataclass(frozen=True)
class StreamedTable:
    """A table whose rows stream: `entry` is its TABLE DATA entry (for pg_restore's
    list), `statement` the COPY statement pg_restore prints before its rows, `offset`
    where pg_restore reads its data block (None when the archive does not say: it reads
    the archive from its start)."""

    table: SourceTable
    entry: TocEntry
    statement: bytes
    copy: CopyStatement
    offset: int | None = None


@dataclass(frozen=True)
class ArchivePlan:
    """`streamed`: in the archive's order; `rest`: the data section's entries that
    pg_restore restores itself (sequence values, large objects, rows it alone can
    read); `owned`: which table each post-data entry belongs to, by its dump id;
    `seekable`: each data entry can be read on its own (a custom archive with offsets);
    `int_size`: the size of an integer in its blocks."""

    streamed: list[StreamedTable]
    rest: list[TocEntry]
    owned: dict[int, Owned]
    seekable: bool
    int_size: int = 4


def plan_archive(
    toc: ArchiveToc, kept: list[TocEntry], *, encoding: str, plain_tables: set[tuple[str, str]]
) -> ArchivePlan:
    """Which of the kept data entries stream, and who owns each post-data entry.
    `plain_tables`: the (schema, table) names that are ordinary tables in the preview
    (after pre-data): COPY FREEZE fills nothing else."""
    codec = python_codec(encoding)
    by_id = {e.dump_id: e for e in toc.entries}
    kept_ids = {e.dump_id for e in kept}
    tables = {e.dump_id: e for e in toc.entries if e.desc == "TABLE" and e.dump_id in kept_ids}
    candidates: list[tuple[TocEntry, ArchiveEntry, CopyStatement, int]] = []
    for entry in kept:
        found = by_id.get(entry.dump_id)
        if found is None or found.desc != "TABLE DATA" or entry.desc != "TABLE DATA":
            continue
        copy = parse_copy(found.copy_statement or b"", codec)
        owner = next((tables[d] for d in found.deps if d in tables), None)
        if copy is None or owner is None or not _has_data(found):
            continue
        if _decoded(owner.namespace, codec) != copy.schema or _decoded(owner.tag, codec) != copy.table:
            continue  # loaded through another table (a partition's root)
        if (copy.schema, copy.table) not in plain_tables:
            continue
        candidates.append((entry, found, copy, owner.dump_id))
    targets = [(c.schema, c.table) for _e, _f, c, _o in candidates]
    loaded = _loaded_by_pg_restore(toc, kept, {id(f) for _e, f, _c, _o in candidates}, codec)
    streamed = []
    factor = COMPRESSION_RATIO if toc.compressed else 1
    for entry, found, copy, owner_id in candidates:
        if targets.count((copy.schema, copy.table)) > 1:
            continue  # two entries fill one table: TRUNCATE before each would lose rows
        if loaded is None or (copy.schema, copy.table) in loaded:
            continue  # pg_restore fills it too (maybe first): TRUNCATE would lose its rows
        size = toc.data_bytes.get(found.dump_id, 0) * factor
        table = SourceTable(
            table_key(copy.schema, copy.table), copy.schema, copy.table, copy.columns, size, owner_id
        )
        offset = found.offset if found.offset_flag == OFFSET_SET else None
        streamed.append(StreamedTable(table, entry, found.copy_statement or b"", copy, offset))
    streamed_ids = {s.entry.dump_id for s in streamed}
    rest = [
        e
        for e in kept
        if e.dump_id in by_id and by_id[e.dump_id].section == SECTION_DATA and e.dump_id not in streamed_ids
    ]
    owned = _owners(toc, tables, kept_ids)
    seekable = all(by_id[s.entry.dump_id].offset_flag == 2 for s in streamed)
    return ArchivePlan(streamed, rest, owned, seekable, toc.int_size)


def _loaded_by_pg_restore(
    toc: ArchiveToc, kept: list[TocEntry], candidate_ids: set[int], codec: str
) -> set[tuple[str, str]] | None:
    """The tables that data entries other than the candidates fill (pg_restore loads
    them alongside the streamed copies, with no order between them), by the table
    their COPY statement names; None when one such entry's table is unknown (rows as
    INSERT statements, a statement that does not parse): it could fill any table."""
    by_id = {e.dump_id: e for e in toc.entries}
    loaded: set[tuple[str, str]] = set()
    for entry in kept:
        found = by_id.get(entry.dump_id)
        if found is None or id(found) in candidate_ids or found.desc != "TABLE DATA" or not _has_data(found):
            continue
        copy = parse_copy(found.copy_statement or b"", codec)
        if copy is None:
            return None
        loaded.add((copy.schema, copy.table))
    return loaded


def _decoded(text: bytes | None, codec: str) -> str | None:
    try:
        return (text or b"").decode(codec)
    except UnicodeDecodeError:
        return None


def _has_data(entry: ArchiveEntry) -> bool:
    if entry.member is not None:
        return True
    return entry.offset_flag != NO_DATA and entry.offset_flag != 0


def _owners(toc: ArchiveToc, tables: dict[int, ArchiveEntry], kept_ids: set[int]) -> dict[int, Owned]:
    """Indexes, constraints and foreign keys of the post-data section, by dump id, with
    the table they belong to (their dependencies; a foreign key's other table is the
    other table it depends on, directly or through that table's key)."""
    by_id = {e.dump_id: e for e in toc.entries}

    def table_of(dump_id: int) -> int | None:
        if dump_id in tables:
            return dump_id
        entry = by_id.get(dump_id)
        if entry is not None and entry.desc in ("CONSTRAINT", "INDEX"):
            owners = {d for d in entry.deps if d in tables}
            return owners.pop() if len(owners) == 1 else None
        return None

    owned: dict[int, Owned] = {}
    for entry in toc.entries:
        if entry.section != SECTION_POST_DATA or entry.dump_id not in kept_ids:
            continue
        # Once each: pg_dump lists an index's table once per column it indexes.
        own = list(dict.fromkeys(d for d in entry.deps if d in tables))
        if entry.desc == "INDEX" and len(own) == 1:
            method = _USING.search(entry.definition or b"")
            owned[entry.dump_id] = Owned(
                own[0], "index", method.group(1).decode("ascii") if method else "btree"
            )
        elif entry.desc == "CONSTRAINT" and len(own) == 1:
            owned[entry.dump_id] = Owned(own[0], "constraint")
        elif entry.desc == "FK CONSTRAINT" and own:
            # Its tag is "<table> <constraint>", in its table's schema: of the tables it
            # depends on, the one it is on; the other is the one it references (or
            # none: it references its own table).
            on = {
                d
                for d in own
                if entry.namespace == tables[d].namespace and entry.tag.startswith(tables[d].tag + b" ")
            }
            if len(on) != 1:
                continue
            table = on.pop()
            found = {d: table_of(d) for d in entry.deps}
            keys = [t for d, t in found.items() if d in by_id and by_id[d].desc in ("CONSTRAINT", "INDEX")]
            unknown = [
                d for d, t in found.items() if t is None and (d not in by_id or by_id[d].desc != "EXTENSION")
            ]
            if not keys or None in keys or unknown:
                # The key it references is no copied table's (an extension's configuration
                # table's is named by its extension, and its schema): pg_restore creates it
                # after the data section. A dependency on an extension alone (the
                # operators of a citext column) is no reason.
                continue
            referenced = {t for t in found.values() if t is not None} - {table}
            if len(referenced) <= 1:
                owned[entry.dump_id] = Owned(
                    table, "foreign key", references=referenced.pop() if referenced else table
                )
    return owned


@dataclass
class ArchiveSource:
    """The engine's row source for an uploaded archive at `path` (see the module's
    docstring). `tools` runs pg_restore (it reads the file only); `folder` holds the
    small list files each pg_restore is given; `arriving` says how much of the file is
    there yet (a table's pg_restore starts once its rows are)."""

    path: str
    plan: ArchivePlan
    tools: PgTools
    folder: str
    lanes: int
    stall_seconds: float
    arriving: ArchiveBytes = field(default_factory=OnDisk)

    def tables_in(self, kept: list[TocEntry]) -> list[SourceTable]:
        return [s.table for s in self.plan.streamed]

    def owner_of(self, entry: TocEntry) -> Owned | None:
        return self.plan.owned.get(entry.dump_id)

    @contextlib.contextmanager
    def loading(self) -> Iterator[_ArchiveLoading]:
        yield _ArchiveLoading(self)


class _ArchiveLoading:
    def __init__(self, source: ArchiveSource) -> None:
        self.source = source
        self.stopped = threading.Event()

    def interrupt(self) -> None:
        # A lane reading pg_restore's output stops at its next read; one in a COPY is
        # cancelled by the engine (the preview's session), which ends its pg_restore;
        # one waiting for its rows to arrive raises once the arrival is stopped.
        self.stopped.set()
        self.source.arriving.abandon()

    def close_lane(self, lane: Lane) -> None:
        return None

    def data_tasks(
        self, tables: list[SourceTable], progress: CopyProgress, record: Record
    ) -> tuple[dict[int, Task[Lane]], list[Task[Lane]]]:
        wanted = {t.oid for t in tables}
        streamed = [s for s in self.source.plan.streamed if s.table.oid in wanted]
        copies: dict[int, Task[Lane]] = {}
        for number, batch in enumerate(_batches(streamed, self.source.plan.seekable, self.source.lanes)):
            first = batch[0].table.key
            name = f"copy {first}" + (f" and {len(batch) - 1} more" if len(batch) > 1 else "")
            cost = sum(TASK_OVERHEAD + s.table.bytes for s in batch)
            locks = table_locks(*(s.table.oid for s in batch))
            task = Task[Lane](name, cost, self._load(number, batch, progress, record), locks)
            for item in batch:
                copies[item.table.oid] = task
        return copies, []

    def _load(
        self, number: int, batch: list[StreamedTable], progress: CopyProgress, record: Record
    ) -> Callable[[Lane], None]:
        source = self.source

        def arrived() -> None:
            """Wait until what pg_restore reads for the batch is on disk: each block, as
            its chunks arrive (not up to the next block the table of contents names:
            an offset there may lie); without offsets, pg_restore reads the archive
            from its start to find a block: all of it."""
            if not source.plan.seekable:
                source.arriving.wait_for(None)
                return
            for item in batch:
                assert item.offset is not None  # seekable: every streamed block has one
                await_block(source.path, item.offset, source.plan.int_size, source.arriving)

        def run(lane: Lane) -> None:
            arrived()
            if self.stopped.is_set():
                raise PermanentError("the copy was stopped")
            list_file = os.path.join(source.folder, f"data-{number}.list")
            with open(list_file, "w", encoding="utf-8") as fh:
                fh.write("\n".join(s.entry.line for s in batch) + "\n")

            refused: list[PermanentError] = []

            def consume(stdout: IO[bytes]) -> None:
                rows = _Rows(stdout, self.stopped)
                try:
                    for item in batch:
                        rows.skip_to(item.statement, item.table.key)
                        with flowing(progress, item.table, counted=True) as flow:
                            source_rows, target_rows = _load_block(lane.target, item, rows, flow)
                        record(item.table, source_rows, target_rows)
                except PermanentError as err:
                    if isinstance(err, ArchiveDataDamaged) or self.stopped.is_set():
                        raise
                    # The preview refused the rows: they may be what pg_restore made of a
                    # damaged block before it noticed. Let it finish: its error is then the news.
                    refused.append(err)
                    if not rows.drain(DRAIN_AFTER_REFUSAL):
                        raise  # pg_restore reads on without a complaint: the rows were refused
                    return
                rows.drain()

            what = (
                f"reading the rows of table {batch[0].table.key} from the dump"
                if len(batch) == 1
                else (f"reading the rows of {len(batch)} tables from the dump")
            )
            reader = source.tools.pg_restore
            # Only reading a file the preflight checked: when it stops producing rows (a
            # stopped or starved process), the stage is retried, as a live copy's stall is.
            reader.stall_is_transient = True
            reader.stall_hint = "it stopped producing the archive's rows; the import is retried"
            try:
                reader.run_streaming(
                    ["--data-only", f"--use-list={list_file}", "--file=-", source.path], consume, what=what
                )
            except PermanentCommandFailure as err:
                if isinstance(err, CommandTimedOut):
                    raise
                # pg_restore only reads the file here: what it cannot read is damaged.
                raise PermanentCommandFailure(
                    f"{err.message}: the archive is damaged; check it with pg_restore --list and upload it again",
                    exit_code=err.exit_code,
                    stdout_tail=err.stdout_tail,
                    stderr_tail=err.stderr_tail,
                ) from err
            if refused:
                raise refused[0]

        return run


def _batches(streamed: list[StreamedTable], seekable: bool, lanes: int) -> list[list[StreamedTable]]:
    """Each large table alone and the small ones together, up to BATCH_BYTES. Without
    offsets (a tar archive, a custom one written to a pipe) every pg_restore reads the
    archive from its start, so the tables are cut into a few runs, in the archive's order."""
    if not streamed:
        return []
    if not seekable:
        runs = max(1, min(len(streamed), 2 * max(1, lanes)))
        total = sum(s.table.bytes + TASK_OVERHEAD for s in streamed)
        share = total / runs
        out: list[list[StreamedTable]] = [[]]
        filled = 0.0
        for item in streamed:
            if out[-1] and filled >= share:
                out.append([])
                filled = 0.0
            out[-1].append(item)
            filled += item.table.bytes + TASK_OVERHEAD
        return out
    batches: list[list[StreamedTable]] = []
    small: list[StreamedTable] = []
    small_bytes = 0
    for item in streamed:
        if item.table.bytes >= BATCH_BYTES:
            batches.append([item])
            continue
        small.append(item)
        small_bytes += item.table.bytes
        if small_bytes >= BATCH_BYTES or len(small) >= BATCH_TABLES:
            batches.append(small)
            small, small_bytes = [], 0
    if small:
        batches.append(small)
    return batches


class _Rows:
    """pg_restore's output (`--data-only --file=-`): the settings it prints first, then
    per entry a comment header, the COPY statement, the rows and the `\\.` line. Read in
    large chunks; a row's newline is always its end (COPY text escapes newlines inside
    values), and no row is `\\.` alone (a backslash in a value is doubled)."""

    def __init__(self, stdout: IO[bytes], stopped: threading.Event) -> None:
        self._stdout = stdout
        self._stopped = stopped
        self._buffer = b""
        self._eof = False

    def _fill(self) -> bool:
        if self._stopped.is_set():
            raise PermanentError("the copy was stopped")
        if self._eof:
            return False
        read1 = getattr(self._stdout, "read1", None)
        chunk = read1(READ_CHUNK) if read1 is not None else self._stdout.read(READ_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def skip_to(self, statement: bytes, key: str) -> None:
        """Pass over lines up to `statement` (starting a line; it spans several when a
        quoted name holds a newline); the rows follow it."""
        while True:
            if len(self._buffer) >= len(statement):
                if self._buffer.startswith(statement):
                    self._buffer = self._buffer[len(statement) :]
                    return
                end = self._buffer.find(b"\n")
                if end >= 0:
                    self._buffer = self._buffer[end + 1 :]
                    continue
            if not self._fill():
                raise ArchiveDataDamaged(
                    f"the archive holds no rows for table {key} where its table of contents says they are: "
                    "it is damaged; check it with pg_restore --list and upload it again"
                )

    def block(self, flow: Flow) -> _Block:
        return _Block(self, flow)

    def drain(self, limit: int | None = None) -> bool:
        """Read what follows (after the last entry: nothing but pg_restore's closing
        lines), `limit` bytes at the most; False if it stopped at the limit."""
        read = len(self._buffer)
        self._buffer = b""
        while limit is None or read < limit:
            if not self._fill():
                return True
            read += len(self._buffer)
            self._buffer = b""
        return False


class _Block:
    """One entry's rows, as psycopg2's copy_expert reads them: up to the `\\.` line."""

    def __init__(self, rows: _Rows, flow: Flow) -> None:
        self._rows = rows
        self._flow = flow
        self._line_start = True
        self.done = False
        self.count = 0

    def read(self, size: int = READ_CHUNK) -> bytes:
        if self.done:
            return b""
        rows = self._rows
        while True:
            buffer = rows._buffer
            if self._line_start and len(buffer) >= len(_END) and buffer.startswith(_END):
                rows._buffer = buffer[len(_END) :]
                self.done = True
                return b""
            end = buffer.find(b"\n" + _END)
            if end >= 0:
                return self._emit(end + 1)
            if len(buffer) > len(_END):
                return self._emit(len(buffer) - len(_END))
            if not rows._fill():
                raise ArchiveDataDamaged(
                    "the archive's table data ends inside a table's rows: it is damaged or cut short; "
                    "upload the whole file again"
                )

    def _emit(self, length: int) -> bytes:
        rows = self._rows
        data, rows._buffer = rows._buffer[:length], rows._buffer[length:]
        self._line_start = data.endswith(b"\n")
        lines = data.count(b"\n")
        self.count += lines
        self._flow.passed(data, lines)
        return data


def _load_block(
    target: psycopg2.extensions.connection, item: StreamedTable, rows: _Rows, flow: Flow
) -> tuple[int, int]:
    """One table's rows into the preview, in its own transaction: TRUNCATE, then COPY
    FREEZE (a table of FREEZE_MIN_BYTES or more, stages.copy.stream), or DELETE and COPY;
    both counts (the rows read, the preview's `COPY n`) must agree."""
    name = quoted(item.copy.schema, item.copy.table)
    columns = sql.SQL(", ").join(quoted(c) for c in item.copy.columns)
    freeze = sql.SQL(" WITH (FREEZE)" if item.table.frozen else "")
    statement = (
        sql.SQL("COPY {} ({}) FROM STDIN{}").format(name, columns, freeze)
        if item.copy.columns
        else sql.SQL("COPY {} FROM STDIN{}").format(name, freeze)
    )
    block = rows.block(flow)
    with target_errors(f"loading the rows of table {item.table.key} into the preview"):
        try:
            with target.cursor() as cur:
                cur.execute(emptying(name, frozen=item.table.frozen))
                # psycopg2 only calls read() for COPY FROM; its stubs also ask for readline().
                cur.copy_expert(statement, block, size=READ_CHUNK)  # type: ignore[arg-type]
                target_rows = cur.rowcount
            if not block.done:
                raise ArchiveDataDamaged(
                    f"the rows of table {item.table.key} did not end where the archive says"
                )
            if block.count != target_rows:
                raise ArchiveDataDamaged(
                    f"the dump holds {block.count} rows of table {item.table.key} and the preview received {target_rows}"
                )
            target.commit()
        except BaseException:
            with contextlib.suppress(psycopg2.Error):
                target.rollback()
            raise
    return block.count, target_rows
