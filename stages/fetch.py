"""Fetch stage for live sources: a consistent, parallel dump of the source.

The dump and the source row counts come from one snapshot: a read-only repeatable
read transaction exports its snapshot, pg_dump uses it (`--snapshot`), and the rows
are counted inside the same transaction while pg_dump runs. So the counts finalize
compares against are exactly what the dump holds, even while the source takes writes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2.errors
import psycopg2.extensions

from stages import inventory
from stages.commands import PgTools
from stages.connect import connection
from stages.deadline import Deadline
from stages.errors import PermanentError, SourceUnreachable, TransientError
from stages.pgurl import SourceURL, redact

Progress = Callable[[dict], None]


class SourceBusy(TransientError):
    """A table on the source stayed locked by another session past the lock timeout."""


@dataclass(frozen=True)
class LiveDump:
    path: str
    source_counts: dict[str, int]
    server_version: str
    bytes: int
    source_description: dict


def directory_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def dump_live(
    source: SourceURL,
    tools: PgTools,
    out_dir: str,
    *,
    jobs: int,
    timeout: int = 10,
    read_timeout: float = 1800,
    lock_timeout: float = 60,
    on_progress: Progress = lambda _p: None,
) -> LiveDump:
    """Dump `source` (already address-pinned) into `out_dir` (directory format).

    Every statement on the snapshot connection (exporting the snapshot, counting each
    table, describing the source) must answer within `read_timeout` seconds: an honest
    server cancels it itself (statement_timeout), one that never answers has its
    socket shut down (stages.deadline) and the stage fails with `SourceTimedOut`,
    a transient error, instead of hanging.
    """
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)  # a retried fetch starts over
    deadline = Deadline(per_read=read_timeout, what="the source read timeout, CAPY_SOURCE_READ_TIMEOUT_SECONDS")
    # UTF8, the target's encoding: the server converts names from the source's own
    # (psycopg2 quotes identifiers wrongly on a connection in another encoding).
    with connection(source, timeout=timeout, deadline=deadline, client_encoding="UTF8") as conn:
        conn.set_session(
            isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
            readonly=True,
        )
        # A cancel of the job interrupts our own queries too (the server cancels them),
        # not only pg_dump.
        # (The subscription lives as long as the stage's Cancellation; a cancel after
        # the connection closed finds nothing to interrupt.)
        if tools.cancellation is not None:
            tools.cancellation.on_cancel(conn.cancel)
        with conn.cursor() as cur:
            # SETs, not startup options: a pooler in front may refuse startup options.
            # They are utility statements, so the snapshot is still taken by the next one.
            # A table the source's own sessions lock exclusively makes the count fail after
            # lock_timeout (transient: retried) rather than wait for as long as they hold it.
            cur.execute("SET statement_timeout = %s", (int(read_timeout * 1000),))
            cur.execute("SET lock_timeout = %s", (int(lock_timeout * 1000),))
            cur.execute("SELECT pg_export_snapshot(), current_setting('server_version')")
            snapshot, server_version = cur.fetchone()
        pg_dump = tools.pg_dump
        process = pg_dump.start(
            pg_dump.directory_args(
                source.conninfo(connect_timeout=str(timeout)),
                out_dir,
                jobs=jobs,
                snapshot=snapshot,
                lock_wait_ms=int(lock_timeout * 1000),
            ),
            env=source.env(),
            secrets=[source.password],
        )
        try:
            on_progress({"phase": "counting source rows"})
            counts = inventory.count_rows(
                conn,
                on_table=lambda done, total: on_progress(
                    {"phase": "dumping", "tables_counted": done, "tables_total": total}
                ),
            )
            description = inventory.describe(conn)
        except psycopg2.errors.InsufficientPrivilege as err:
            pg_dump.abort(process)
            raise PermanentError(
                f"the source user {source.user!r} cannot read every table "
                f"({str(err).splitlines()[0]}); grant it SELECT on all tables, or use the "
                "database owner's credentials"
            ) from err
        except psycopg2.errors.LockNotAvailable as err:
            pg_dump.abort(process)
            raise SourceBusy(
                f"a table on the source is locked by another session (an open transaction holding an "
                f"exclusive lock, a schema change, a VACUUM FULL) and stayed locked for {lock_timeout:g} s; "
                "the import is retried, and succeeds once the lock is released"
            ) from err
        except psycopg2.OperationalError as err:
            pg_dump.abort(process)
            raise SourceUnreachable(
                f"lost the connection to the source while reading it: {redact(str(err), source.password).strip()}"
            ) from err
        except BaseException:
            pg_dump.abort(process)
            raise
        on_progress({"phase": "dumping", "tables_total": len(counts)})
        pg_dump.wait(process, secrets=[source.password], what="pg_dump of the source")
        conn.rollback()
    size = directory_size(out_dir)
    on_progress({"phase": "dumped", "bytes_done": size, "bytes_total": size, "tables_total": len(counts)})
    return LiveDump(out_dir, counts, server_version, size, description)
