"""Plain-SQL dumps: prepared for a psql that runs no meta-commands of the dump's own.

Owner and grant statements are dropped too, as --no-owner and --no-privileges do for
archives (one-line statements at the start of a line, outside COPY data; a function
body line that happens to look exactly like one would be dropped as well).

A plain dump is a psql script, and psql scripts can run shell commands (`\\!`), read
files (`\\i`) or connect elsewhere (`\\connect`). We restore with psql restricted by a
key only we know (`\\restrict`, PostgreSQL 15.14+), so no backslash command in the
dump can run. pg_dump's own `\\restrict` / `\\unrestrict` lines are removed while the
file is copied, in bounded memory (lines are read in 1 MiB pieces: a COPY row can be
far longer than that).
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable
from typing import BinaryIO

from stages.dumprows import RowCounter
from stages.errors import ObjectTooLarge, PermanentError

PIECE = 1024 * 1024
_PG_DUMP_RESTRICT = re.compile(rb"^\\(un)?restrict [A-Za-z0-9]+\r?\n?$")
# The plain-SQL equivalent of --no-owner / --no-privileges: the one-line statements
# pg_dump writes for owners and grants, outside COPY data.
_OWNER_OR_GRANT = re.compile(
    rb"^(ALTER [A-Z ]+ .+ OWNER TO .+|(GRANT|REVOKE) .+ (TO|FROM) .+|ALTER DEFAULT PRIVILEGES .+"
    rb"|SET SESSION AUTHORIZATION .+|RESET SESSION AUTHORIZATION);\r?\n$"
)
_COPY_FROM_STDIN = re.compile(rb"^COPY .+ FROM stdin;\r?\n$")
_END_OF_COPY = re.compile(rb"^\\\.\r?\n$")


def prepare_plain_sql(
    src: str,
    dst: str,
    *,
    gzipped: bool,
    max_bytes: int,
    counter: RowCounter | None = None,
    on_progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Copy `src` (optionally gunzipping it) to `dst` without pg_dump's \\restrict
    lines nor owner and grant statements, counting rows into `counter` on the way;
    refuse output larger than `max_bytes`. Returns the bytes written."""
    written = 0
    counter = counter or RowCounter()
    try:
        with gzip.open(src, "rb") if gzipped else open(src, "rb") as reader, open(dst, "wb") as out:
            written = _copy(reader, out, max_bytes, counter, on_progress)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise PermanentError(
            f"the gzip-compressed dump is truncated or corrupt ({err}); upload it again, "
            "e.g. pg_dump ... | gzip > dump.sql.gz"
        ) from err
    return written


def _copy(
    reader: BinaryIO, out: BinaryIO, max_bytes: int, counter: RowCounter, on_progress: Callable[[int], None]
) -> int:
    written = 0
    at_line_start = True
    in_copy_data = False
    while True:
        piece = reader.readline(PIECE)
        if not piece:
            return written
        if at_line_start:
            if in_copy_data:
                in_copy_data = not _END_OF_COPY.match(piece)
            elif _PG_DUMP_RESTRICT.match(piece) or _OWNER_OR_GRANT.match(piece):
                continue
            elif _COPY_FROM_STDIN.match(piece):
                in_copy_data = True
        counter.feed(piece, at_line_start)
        at_line_start = piece.endswith(b"\n")
        written += len(piece)
        if written > max_bytes:
            raise ObjectTooLarge(
                f"the SQL in the dump is larger than the {max_bytes} bytes this project allows "
                "once decompressed; raise the project's storage limit or import less data"
            )
        out.write(piece)
        if written % (64 * PIECE) < len(piece):
            on_progress(written)
