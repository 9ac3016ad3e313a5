"""Restore stage: load a dump into a fresh preview database, as the project role."""

from __future__ import annotations

import secrets

from stages.commands import PgTools
from stages.pgurl import SourceURL

# Formats pg_restore can restore with several jobs (tar cannot seek between members).
PARALLEL_FORMATS = ("custom", "directory")


def restore_archive(
    tools: PgTools, target: SourceURL, archive: str, *, jobs: int, fmt: str, list_file: str
) -> None:
    """pg_restore the entries of `list_file` (see stages.toc.plan) from an archive
    (custom, tar or directory) into `target`, in parallel where the format allows;
    owners and grants of the source are not replayed."""
    pg_restore = tools.pg_restore
    pg_restore.run(
        pg_restore.restore_args(
            archive, target.conninfo(), jobs=jobs if fmt in PARALLEL_FORMATS else 1, list_file=list_file
        ),
        env=target.env(),
        secrets=[target.password],
        what="pg_restore into the preview database",
    )


def restore_plain(tools: PgTools, target: SourceURL, script: str) -> None:
    """Run a prepared plain-SQL dump (see stages.plainsql) with psql, stopping at the
    first error. psql is restricted with a random key, so the script's own backslash
    commands (`\\connect`, `\\!`, `\\i`...) are refused rather than run."""
    psql = tools.psql
    psql.run(
        psql.script_args(target.conninfo(), script, restrict_key=secrets.token_hex(16)),
        env=target.env(),
        secrets=[target.password],
        what="psql restoring the plain SQL dump",
    )
