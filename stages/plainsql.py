"""Plain-SQL dumps: prepared for a restore by the project role, with psql restricted.

A plain dump is a psql script, and psql scripts can run shell commands (`\\!`), read
files (`\\i`) or connect elsewhere (`\\connect`). We restore with psql restricted by a
key only we know (`\\restrict`, PostgreSQL 15.14+), so no backslash command in the
dump can run. While the file is copied (in bounded memory: lines are read in 1 MiB
pieces, a COPY row can be far longer) it is also made fit for a managed target, as
`pg_restore --no-owner --no-privileges` and the TOC plan do for archives:

- pg_dump's own `\\restrict` / `\\unrestrict` lines are removed;
- owner and grant statements are removed;
- `CREATE SCHEMA s;` becomes `CREATE SCHEMA IF NOT EXISTS s;`, since schemas that hold
  extensions are created by the service before the restore;
- comments on extensions are taken out, for the service to apply (it owns them);
- objects only a superuser may create (event triggers, subscriptions, untrusted
  languages) are removed and reported as skipped.

Only statements pg_dump writes at the start of a line, outside COPY data, are touched
(a function body line that looks exactly like one would be touched as well).
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from stages.dumprows import RowCounter
from stages.errors import ObjectTooLarge, PermanentError
from stages.toc import SUPERUSER_ONLY, TRUSTED_LANGUAGES, unquote

PIECE = 1024 * 1024
_PG_DUMP_RESTRICT = re.compile(rb"^\\(un)?restrict [A-Za-z0-9]+\r?\n?$")
_OWNER_OR_GRANT = re.compile(
    rb"^(ALTER [A-Z ]+ .+ OWNER TO .+|(GRANT|REVOKE) .+ (TO|FROM) .+|ALTER DEFAULT PRIVILEGES .+"
    rb"|SET SESSION AUTHORIZATION .+|RESET SESSION AUTHORIZATION);\r?\n$"
)
_COPY_FROM_STDIN = re.compile(rb"^COPY .+ FROM stdin;\r?\n$")
_END_OF_COPY = re.compile(rb"^\\\.\r?\n$")
_CREATE_SCHEMA = re.compile(rb"^CREATE SCHEMA (?!IF NOT EXISTS )(.+);\r?\n$")
_CREATE_EXTENSION = re.compile(
    rb'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")*"|\S+) WITH SCHEMA ("(?:[^"]|"")*"|\S+);\r?\n$'
)
_COMMENT_ON_EXTENSION = re.compile(rb'^COMMENT ON EXTENSION ("(?:[^"]|"")*"|\S+) IS \'((?:[^\']|\'\')*)\';\r?\n$')
_SUPERUSER_BLOCK = re.compile(
    rb'^(CREATE|ALTER|COMMENT ON) (EVENT TRIGGER|SUBSCRIPTION) ("(?:[^"]|"")*"|\S+)'
)
_LANGUAGE = re.compile(
    rb'^CREATE (?:OR REPLACE )?(?:TRUSTED )?(?:PROCEDURAL )?LANGUAGE ("(?:[^"]|"")*"|[^\s;]+)'
)


@dataclass
class PlainSql:
    """What preparing a plain dump found: bytes written, extensions, skipped objects."""

    bytes: int = 0
    extensions: dict[str, str] = field(default_factory=dict)
    extension_comments: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def prepare_plain_sql(
    src: str,
    dst: str,
    *,
    gzipped: bool,
    max_bytes: int,
    counter: RowCounter | None = None,
    on_progress: Callable[[int], None] = lambda _n: None,
) -> PlainSql:
    """Copy `src` (optionally gunzipping it) to `dst`, made fit for the project role
    (see the module docstring), counting rows into `counter` on the way; refuse
    output larger than `max_bytes`."""
    counter = counter or RowCounter()
    try:
        with gzip.open(src, "rb") if gzipped else open(src, "rb") as reader, open(dst, "wb") as out:
            return _Filter(out, max_bytes, counter, on_progress).run(reader)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise PermanentError(
            f"the gzip-compressed dump is truncated or corrupt ({err}); upload it again, "
            "e.g. pg_dump ... | gzip > dump.sql.gz"
        ) from err


class _Filter:
    def __init__(
        self, out: BinaryIO, max_bytes: int, counter: RowCounter, on_progress: Callable[[int], None]
    ) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.counter = counter
        self.on_progress = on_progress
        self.result = PlainSql()
        self.in_copy_data = False
        self.skipping_statement = False

    def run(self, reader: BinaryIO) -> PlainSql:
        at_line_start = True
        dropping_line = False
        while True:
            piece = reader.readline(PIECE)
            if not piece:
                return self.result
            starts_line, at_line_start = at_line_start, piece.endswith(b"\n")
            if starts_line:
                kept = self._line(piece)
                dropping_line = not kept and not at_line_start
            else:
                kept = b"" if dropping_line else piece
            if kept:
                self.counter.feed(kept, starts_line)
                self._write(kept)

    def _line(self, piece: bytes) -> bytes:
        """The piece to write for a piece that starts a line (b"" to drop it)."""
        if self.in_copy_data:
            self.in_copy_data = not _END_OF_COPY.match(piece)
            return piece
        if self.skipping_statement:
            self.skipping_statement = not piece.rstrip().endswith(b";")
            return b""
        if _PG_DUMP_RESTRICT.match(piece) or _OWNER_OR_GRANT.match(piece):
            return b""
        if _COPY_FROM_STDIN.match(piece):
            self.in_copy_data = True
            return piece
        match = _CREATE_EXTENSION.match(piece)
        if match:
            name, schema = (unquote(g.decode()) for g in match.groups())
            self.result.extensions[name] = schema
            return piece
        match = _CREATE_SCHEMA.match(piece)
        if match:
            return b"CREATE SCHEMA IF NOT EXISTS " + match.group(1) + b";\n"
        match = _COMMENT_ON_EXTENSION.match(piece)
        if match:
            # Applied by the service, which owns the extensions (parsed, never run as SQL).
            name, body = unquote(match.group(1).decode()), match.group(2).decode().replace("''", "'")
            self.result.extension_comments[name] = body
            return b""
        match = _SUPERUSER_BLOCK.match(piece)
        if match:
            kind = match.group(2).decode()
            if match.group(1) == b"CREATE":
                self._skip(f"{kind} {unquote(match.group(3).decode())}", SUPERUSER_ONLY[kind])
            self.skipping_statement = not piece.rstrip().endswith(b";")
            return b""
        match = _LANGUAGE.match(piece)
        if match and unquote(match.group(1).decode()) not in TRUSTED_LANGUAGES:
            language = unquote(match.group(1).decode())
            self._skip(
                f"PROCEDURAL LANGUAGE {language}", f"the untrusted language {language} needs superuser"
            )
            self.skipping_statement = not piece.rstrip().endswith(b";")
            return b""
        return piece

    def _skip(self, what: str, reason: str) -> None:
        self.result.skipped.append({"object": what, "reason": reason})

    def _write(self, piece: bytes) -> None:
        self.result.bytes += len(piece)
        if self.result.bytes > self.max_bytes:
            raise ObjectTooLarge(
                f"the SQL in the dump is larger than the {self.max_bytes} bytes this project allows "
                "once decompressed; raise the project's storage limit or import less data"
            )
        self.out.write(piece)
        if self.result.bytes % (64 * PIECE) < len(piece):
            self.on_progress(self.result.bytes)
