"""Restore stage: load a dump into a fresh preview database, as the import's restore role.

The restore role owns the preview and nothing else (see stages.database.cluster): whatever SQL
the dump holds, it cannot reach the project's live database, its replaced ones, other
tenants' databases or the control database.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from stages.connections.pgurl import SourceURL
from stages.dumps.plainsql import user_terms
from stages.errors import CommandFailed, PermanentCommandFailure
from stages.tools.commands import PgTools

# What the server answers a restore role that reaches for another database.
_OTHER_DATABASE = re.compile(
    r"must be owner of database|permission denied to create database|permission denied for database"
    r"|cannot drop the currently open database"
)


@contextlib.contextmanager
def _explained() -> Iterator[None]:
    """Say what to do when a dump tries to drop, create or change another database
    (`pg_dump --clean --create` output starts with DROP DATABASE of its source)."""
    try:
        yield
    except PermanentCommandFailure as err:
        if not _OTHER_DATABASE.search(err.message):
            raise
        raise err.with_message(
            f"{err.message}. A dump restores only into the new database this import creates: it "
            "cannot drop, create or change any other database. Make the dump without --create "
            "(and without --clean), e.g. pg_dump -Fc or pg_dump -Fp, and import it again; "
            "the project's database was not changed"
        ) from err


@contextlib.contextmanager
def _located(user_line: Callable[[int], int | None] | None) -> Iterator[None]:
    """Add to a psql failure the line of the user's file its statement came from."""
    try:
        yield
    except CommandFailed as err:
        cause = err.cause
        if cause is None or cause.script_line is None or user_line is None:
            raise
        mapped = user_line(cause.script_line)
        if mapped is None:
            raise
        head = err.message.split(": ", 1)[0]  # "psql restoring … failed (exit code 3)"
        raise err.with_message(
            f"{head}: {cause.describe(located=False)} (at line {mapped} of the dump)"
        ) from err


def _preview_env(target: SourceURL) -> dict[str, str]:
    """The environment of a tool restoring into the preview: its sessions do not wait for
    each commit to reach disk (`synchronous_commit=off`), as the copy's lanes do not.
    pg_restore and a plain dump commit every statement: thousands of tables made the
    schema wait thousands of times for the WAL's flush. Nothing is at risk: a preview
    whose restore did not finish is dropped and restored again, and the restore stage
    ends by flushing the WAL (ClusterAdmin.flush_wal) before it says it is done."""
    return {**target.env(), "PGOPTIONS": "-c synchronous_commit=off"}


# How often to look whether psql opened the named pipe of a streamed script yet.
_PIPE_POLL_SECONDS = 0.02

# Formats pg_restore can restore with several jobs (tar cannot seek between members).
PARALLEL_FORMATS = ("custom", "directory")


def restore_archive(
    tools: PgTools, target: SourceURL, archive: str, *, jobs: int, fmt: str, list_file: str
) -> None:
    """pg_restore the entries of `list_file` (see stages.dumps.toc.plan) from an archive
    (custom, tar or directory) into `target`, in parallel where the format allows;
    owners and grants of the source are not replayed."""
    pg_restore = tools.pg_restore
    with _explained():
        pg_restore.run(
            pg_restore.restore_args(
                archive, target.conninfo(), jobs=jobs if fmt in PARALLEL_FORMATS else 1, list_file=list_file
            ),
            env=_preview_env(target),
            secrets=[target.password],
            what="pg_restore into the preview database",
        )


def restore_plain(
    tools: PgTools, target: SourceURL, script: str, *, user_line: Callable[[int], int | None] | None = None
) -> None:
    """Run a prepared plain-SQL dump (see stages.dumps.plainsql) with psql, stopping at the
    first error. psql is restricted with a random key, so the script's own backslash
    commands (`\\connect`, `\\!`, `\\i`...) are refused rather than run.

    `user_line` maps a line of the prepared script to the line of the user's file
    (the plain-SQL stage knows both); a failure then says where in their file."""
    restrict_file = script + ".restrict"
    _write_restrict_file(restrict_file)
    try:
        _run_psql(tools, target, script, restrict_file, user_line, feed=None)
    finally:
        os.remove(restrict_file)


