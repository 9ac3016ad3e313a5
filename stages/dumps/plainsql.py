"""Plain-SQL dumps: prepared for a restore by the project role, with psql restricted.

A plain dump is a psql script, and psql scripts can run shell commands (`\\!`), read
files (`\\i`) or connect elsewhere (`\\connect`). We restore with psql restricted by a
key only we know (`\\restrict`, PostgreSQL 15.14+), so no backslash command in the
dump can run. While the file is copied (in bounded memory, split into statements by
`stages.dumps.sqlscript`, the one reader of plain SQL) it is checked whole and made fit for a
managed target, as `pg_restore --no-owner --no-privileges` and the TOC plan do for
archives. Every decision is about a whole statement (or a meta-command between
statements), never about a line inside a string, a function body or COPY data:

- pg_dump's own `\\restrict` / `\\unrestrict` lines are removed;
- owner and grant statements are removed, and so are `SET default_tablespace`s
  (objects go to the database's default, as `pg_restore --no-tablespaces` does);
- `CREATE SCHEMA s;` becomes `CREATE SCHEMA IF NOT EXISTS s;`, since schemas that hold
  extensions are created by the service before the restore;
- comments on extensions are taken out, for the service to apply (it owns them);
- objects only a superuser may create (event triggers, subscriptions, untrusted
  languages) are removed and reported as skipped.

A removed statement leaves as many newlines as it held, so the prepared file has the
user's line numbers: psql's errors (`psql:<file>:<line>: ERROR: …`) name lines of the
user's dump, which `user_terms` puts in words.

The script is refused (`PermanentError`, before anything is restored) when it is cut
short or was made with pg_dump options an import cannot restore (see
`stages.dumps.plaindump`).
"""

from __future__ import annotations

import contextlib
import gzip
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from stages.dumps.plaindump import (
    IDENT,
    PlainDumpShape,
    create_extension,
    is_pg_dump_restrict,
    language_statement,
)
from stages.dumps.rows import RowCounter
from stages.dumps.sqlscript import (
    CHUNK,
    META,
    SPACE,
    STATEMENT,
    Piece,
    Script,
    ScriptError,
    read_script,
    statement_words,
)
from stages.dumps.toc import SUPERUSER_ONLY, TRUSTED_LANGUAGES, TocEntry, unquote
from stages.errors import ObjectTooLarge, PermanentError

PIECE = CHUNK
# Statements the filter rewrites or parses are short; longer ones are kept as they are.
_DECIDE_BYTES = 64 * 1024
_IDENT = IDENT
_OWNER_TO = re.compile(rb"\sOWNER\s+TO\s+" + _IDENT + rb"\s*;\Z", re.I)
_CREATE_SCHEMA = re.compile(rb"CREATE\s+SCHEMA\s+(?!IF\s+NOT\s+EXISTS\b)(" + _IDENT + rb")\s*;\Z", re.I)
_COMMENT_ON_EXTENSION = re.compile(
    rb"COMMENT\s+ON\s+EXTENSION\s+(" + _IDENT + rb")\s+IS\s+'((?:[^']|'')*)'\s*;\Z", re.I
)
_SUPERUSER_OBJECT = re.compile(
    rb"(CREATE|ALTER|COMMENT\s+ON)\s+(EVENT\s+TRIGGER|SUBSCRIPTION)\s+(" + _IDENT + rb")", re.I
)
_USER_LINE = re.compile(r"psql:[^\n]*?:(\d+): (?=ERROR|FATAL|WARNING|NOTICE)")
# pg_dump's header before each object (and "-- Data for Name: …" before its data): the
# (desc, namespace, name) keys an archive's TOC has too.
_OBJECT_HEADER = re.compile(
    rb"^-- (Data for )?Name: ([^\n]*?); Type: ([^\n;]*); Schema: ([^\n;]*); Owner: ", re.M
)


