"""Restore stage: load a dump into a fresh preview database."""

from __future__ import annotations

from stages.commands import PgTools
from stages.pgurl import SourceURL


def restore_archive(tools: PgTools, target: SourceURL, archive: str, *, jobs: int) -> None:
    """pg_restore an archive (custom, tar or directory) into `target`, in parallel
    where the format allows; owners and grants of the source are not replayed."""
    pg_restore = tools.pg_restore
    pg_restore.run(
        pg_restore.restore_args(archive, target.conninfo(), jobs=jobs),
        env=target.env(),
        secrets=[target.password],
        what="pg_restore into the preview database",
    )
