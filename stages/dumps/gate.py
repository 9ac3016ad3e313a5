"""Can the target's tools restore this dump? Decided before anything is restored."""

from __future__ import annotations

import re
from typing import IO

from stages.dumps.formats import DumpInfo
from stages.errors import CommandFailed, CommandTimedOut, PermanentError, TransientError
from stages.tools.commands import PgTools


class DumpTooNew(PermanentError):
    """The dump was made by a newer PostgreSQL than the project's."""


def major_of(version: str | None) -> int | None:
    """16 for "16.4 (Debian ...)", 9 for "9.6.24"; None when unknown."""
    if not version:
        return None
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) if match else None


def check_versions(info: DumpInfo, target_major: int) -> None:
    """Refuse a dump made by, or of, a newer major than the target's, saying what to do."""
    by, source = major_of(info.dumped_by), major_of(info.dumped_from)
    if source is not None and source > target_major:
        raise DumpTooNew(
            f"the dump comes from a PostgreSQL {source} database, newer than the project's "
            f"PostgreSQL {target_major}; imports cannot downgrade. Use a project on "
            f"PostgreSQL {source} or later"
        )
    if by is not None and by > target_major:
        raise DumpTooNew(
            f"the dump was made by pg_dump {info.dumped_by}, which PostgreSQL {target_major} "
            f"cannot read; dump the database again with pg_dump {target_major} "
            f"(package postgresql-client-{target_major})"
        )


def _drain(stream: IO[bytes]) -> None:
    while stream.read(1 << 16):
        pass


def check_archive_readable(tools: PgTools, path: str, info: DumpInfo, target_major: int) -> None:
    """Read the archive's table of contents with the target's pg_restore."""
    pg_restore = tools.pg_restore
    try:
        # Streamed (and dropped): a pg_restore that stops printing is stopped too.
        pg_restore.run_streaming(
            pg_restore.list_args(path), _drain, what="reading the dump's table of contents"
        )
    except (TransientError, CommandTimedOut):
        raise  # a timeout's message already says which limit was reached
    except CommandFailed as err:
        if "unsupported version" in err.stderr_tail:
            made_by = f"pg_dump {info.dumped_by}" if info.dumped_by else "a newer pg_dump"
            raise err.with_message(
                f"the dump (archive format {info.archive_version}) was made by {made_by}, which "
                f"PostgreSQL {target_major}'s pg_restore cannot read; dump the database again "
                f"with pg_dump {target_major} (package postgresql-client-{target_major})"
            ) from err
        raise err.with_message(
            f"the {info.format} archive is damaged or truncated: {err.message}; "
            "upload a complete pg_dump output"
        ) from err