@dataclass
class PlainSql:
    """What preparing a plain dump found: bytes written, extensions, skipped objects."""

    bytes: int = 0
    extensions: dict[str, str] = field(default_factory=dict)
    extension_comments: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # psql meta-commands between statements, other than pg_dump's \restrict lines.
    meta_commands: int = 0


def prepare_plain_sql(
    src: str,
    dst: str,
    *,
    gzipped: bool,
    max_bytes: int,
    counter: RowCounter | None = None,
    on_progress: Callable[[int], None] = lambda _n: None,
    skip: Mapping[tuple[str, str, str], str] | None = None,
) -> PlainSql:
    """Copy the file `src` to `dst` through `filter_plain_sql`."""
    with open(src, "rb") as source, open(dst, "wb") as out:
        return filter_plain_sql(
            source,
            out,
            gzipped=gzipped,
            max_bytes=max_bytes,
            counter=counter,
            on_progress=on_progress,
            skip=skip,
        )


def filter_plain_sql(
    source: BinaryIO,
    out: BinaryIO,
    *,
    gzipped: bool,
    max_bytes: int,
    counter: RowCounter | None = None,
    on_progress: Callable[[int], None] = lambda _n: None,
    skip: Mapping[tuple[str, str, str], str] | None = None,
) -> PlainSql:
    """Write the script read from `source` (gunzipped if `gzipped`) to `out`, made fit
    for the project role (see the module docstring), counting rows into `counter` on the
    way, in bounded memory: `source` and `out` may be streams (object storage, psql).
    Refuse output larger than `max_bytes`, and scripts cut short or made with pg_dump
    options an import cannot restore (`PermanentError` naming the fix), the latter only
    once the whole script was read: whoever reads `out` must not act on a script that
    is then refused (the restore stops psql before the end, see stages.tools.restore).
    `skip`: (desc, namespace, name) -> reason, objects the schema rehearsal found the
    project cannot hold (stages.preflight.rehearsal): the statements under their
    pg_dump header are left out and reported as skipped."""
    counter = counter or RowCounter()
    try:
        with (
            gzip.GzipFile(fileobj=source, mode="rb") if gzipped else contextlib.nullcontext(source) as reader
        ):
            return _Filter(out, max_bytes, counter, on_progress, skip or {}).run(
                iter(lambda: reader.read(PIECE), b"")
            )
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise PermanentError(
            f"the gzip-compressed dump is cut short or corrupt ({err}); upload the whole file again, "
            "or run pg_dump again if it stopped early, e.g. pg_dump ... | gzip > dump.sql.gz"
        ) from err
    except ScriptError as err:
        raise PermanentError(f"the SQL script cannot be read as psql reads it: {err}") from err


def user_terms(message: str) -> str:
    """psql's `psql:<file>:<line>: ERROR: …` in the user's terms: `line <line> of your
    dump: ERROR: …`. The prepared file keeps the user's line numbers (see the module
    docstring); psql names the line where the failing statement ends."""
    return _USER_LINE.sub(lambda m: f"line {m.group(1)} of your dump: ", message)


