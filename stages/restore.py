"""Restore stage: load a dump into a fresh preview database, as the import's restore role.

The restore role owns the preview and nothing else (see stages.cluster): whatever SQL
the dump holds, it cannot reach the project's live database, its replaced ones, other
tenants' databases or the control database.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator

from stages.commands import PgTools
from stages.errors import CommandFailed, PermanentCommandFailure
from stages.pgurl import SourceURL
from stages.plainsql import user_terms

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
        line = getattr(cause, "script_line", None)
        mapped = user_line(line) if user_line is not None and line is not None else None
        if mapped is None:
            raise
        head = err.message.split(": ", 1)[0]  # "psql restoring … failed (exit code 3)"
        raise err.with_message(f"{head}: {cause.describe(located=False)} (at line {mapped} of the dump)") from err


# Formats pg_restore can restore with several jobs (tar cannot seek between members).
PARALLEL_FORMATS = ("custom", "directory")


def restore_archive(
    tools: PgTools, target: SourceURL, archive: str, *, jobs: int, fmt: str, list_file: str
) -> None:
    """pg_restore the entries of `list_file` (see stages.toc.plan) from an archive
    (custom, tar or directory) into `target`, in parallel where the format allows;
    owners and grants of the source are not replayed."""
    pg_restore = tools.pg_restore
    with _explained():
        pg_restore.run(
            pg_restore.restore_args(
                archive, target.conninfo(), jobs=jobs if fmt in PARALLEL_FORMATS else 1, list_file=list_file
            ),
            env=target.env(),
            secrets=[target.password],
            what="pg_restore into the preview database",
        )


def restore_plain(
    tools: PgTools, target: SourceURL, script: str, *, user_line: Callable[[int], int | None] | None = None
) -> None:
    """Run a prepared plain-SQL dump (see stages.plainsql) with psql, stopping at the
    first error. psql is restricted with a random key, so the script's own backslash
    commands (`\\connect`, `\\!`, `\\i`...) are refused rather than run.

    `user_line` maps a line of the prepared script to the line of the user's file
    (the plain-SQL stage knows both); a failure then says where in their file."""
    psql = tools.psql
    restrict_file = script + ".restrict"
    descriptor = os.open(restrict_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as fh:
        fh.write(f"\\restrict {secrets.token_hex(16)}\n")
    try:
        with _explained(), _located(user_line):
            psql.run(
                psql.script_args(target.conninfo(), script, restrict_file=restrict_file),
                env=target.env(),
                secrets=[target.password],
                what="psql restoring the plain SQL dump",
            )
    except CommandFailed as err:
        # The prepared script keeps the user's line numbers: say so in their terms.
        raise err.with_message(user_terms(err.message)) from err
    finally:
        os.remove(restrict_file)


def restore_section(
    tools: PgTools, target: SourceURL, archive: str, section: str, *, list_file: str, jobs: int = 1
) -> None:
    """pg_restore one section (pre-data, data, post-data) of the entries of `list_file`
    from a custom archive into `target`, as `restore_archive` does the whole."""
    pg_restore = tools.pg_restore
    args = pg_restore.restore_args(archive, target.conninfo(), jobs=jobs, list_file=list_file)
    with _explained():
        pg_restore.run(
            [*args[:-1], f"--section={section}", args[-1]],
            env=target.env(),
            secrets=[target.password],
            what=f"pg_restore of the schema's {section} into the preview database",
        )


def render_section(tools: PgTools, archive: str, section: str, *, list_file: str) -> str:
    """The SQL pg_restore would run for one section of the entries of `list_file`
    (nothing is executed), as the restore runs it: no owners, grants or tablespaces."""
    chunks: list[bytes] = []
    tools.pg_restore.run_streaming(
        ["--no-owner", "--no-privileges", "--no-tablespaces", f"--section={section}", f"--use-list={list_file}", "--file=-", archive],
        lambda out: chunks.append(out.read()),
        what=f"reading the schema's {section}",
    )
    # The live copy's archive is made by our pg_dump with the UTF8 client encoding.
    return b"".join(chunks).decode("utf-8", "replace")