def restore_plain_stream(
    tools: PgTools,
    target: SourceURL,
    feed: Callable[[BinaryIO], object],
    folder: str,
    *,
    user_line: Callable[[int], int | None] | None = None,
) -> None:
    """As `restore_plain`, for a script that is never whole on disk: `feed(out)` writes
    the prepared script to `out`, which psql reads as it runs it (a named pipe
    `dump.sql` in `folder`, so psql names the script and its lines as for a file).

    psql stops at the first error; the rest of the feed then fails to be written and
    psql's error is raised. If `feed` raises (the script is refused once read whole,
    storage failed), psql is killed before it sees the end of its input, so a statement
    cut short is never run; the error from `feed` is raised."""
    script = os.path.join(folder, "dump.sql")
    restrict_file = script + ".restrict"
    os.mkfifo(script, 0o600)
    _write_restrict_file(restrict_file)
    try:
        _run_psql(tools, target, script, restrict_file, user_line, feed=feed)
    finally:
        os.remove(restrict_file)
        os.remove(script)


def _write_restrict_file(path: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as fh:
        fh.write(f"\\restrict {secrets.token_hex(16)}\n")


def _run_psql(
    tools: PgTools,
    target: SourceURL,
    script: str,
    restrict_file: str,
    user_line: Callable[[int], int | None] | None,
    *,
    feed: Callable[[BinaryIO], object] | None,
) -> None:
    psql = tools.psql
    what = "psql restoring the plain SQL dump"
    try:
        with _explained(), _located(user_line):
            args = psql.script_args(target.conninfo(), script, restrict_file=restrict_file)
            if feed is None:
                psql.run(args, env=_preview_env(target), secrets=[target.password], what=what)
                return
            process = psql.start(args, env=_preview_env(target), secrets=[target.password], what=what)
            try:
                _feed_pipe(script, process, feed)
            except BaseException:
                psql.abort(process)
                raise
            psql.wait(process, secrets=[target.password], what=what)
    except CommandFailed as err:
        # The prepared script keeps the user's line numbers: say so in their terms.
        raise err.with_message(user_terms(err.message)) from err


def _feed_pipe(fifo: str, process: subprocess.Popen[bytes], feed: Callable[[BinaryIO], object]) -> None:
    """Write the script into the named pipe psql reads. Returns early, without error,
    when psql ended first (before opening the pipe, or while reading it): its exit
    says why."""
    while True:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:
            if err.errno != errno.ENXIO:  # no reader yet: psql is still connecting
                raise
        if process.poll() is not None:
            return
        time.sleep(_PIPE_POLL_SECONDS)
    os.set_blocking(descriptor, True)
    out = os.fdopen(descriptor, "wb", buffering=1 << 16)
    try:
        feed(out)
        out.flush()
    except BrokenPipeError:
        return  # psql stopped at an error (or was stopped); its exit is the news
    finally:
        with contextlib.suppress(BrokenPipeError):
            out.close()


def restore_section(
    tools: PgTools,
    target: SourceURL,
    archive: str,
    section: str,
    *,
    list_file: str,
    jobs: int = 1,
    listed_only: bool = False,
) -> None:
    """pg_restore one section (pre-data, data, post-data) of the entries of `list_file`
    from a custom archive into `target`, as `restore_archive` does the whole.
    `listed_only`: the list holds only that section's entries, and all of them are
    restored (pg_restore's own `--section` would count an entry of no section, a
    comment, in the section of the entry before it in the archive, which a list that
    reorders the entries changes)."""
    pg_restore = tools.pg_restore
    args = pg_restore.restore_args(archive, target.conninfo(), jobs=jobs, list_file=list_file)
    with _explained():
        pg_restore.run(
            [*args[:-1], *([] if listed_only else [f"--section={section}"]), args[-1]],
            env=_preview_env(target),
            secrets=[target.password],
            what=f"pg_restore of the schema's {section} into the preview database",
        )