class _Filter:
    def __init__(
        self,
        out: BinaryIO,
        max_bytes: int,
        counter: RowCounter,
        on_progress: Callable[[int], None],
        skip: Mapping[tuple[str, str, str], str],
    ) -> None:
        self.skip = skip
        # The reason to leave out the statements of the object whose header came last.
        self.skipping: str | None = None
        self.out = out
        self.max_bytes = max_bytes
        self.counter = counter
        self.on_progress = on_progress
        self.result = PlainSql()
        self.shape = PlainDumpShape()
        self.skipped_languages: set[str] = set()

    def run(self, chunks: Iterator[bytes]) -> PlainSql:
        script = Script()
        dropping = False
        for piece in read_script(chunks, script):
            self.shape.see(piece)
            if piece.kind == SPACE and self.skip:
                self._header(piece.data)
            if piece.kind == STATEMENT and piece.first and self.skipping is not None:
                kept, dropping = None, True
            elif piece.kind == STATEMENT and piece.first:
                kept = self._statement(piece)
                dropping = kept is None
            elif piece.kind == META:
                kept = None if is_pg_dump_restrict(piece.data) else piece.data
                self.result.meta_commands += kept is not None
            elif piece.kind == STATEMENT:
                kept = None if dropping else piece.data
            else:
                kept = piece.data
            if kept is None:
                # Keep the line numbers: a removed statement leaves its newlines.
                self._write(b"\n" * piece.data.count(b"\n"))
                continue
            self.counter.see(piece)
            self._write(kept)
        refusal = self.shape.refusal(script, whole=True)
        if refusal:
            raise PermanentError(refusal)
        return self.result

    def _statement(self, piece: Piece) -> bytes | None:
        """The bytes to write for a statement's first piece (None to drop the statement)."""
        text = piece.data
        words = statement_words(text, 4)
        if not words:
            return text
        verb = words[0]
        if verb in ("GRANT", "REVOKE") or words[:3] == ["ALTER", "DEFAULT", "PRIVILEGES"]:
            return None
        if words[1:3] == ["SESSION", "AUTHORIZATION"] and verb in ("SET", "RESET"):
            return None
        if verb == "SET" and words[1:2] == ["DEFAULT_TABLESPACE"]:
            # Tablespaces are the cluster's, never the project's (pg_restore --no-tablespaces).
            return None
        if not piece.last or len(text) > _DECIDE_BYTES:
            return text
        # pg_dump's owner statements hold no string literal: one that does is not one.
        if verb == "ALTER" and b"'" not in text and _OWNER_TO.search(text):
            return None
        found = _CREATE_SCHEMA.match(text)
        if found:
            return b"CREATE SCHEMA IF NOT EXISTS " + found.group(1) + b";"
        extension = create_extension(text)
        if extension:
            # pg_dump's form; the service creates these in the preview before the restore.
            if extension.if_not_exists and extension.schema is not None:
                self.result.extensions[extension.name] = extension.schema
            return text
        found = _COMMENT_ON_EXTENSION.match(text)
        if found:
            # Applied by the service, which owns the extensions (parsed, never run as SQL).
            name, body = unquote(found.group(1).decode()), found.group(2).decode().replace("''", "'")
            self.result.extension_comments[name] = body
            return None
        found = _SUPERUSER_OBJECT.match(text)
        if found:
            kind = " ".join(found.group(2).decode().upper().split())
            if found.group(1).upper() == b"CREATE":
                self._skip(f"{kind} {unquote(found.group(3).decode())}", SUPERUSER_ONLY[kind])
            return None
        about_language = language_statement(text)
        if about_language:
            verb, language = about_language
            if language not in TRUSTED_LANGUAGES:
                if verb == "CREATE":
                    self._skip(
                        f"PROCEDURAL LANGUAGE {language}",
                        f"the untrusted language {language} needs superuser",
                    )
                return None
        return text

    def _header(self, text: bytes) -> None:
        """Follow pg_dump's object headers: the statements after one of an object to
        skip are left out, until the next header."""
        headers = list(_OBJECT_HEADER.finditer(text))
        if not headers:
            return
        found = headers[-1]
        data, name, desc, schema = (
            group.decode("utf-8", "replace") if group else None for group in found.groups()
        )
        assert name is not None and desc is not None and schema is not None
        reason = None if data else self.skip.get((desc, schema, name))
        if reason is not None:
            self._skip(TocEntry("", 0, desc, schema, name).label, reason)
        self.skipping = reason

    def _skip(self, what: str, reason: str) -> None:
        self.result.skipped.append({"object": what, "reason": reason})

    def _write(self, piece: bytes) -> None:
        if not piece:
            return
        self.result.bytes += len(piece)
        if self.result.bytes > self.max_bytes:
            raise ObjectTooLarge(
                f"the SQL in the dump is larger than the {self.max_bytes} bytes this project allows "
                "once decompressed; raise the project's storage limit or import less data"
            )
        self.out.write(piece)
        if self.result.bytes % (64 * PIECE) < len(piece):
            self.on_progress(self.result.bytes)
